"""Vision modules of the ERNIE 5.0 backbone (§2.2.2 understanding, §2.2.3 generation inputs; DESIGN.md §3).

Understanding uses features *before* quantisation from two paths: the visual tokenizer's CNN encoder (perceptual)
and a ViT (semantic; any transformers vision encoder built from `vision_config.vit_config`). For each
understanding token the attention patch merger takes K = merge_size^2 neighbouring patches from each path,
projects the CNN features to the ViT width, concatenates them into 2K patch features, runs self-attention over
them, mean-pools and projects to the backbone width.

Generation (next-scale prediction) feeds the backbone, at the tokens of scale k, the sum of the coarser scales
area-downsampled to scale k's grid and projected to the backbone width (Infinity / VAR practice; the report says
only that "the model takes the previous generated scales as input"); scale 0 has a learned start embedding. A
learned per-scale embedding tells the scales apart beyond their Uni-RoPE positions.

Dimension letters: B images, N understanding tokens, K patches per token, D widths, s scale grid side.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel

from .configuration_ernie5_vision import Ernie5VisionConfig
from .visual_tokenizer import Ernie5VisualTokenizer


class Ernie5PatchMerger(nn.Module):
    """Attention patch merger: 2K patch features (K from each path) -> self-attention -> mean-pool -> projection.

    Args:
        cnn_dim (`int`): width of the CNN (tokenizer encoder) features.
        vit_dim (`int`): width of the ViT features; the merger works at this width.
        out_dim (`int`): backbone hidden size.
        num_patches (`int`): K, patches per understanding token from each path (4 for images).
        num_heads (`int`): attention heads.
    """

    def __init__(self, cnn_dim: int, vit_dim: int, out_dim: int, num_patches: int, num_heads: int):
        super().__init__()
        if vit_dim % num_heads:
            raise ValueError(f"ViT width {vit_dim} must be divisible by merger_num_heads {num_heads}")
        self.num_patches = num_patches
        self.cnn_proj = nn.Linear(cnn_dim, vit_dim)
        # Tells attention which path and which neighbour each of the 2K slots holds.
        self.slot_embed = nn.Parameter(torch.zeros(2 * num_patches, vit_dim))
        self.attn_norm = nn.LayerNorm(vit_dim)
        self.attn = nn.MultiheadAttention(vit_dim, num_heads, batch_first=True)
        self.out_norm = nn.LayerNorm(vit_dim)
        self.proj = nn.Linear(vit_dim, out_dim)

    def forward(self, cnn_NKC: torch.Tensor, vit_NKD: torch.Tensor) -> torch.Tensor:
        if cnn_NKC.shape[:2] != vit_NKD.shape[:2] or cnn_NKC.shape[1] != self.num_patches:
            raise ValueError(
                f"patch merger expects (N, {self.num_patches}, D) from both paths, got {tuple(cnn_NKC.shape)} and "
                f"{tuple(vit_NKD.shape)}"
            )
        x = torch.cat([self.cnn_proj(cnn_NKC), vit_NKD], dim=1) + self.slot_embed
        h = self.attn_norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return self.proj(self.out_norm(x.mean(dim=1)))


def patch_grid(features_BND: torch.Tensor, grid: int) -> torch.Tensor:
    """A transformers vision encoder's `last_hidden_state` (B, N, D) as its (B, grid, grid, D) patch grid; a leading
    CLS token (ViT, CLIP) is dropped."""
    if features_BND.shape[1] == grid * grid + 1:
        features_BND = features_BND[:, 1:]
    if features_BND.shape[1] != grid * grid:
        raise ValueError(f"the vision encoder returned {features_BND.shape[1]} patch features; expected a {grid}x{grid} grid")
    return features_BND.reshape(features_BND.shape[0], grid, grid, -1)


def group_patches(features_BHWD: torch.Tensor, merge: int) -> torch.Tensor:
    """(B, G*m, G*m, D) grid -> (B*G*G, m*m, D): each row holds one m x m neighbourhood, row-major."""
    b, h, w, d = features_BHWD.shape
    g_h, g_w = h // merge, w // merge
    x = features_BHWD.view(b, g_h, merge, g_w, merge, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * g_h * g_w, merge * merge, d)


class Ernie5VisionModel(nn.Module):
    """Visual tokenizer, ViT, patch merger and next-scale input embeddings, owned by `Ernie5Model` (`model.vision`)."""

    def __init__(self, vision_config: Ernie5VisionConfig, hidden_size: int):
        super().__init__()
        self.config = vision_config
        tok_cfg = vision_config.tokenizer_config
        self.tokenizer = Ernie5VisualTokenizer(tok_cfg)
        self.vit = AutoModel.from_config(vision_config.vit_config)
        vit_dim = vision_config.vit_config.hidden_size
        self.merger = Ernie5PatchMerger(
            self.tokenizer.feature_channels, vit_dim, hidden_size, vision_config.merge_size**2, vision_config.merger_num_heads
        )
        self.scale_schedule = list(tok_cfg.scale_schedule)
        self.gen_start = nn.Parameter(torch.zeros(hidden_size))
        self.scale_embed = nn.Embedding(len(self.scale_schedule), hidden_size)
        self.gen_input_proj = nn.Linear(tok_cfg.codebook_bits, hidden_size)

    # --- understanding -------------------------------------------------------------------------------------------

    def _vit_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return patch_grid(self.vit(pixel_values=pixel_values).last_hidden_state, self.config.vit_grid)

    def understand(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels in [-1, 1] -> (B * understanding_tokens_per_image, hidden) features, row-major."""
        if self.config.freeze_tokenizer:
            with torch.no_grad():
                cnn = self.tokenizer.encode_features(pixel_values)
        else:
            cnn = self.tokenizer.encode_features(pixel_values)
        cnn = cnn.permute(0, 2, 3, 1)
        vit = self._vit_grid(pixel_values.to(self.merger.proj.weight.dtype))
        m = self.config.merge_size
        return self.merger(group_patches(cnn.to(vit.dtype), m), group_patches(vit, m))

    # --- generation ----------------------------------------------------------------------------------------------

    def scale_inputs(self, bits: list[torch.Tensor], num_scales: int, batch: int | None = None) -> list[torch.Tensor]:
        """Backbone inputs of scales 0..num_scales-1, each (B, s_k * s_k, hidden).

        Args:
            bits (`list[torch.Tensor]`): (B, s, s, D) bits of the scales generated so far (at least num_scales - 1).
            num_scales (`int`): how many scales' inputs to build.
            batch (`int`, *optional*): batch size when `bits` is empty.
        """
        if len(bits) < num_scales - 1:
            raise ValueError(f"inputs of {num_scales} scales need the bits of {num_scales - 1}, got {len(bits)}")
        b = bits[0].shape[0] if bits else batch
        ref = self.gen_input_proj.weight
        outs = []
        if num_scales >= 1:
            s0 = self.scale_schedule[0]
            outs.append(self.gen_start.expand(b, s0 * s0, -1) + self.scale_embed.weight[0])
        if num_scales > 1:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_tokenizer):
                history = self.tokenizer.next_scale_inputs(bits[: num_scales - 1])
            for k, h in enumerate(history, start=1):
                emb = self.gen_input_proj(h.to(ref.dtype).flatten(1, 2)) + self.scale_embed.weight[k]
                outs.append(emb)
        return outs


def flip_bits(bits: list[torch.Tensor], prob: float, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Bitwise corruption of the history (ERNIE 5.0 §2.2.3): each bit flips independently with probability `prob`."""
    if prob <= 0:
        return bits
    out = []
    for b in bits:
        flips = torch.rand(b.shape, generator=generator, device=b.device) < prob
        out.append(b ^ flips.to(b.dtype))
    return out


__all__ = ["Ernie5PatchMerger", "Ernie5VisionModel", "flip_bits", "group_patches"]
