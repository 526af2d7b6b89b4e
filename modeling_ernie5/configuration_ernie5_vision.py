"""Configuration of ERNIE 5.0's vision parts: the multi-scale bitwise visual tokenizer and the vision sub-config.

ERNIE 5.0 §2.2 (DESIGN.md §3, vision bullets): images are tokenized by a causal convolutional tokenizer with
Infinity-style multi-scale residual bitwise quantisation (vocabulary 2^bits per token); understanding uses the
features before quantisation from two paths (the tokenizer's CNN encoder and a ViT), fused by an attention patch
merger over K = 4 neighbouring patches. Sizes the report leaves open are fields here, with small defaults.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, PretrainedConfig


class Ernie5VisualTokenizerConfig(PretrainedConfig):
    r"""
    Configuration of `Ernie5VisualTokenizer`: a causal 3D-convolution encoder/decoder (an image is a one-frame
    video) with multi-scale residual bitwise quantisation.

    Args:
        num_channels (`int`, *optional*, defaults to 3): image channels.
        image_size (`int`, *optional*, defaults to 32): side of the (square) images the tokenizer is built for.
        base_channels (`int`, *optional*, defaults to 16): channels of the first convolution.
        channel_multipliers (`list[int]`, *optional*, defaults to `[1, 2, 2]`): channel multiplier per resolution
            level; every level after the first halves the resolution, so the latent grid is
            `image_size // 2 ** (len(channel_multipliers) - 1)`.
        num_res_blocks (`int`, *optional*, defaults to 1): residual blocks per level.
        codebook_bits (`int`, *optional*, defaults to 8): bits per token; the vocabulary has `2 ** codebook_bits`
            entries (ERNIE 5.0 follows Infinity's bitwise quantisation).
        scale_schedule (`list[int]`, *optional*): token-grid side of every scale, coarse to fine; the last must equal
            the latent grid. Defaults to powers of two up to the latent grid (1, 2, 4, 8 for 32-pixel images).
        commitment_weight (`float`, *optional*, defaults to 0.25): weight of the encoder commitment loss.
        prefix_loss_weight (`float`, *optional*, defaults to 0.0): weight of a second reconstruction loss that decodes
            the sum of only the first scales (a random prefix per step). It pushes the image's layout and colours
            into the coarse scales, which is what next-scale generation decides first; 0 trains on the full sum only.
    """

    model_type = "ernie5_visual_tokenizer"

    def __init__(
        self,
        num_channels: int = 3,
        image_size: int = 32,
        base_channels: int = 16,
        channel_multipliers: list[int] | None = None,
        num_res_blocks: int = 1,
        codebook_bits: int = 8,
        scale_schedule: list[int] | None = None,
        commitment_weight: float = 0.25,
        prefix_loss_weight: float = 0.0,
        **kwargs,
    ):
        self.num_channels = num_channels
        self.image_size = image_size
        self.base_channels = base_channels
        self.channel_multipliers = list(channel_multipliers) if channel_multipliers is not None else [1, 2, 2]
        self.num_res_blocks = num_res_blocks
        self.codebook_bits = codebook_bits
        if scale_schedule is None:
            scale_schedule = [2**i for i in range(int(math.log2(max(self.latent_size, 1))) + 1)]
            if scale_schedule[-1] != self.latent_size:
                scale_schedule.append(self.latent_size)
        self.scale_schedule = list(scale_schedule)
        self.commitment_weight = commitment_weight
        self.prefix_loss_weight = prefix_loss_weight
        super().__init__(**kwargs)
        self.validate_tokenizer()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor

    @property
    def tokens_per_image(self) -> int:
        return sum(s * s for s in self.scale_schedule)

    def validate_tokenizer(self) -> None:
        if self.prefix_loss_weight < 0:
            raise ValueError(f"Ernie5VisualTokenizerConfig.prefix_loss_weight must be >= 0, got {self.prefix_loss_weight}")
        for name in ("num_channels", "image_size", "base_channels", "num_res_blocks", "codebook_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Ernie5VisualTokenizerConfig.{name} must be a positive integer, got {value!r}")
        if not self.channel_multipliers or min(self.channel_multipliers) <= 0:
            raise ValueError(
                f"Ernie5VisualTokenizerConfig.channel_multipliers must be positive, got {self.channel_multipliers}"
            )
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"Ernie5VisualTokenizerConfig.image_size ({self.image_size}) must be divisible by the downsampling "
                f"factor {self.downsample_factor} implied by channel_multipliers"
            )
        sched = self.scale_schedule
        if not sched or any(b <= a for a, b in zip(sched, sched[1:])) or sched[0] < 1:
            raise ValueError(f"Ernie5VisualTokenizerConfig.scale_schedule must increase strictly from >= 1, got {sched}")
        if sched[-1] != self.latent_size:
            raise ValueError(
                f"Ernie5VisualTokenizerConfig.scale_schedule must end at the latent grid {self.latent_size} "
                f"(image_size // {self.downsample_factor}), got {sched}"
            )


def tiny_vit_config(image_size: int = 32, patch_size: int = 4) -> PretrainedConfig:
    """A tiny SigLIP vision encoder config (any HF vision config works; this one is small and offline)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )


class Ernie5VisionConfig(PretrainedConfig):
    r"""
    Vision settings of an ERNIE 5.0 model (`Ernie5Config.vision_config`).

    Args:
        vit_config (`dict` or `PretrainedConfig`, *optional*):
            Config of any transformers vision encoder whose model returns `last_hidden_state` of patch features
            (SigLIP, ViT, CLIP vision, ...); a dict needs its `model_type`. Defaults to a tiny SigLIP encoder whose
            patch grid matches the tokenizer's latent grid.
            Its patch grid must equal the tokenizer's latent grid so both feature paths align patch by patch.
        tokenizer_config (`dict` or `Ernie5VisualTokenizerConfig`, *optional*): the visual tokenizer.
        merge_size (`int`, *optional*, defaults to 2): the patch merger fuses `merge_size ** 2` (K = 4 for images)
            neighbouring patches from each path into one understanding token.
        merger_num_heads (`int`, *optional*, defaults to 2): heads of the merger's self-attention.
        bit_flip_prob (`float`, *optional*, defaults to 0.1): probability of flipping each history bit during
            teacher-forced next-scale training (ERNIE 5.0 §2.2.3 self-correction; the rate is not reported).
        scale_loss_weights (`list[float]`, *optional*): weight of each scale's mean bit loss. Defaults to equal
            weights per scale, which favours the early scales (few tokens) over a per-token mean.
        vision_loss_weight (`float`, *optional*, defaults to 1.0): weight of the (rescaled) vision loss.
        cfg_dropout_prob (`float`, *optional*, defaults to 0.1): probability of dropping the text condition of a
            generation sample in training, so classifier-free guidance can be used at inference. The data pipeline
            applies it, not the model: such a sample's prompt becomes empty (`<boi>` alone, the unconditional input
            `generate_image` uses), as `build_generation_batch` in `examples/vision_toy.py` does.
        loss_scale_momentum (`float`, *optional*, defaults to 0.99): momentum of the running loss scales used to
            bring text and vision losses to a common range.
        freeze_tokenizer (`bool`, *optional*, defaults to `True`): keep the visual tokenizer fixed while training
            the backbone (it is trained separately, `training/train_visual_tokenizer.py`).
    """

    model_type = "ernie5_vision"

    def __init__(
        self,
        vit_config: dict | PretrainedConfig | None = None,
        tokenizer_config: dict | Ernie5VisualTokenizerConfig | None = None,
        merge_size: int = 2,
        merger_num_heads: int = 2,
        bit_flip_prob: float = 0.1,
        scale_loss_weights: list[float] | None = None,
        vision_loss_weight: float = 1.0,
        cfg_dropout_prob: float = 0.1,
        loss_scale_momentum: float = 0.99,
        freeze_tokenizer: bool = True,
        **kwargs,
    ):
        if isinstance(tokenizer_config, dict):
            tokenizer_config = Ernie5VisualTokenizerConfig(**tokenizer_config)
        self.tokenizer_config = tokenizer_config or Ernie5VisualTokenizerConfig()
        if isinstance(vit_config, dict):
            fields = dict(vit_config)
            model_type = fields.pop("model_type", None)
            if model_type is None:
                raise ValueError("Ernie5VisionConfig.vit_config given as a dict needs a 'model_type' key")
            vit_config = AutoConfig.for_model(model_type, **fields)
        tok = self.tokenizer_config
        self.vit_config = vit_config or tiny_vit_config(tok.image_size, tok.image_size // tok.latent_size)
        self.merge_size = merge_size
        self.merger_num_heads = merger_num_heads
        self.bit_flip_prob = bit_flip_prob
        self.scale_loss_weights = list(scale_loss_weights) if scale_loss_weights is not None else None
        self.vision_loss_weight = vision_loss_weight
        self.cfg_dropout_prob = cfg_dropout_prob
        self.loss_scale_momentum = loss_scale_momentum
        self.freeze_tokenizer = freeze_tokenizer
        super().__init__(**kwargs)
        self.validate_vision()

    @property
    def image_size(self) -> int:
        return self.tokenizer_config.image_size

    @property
    def vit_grid(self) -> int:
        return getattr(self.vit_config, "image_size", self.image_size) // self.vit_config.patch_size

    @property
    def understanding_grid(self) -> int:
        """Side of the grid of understanding tokens per image."""
        return self.tokenizer_config.latent_size // self.merge_size

    @property
    def understanding_tokens_per_image(self) -> int:
        return self.understanding_grid**2

    @property
    def generation_tokens_per_image(self) -> int:
        return self.tokenizer_config.tokens_per_image

    def validate_vision(self) -> None:
        tok = self.tokenizer_config
        if self.merge_size < 1 or tok.latent_size % self.merge_size:
            raise ValueError(
                f"Ernie5VisionConfig.merge_size ({self.merge_size}) must divide the tokenizer latent grid "
                f"({tok.latent_size})"
            )
        if not hasattr(self.vit_config, "patch_size"):
            raise ValueError("Ernie5VisionConfig.vit_config must describe a patch-based vision encoder (patch_size)")
        vit_size = getattr(self.vit_config, "image_size", tok.image_size)
        if vit_size != tok.image_size:
            # Both paths read the same pixels (the processor resizes to the tokenizer's size); a ViT built for another
            # size would interpolate or misplace its position embeddings.
            raise ValueError(
                f"vit_config.image_size ({vit_size}) must equal the visual tokenizer's image_size ({tok.image_size}): "
                "both feature paths read the same pixels"
            )
        if self.vit_grid != tok.latent_size:
            raise ValueError(
                f"the ViT patch grid ({self.vit_grid}) must equal the visual tokenizer's latent grid "
                f"({tok.latent_size}) so the two feature paths align; adjust vit_config.patch_size/image_size"
            )
        for name in ("bit_flip_prob", "cfg_dropout_prob", "loss_scale_momentum"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Ernie5VisionConfig.{name} is a probability and must lie in [0, 1], got {value}")
        if self.scale_loss_weights is not None and (
            len(self.scale_loss_weights) != len(tok.scale_schedule) or min(self.scale_loss_weights) < 0
        ):
            raise ValueError(
                f"Ernie5VisionConfig.scale_loss_weights needs {len(tok.scale_schedule)} non-negative weights (one per "
                f"scale of {tok.scale_schedule}), got {self.scale_loss_weights}"
            )
        if self.vision_loss_weight < 0:
            raise ValueError(f"Ernie5VisionConfig.vision_loss_weight must be >= 0, got {self.vision_loss_weight}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # AutoConfig.for_model needs the nested encoder's model_type back when the dict is reloaded.
        out["vit_config"] = self.vit_config.to_dict()
        out["vit_config"].pop("transformers_version", None)
        return out


__all__ = ["Ernie5VisionConfig", "Ernie5VisualTokenizerConfig", "tiny_vit_config"]
