"""Multi-scale bitwise visual tokenizer of ERNIE 5.0 (§2.2.1; DESIGN.md §3 vision bullets).

A causal convolutional encoder/decoder (3D convolutions padded only towards the past in time, so an image is a
one-frame video and the same weights extend to video) with Infinity-style multi-scale residual bitwise
quantisation: the latent map (standardised per channel with dataset statistics) is quantised scale by scale from a
1x1 grid up to the full latent grid; at every
scale each token is a group of `codebook_bits` signs (vocabulary 2^bits) of the area-downsampled residual left
by the coarser scales, times a learned per-scale magnitude. Decoding sums the upsampled scales and runs the
decoder, so `decode(encode(x))` reconstructs `x`.

Losses run on CPU without pretrained networks: L1 + MSE reconstruction, a commitment term and (optionally) a
reconstruction loss from coarse scales only. The report's adversarial and semantic losses are optional flags of the
training script.

Dimension letters: B batch, C channels, T frames, H/W pixel grid, h/w latent grid, D bits per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_ernie5_vision import Ernie5VisualTokenizerConfig


class Ernie5CausalConv3d(nn.Module):
    """3D convolution that pads time only on the past side: frame t never sees frame t+1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, spatial_stride: int = 1):
        super().__init__()
        self.time_pad = kernel_size - 1
        self.space_pad = kernel_size // 2
        self.spatial_stride = spatial_stride
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=(1, spatial_stride, spatial_stride))

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        p = self.space_pad
        if self.spatial_stride == 2:
            # Asymmetric spatial padding keeps the output grid exactly half the input (VQGAN convention).
            pads = (p - 1, p, p - 1, p, self.time_pad, 0)
        else:
            pads = (p, p, p, p, self.time_pad, 0)
        x_BCTHW = F.pad(x_BCTHW, pads[:4], mode="constant")
        if x_BCTHW.shape[2] == 1:
            # Past padding in time replicates the first frame, so for a still image every temporal tap sees the same
            # frame: a 2D convolution with the kernel summed over time gives the identical result at a third of the cost.
            out = F.conv2d(x_BCTHW[:, :, 0], self.conv.weight.sum(2), self.conv.bias, stride=self.spatial_stride)
            return out.unsqueeze(2)
        x_BCTHW = F.pad(x_BCTHW, (0, 0, 0, 0, self.time_pad, 0), mode="replicate")
        return self.conv(x_BCTHW)


class Ernie5FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame: pooling them over time would let a frame see the future."""

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x_BCTHW.shape
        frames = x_BCTHW.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        return super().forward(frames).view(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class Ernie5TokenizerResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Ernie5FrameGroupNorm(min(8, in_channels), in_channels)
        self.conv1 = Ernie5CausalConv3d(in_channels, out_channels)
        self.norm2 = Ernie5FrameGroupNorm(min(8, out_channels), out_channels)
        self.conv2 = Ernie5CausalConv3d(out_channels, out_channels)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Ernie5TokenizerEncoder(nn.Module):
    def __init__(self, config: Ernie5VisualTokenizerConfig):
        super().__init__()
        chans = [config.base_channels * m for m in config.channel_multipliers]
        self.conv_in = Ernie5CausalConv3d(config.num_channels, chans[0])
        blocks: list[nn.Module] = []
        prev = chans[0]
        for level, ch in enumerate(chans):
            for _ in range(config.num_res_blocks):
                blocks.append(Ernie5TokenizerResBlock(prev, ch))
                prev = ch
            if level < len(chans) - 1:
                blocks.append(Ernie5CausalConv3d(prev, prev, spatial_stride=2))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = Ernie5FrameGroupNorm(min(8, prev), prev)
        self.conv_out = Ernie5CausalConv3d(prev, config.codebook_bits)
        self.feature_channels = prev

    def forward(self, x_BCTHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (features before the bit projection, latent of `codebook_bits` channels)."""
        feats = self.blocks(self.conv_in(x_BCTHW))
        return feats, self.conv_out(F.silu(self.norm_out(feats)))


class Ernie5TokenizerDecoder(nn.Module):
    def __init__(self, config: Ernie5VisualTokenizerConfig):
        super().__init__()
        chans = [config.base_channels * m for m in reversed(config.channel_multipliers)]
        self.conv_in = Ernie5CausalConv3d(config.codebook_bits, chans[0])
        blocks: list[nn.Module] = []
        prev = chans[0]
        for level, ch in enumerate(chans):
            for _ in range(config.num_res_blocks):
                blocks.append(Ernie5TokenizerResBlock(prev, ch))
                prev = ch
            if level < len(chans) - 1:
                blocks.append(nn.Upsample(scale_factor=(1, 2, 2), mode="nearest"))
                blocks.append(Ernie5CausalConv3d(prev, prev))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = Ernie5FrameGroupNorm(min(8, prev), prev)
        self.conv_out = Ernie5CausalConv3d(prev, config.num_channels)

    def forward(self, z_BDThw: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z_BDThw)))))


class Ernie5MultiScaleBitQuantizer(nn.Module):
    """Residual quantisation over a schedule of grids; each token is `codebook_bits` signs.

    The per-scale magnitudes are learned (softplus of `magnitude_logits`), starting at halving steps, because the
    residual left for finer scales shrinks; the signs themselves carry all the information a token holds.
    """

    def __init__(self, config: Ernie5VisualTokenizerConfig):
        super().__init__()
        self.scale_schedule = list(config.scale_schedule)
        self.latent_size = config.latent_size
        init = torch.tensor([0.5**k for k in range(len(self.scale_schedule))])
        self.magnitude_logits = nn.Parameter(torch.log(torch.expm1(init)))

    def magnitudes(self) -> torch.Tensor:
        return F.softplus(self.magnitude_logits)

    def _up(self, x_BDhw: torch.Tensor) -> torch.Tensor:
        if x_BDhw.shape[-1] == self.latent_size:
            return x_BDhw
        return F.interpolate(x_BDhw, size=(self.latent_size, self.latent_size), mode="bilinear", align_corners=False)

    def bits_to_latent(self, bits: list[torch.Tensor]) -> torch.Tensor:
        """Sum of the upsampled scales given so far. bits[k]: (B, s_k, s_k, D) in {0, 1}. Returns (B, D, h, w)."""
        mags = self.magnitudes()
        total = None
        for k, b in enumerate(bits):
            # In the magnitudes' dtype, so a bf16 / fp16 tokenizer decodes without a dtype clash.
            q = (b.to(mags.dtype) * 2 - 1).permute(0, 3, 1, 2) * mags[k]
            up = self._up(q)
            total = up if total is None else total + up
        return total

    def forward(self, z_BDhw: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns the per-scale bits and the quantised latent after each scale (straight-through gradients to `z`);
        the last partial sum is the full quantisation."""
        mags = self.magnitudes()
        residual = z_BDhw
        quantised = torch.zeros_like(z_BDhw)
        bits: list[torch.Tensor] = []
        partial_sums: list[torch.Tensor] = []
        for k, s in enumerate(self.scale_schedule):
            r = F.adaptive_avg_pool2d(residual, s) if s != self.latent_size else residual
            sign = torch.where(r > 0, 1.0, -1.0)
            # Straight-through sign: forward uses the sign, backward passes the gradient to r unchanged.
            q = (r + (sign - r).detach()) * mags[k]
            bits.append((r > 0).permute(0, 2, 3, 1).to(torch.uint8))
            up = self._up(q)
            quantised = quantised + up
            residual = residual - up
            partial_sums.append(quantised)
        return bits, partial_sums


@dataclass
class Ernie5VisualTokenizerOutput(ModelOutput):
    """Output of `Ernie5VisualTokenizer.forward`.

    Args:
        loss (`torch.FloatTensor`): reconstruction + commitment_weight * commitment (+ prefix_loss_weight * prefix).
        reconstruction_loss (`torch.FloatTensor`): L1 + MSE between input and reconstruction.
        commitment_loss (`torch.FloatTensor`): MSE between latent and its quantisation.
        prefix_loss (`torch.FloatTensor`, *optional*): L1 + MSE of the image decoded from a random prefix of the
            scales (only with `config.prefix_loss_weight > 0`).
        reconstruction (`torch.FloatTensor`): decoded pixels, same shape as the input.
        bits (`list[torch.Tensor]`): per scale, (B, s, s, codebook_bits) uint8 bits.
        features (`torch.FloatTensor`): encoder features before quantisation, (B*T, C_feat, h, w); the training
            script's optional semantic regularisation aligns them with a vision foundation model.
    """

    loss: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    commitment_loss: torch.Tensor | None = None
    prefix_loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    bits: list[torch.Tensor] | None = None
    features: torch.Tensor | None = None


class Ernie5VisualTokenizer(PreTrainedModel):
    """Causal-convolution image tokenizer with multi-scale residual bitwise quantisation.

    Pixels are expected in [-1, 1] (what `Ernie5ImageProcessor` produces), shaped (B, C, H, W) for images or
    (B, C, T, H, W) for videos (frames are quantised independently; the convolutions are causal in time).

    Example:

    ```python
    >>> import torch
    >>> from modeling_ernie5.visual_tokenizer import Ernie5VisualTokenizer, Ernie5VisualTokenizerConfig
    >>> tok = Ernie5VisualTokenizer(Ernie5VisualTokenizerConfig())
    >>> bits = tok.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    >>> [tuple(b.shape) for b in bits]
    [(2, 1, 1, 8), (2, 2, 2, 8), (2, 4, 4, 8), (2, 8, 8, 8)]
    >>> tok.decode(bits).shape
    torch.Size([2, 3, 32, 32])
    ```
    """

    config_class = Ernie5VisualTokenizerConfig
    config: Ernie5VisualTokenizerConfig
    main_input_name = "pixel_values"
    base_model_prefix = "visual_tokenizer"

    def __init__(self, config: Ernie5VisualTokenizerConfig):
        super().__init__(config)
        self.encoder = Ernie5TokenizerEncoder(config)
        self.decoder = Ernie5TokenizerDecoder(config)
        self.quantizer = Ernie5MultiScaleBitQuantizer(config)
        self.register_buffer("latent_mean", torch.zeros(config.codebook_bits))
        self.register_buffer("latent_var", torch.ones(config.codebook_bits))
        self.register_buffer("latent_batches", torch.zeros((), dtype=torch.long))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, Ernie5MultiScaleBitQuantizer):
            init = torch.tensor([0.5**k for k in range(len(module.scale_schedule))])
            module.magnitude_logits.copy_(torch.log(torch.expm1(init)))
        elif isinstance(module, Ernie5VisualTokenizer):
            # Buffers a checkpoint may lack are initialised like a fresh tokenizer's, never left as empty memory.
            module.latent_mean.zero_()
            module.latent_var.fill_(1.0)
            module.latent_batches.zero_()

    @property
    def feature_channels(self) -> int:
        return self.encoder.feature_channels

    def _as_video(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if pixel_values.dim() == 4:
            return pixel_values.unsqueeze(2), True
        if pixel_values.dim() == 5:
            return pixel_values, False
        raise ValueError(f"pixel_values must be (B, C, H, W) or (B, C, T, H, W), got {tuple(pixel_values.shape)}")

    def _check_size(self, pixel_values: torch.Tensor) -> None:
        size = self.config.image_size
        if pixel_values.shape[-2:] != (size, size) or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"the visual tokenizer takes {self.config.num_channels}x{size}x{size} images, got "
                f"{tuple(pixel_values.shape)}; resize with Ernie5ImageProcessor"
            )

    def _latent(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        self._check_size(pixel_values)
        video, is_image = self._as_video(pixel_values)
        # Processors return float32 pixels; a bf16 / fp16 tokenizer takes them in its own dtype.
        feats, z = self.encoder(video.to(self.encoder.conv_in.conv.weight.dtype))
        return feats, z, is_image

    @staticmethod
    def _frames(x_BCThw: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x_BCThw.shape
        return x_BCThw.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)

    def _standardise(self, z_BDThw: torch.Tensor, update_statistics: bool = False) -> torch.Tensor:
        """Per channel, zero mean and unit variance with statistics over the training images (batch statistics and
        a running average while the tokenizer trains, the running average everywhere else).

        Without it many bits start (and stay) constant over the data, and sign quantisation passes nothing through
        them. The statistics are shared by all images, not computed per image: per-image standardisation would
        zero every frame's mean, leaving the 1x1 scale with noise instead of the image's global content (its
        colour), and the coarse-to-fine order of next-scale generation would lose its first, easiest step.
        """
        if update_statistics:
            # A cumulative average over the first batches, then an exponential one that follows the encoder.
            momentum = max(1.0 / (int(self.latent_batches) + 1), 0.1)
            self.latent_batches += 1
        else:
            momentum = 0.0
        return F.batch_norm(
            self._frames(z_BDThw), self.latent_mean, self.latent_var, training=update_statistics, momentum=momentum
        )

    def encode_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encoder features before quantisation, (B*T, C_feat, h, w): the CNN path of image understanding."""
        feats, _, _ = self._latent(pixel_values)
        return self._frames(feats)

    def encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Pixels in [-1, 1] -> per-scale bit tokens, each (B*T, s, s, codebook_bits) uint8."""
        _, z, _ = self._latent(pixel_values)
        bits, _ = self.quantizer(self._standardise(z))
        return bits

    def decode(self, bits: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale bit tokens (all scales of the schedule) -> pixels (B, C, H, W), clamped to [-1, 1]."""
        if len(bits) != len(self.config.scale_schedule):
            raise ValueError(f"decode needs {len(self.config.scale_schedule)} scales of bits, got {len(bits)}")
        for k, (b, s) in enumerate(zip(bits, self.config.scale_schedule)):
            if tuple(b.shape[1:]) != (s, s, self.config.codebook_bits):
                raise ValueError(
                    f"scale {k}: expected bits of shape (B, {s}, {s}, {self.config.codebook_bits}), got {tuple(b.shape)}"
                )
        z = self.quantizer.bits_to_latent(bits).to(self.decoder.conv_in.conv.weight.dtype)
        return self.decoder(z.unsqueeze(2)).squeeze(2).clamp(-1, 1)

    def next_scale_inputs(self, bits: list[torch.Tensor]) -> list[torch.Tensor]:
        """Inputs of next-scale prediction: for scale k >= 1, the sum of scales < k area-downsampled to grid s_k.

        Returns one (B, s_k, s_k, D) tensor per scale 1..len(bits) (scale 0 has no history: its input is a learned
        start embedding in the model). With all scales given, the last scale's bits are unused.
        """
        out = []
        for k in range(1, len(bits) + 1):
            if k >= len(self.config.scale_schedule):
                break
            s = self.config.scale_schedule[k]
            latent = self.quantizer.bits_to_latent(bits[:k])
            out.append(F.adaptive_avg_pool2d(latent, s).permute(0, 2, 3, 1))
        return out

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True, **kwargs) -> Ernie5VisualTokenizerOutput:
        feats, z, is_image = self._latent(pixel_values)
        z = self._standardise(z, update_statistics=self.training)
        bits, partial_sums = self.quantizer(z)
        quantised = partial_sums[-1]
        recon = self.decoder(quantised.unsqueeze(2)).squeeze(2)
        target = self._frames(self._as_video(pixel_values)[0])

        def pixel_loss(image):
            return F.l1_loss(image, target) + F.mse_loss(image, target)

        rec_loss = pixel_loss(recon)
        prefix_loss = None
        if self.config.prefix_loss_weight > 0 and len(partial_sums) > 1:
            k = int(torch.randint(len(partial_sums) - 1, ()))
            prefix_loss = pixel_loss(self.decoder(partial_sums[k].unsqueeze(2)).squeeze(2))
        # Two-sided commitment: the encoder is pulled toward its quantisation, and the per-scale magnitudes toward
        # the encoder's latent (the sign path carries no gradient to them otherwise).
        commit = F.mse_loss(z, quantised.detach()) + F.mse_loss(quantised, z.detach())
        loss = rec_loss + self.config.commitment_weight * commit
        if prefix_loss is not None:
            loss = loss + self.config.prefix_loss_weight * prefix_loss
        if not is_image:
            b = pixel_values.shape[0]
            recon = recon.view(b, -1, *recon.shape[1:]).permute(0, 2, 1, 3, 4)
        return Ernie5VisualTokenizerOutput(
            loss=loss, reconstruction_loss=rec_loss, commitment_loss=commit, prefix_loss=prefix_loss,
            reconstruction=recon, bits=bits, features=self._frames(feats),
        )


def bits_to_indices(bits: torch.Tensor) -> torch.Tensor:
    """(..., D) bits -> (...) vocabulary indices in [0, 2^D), most significant bit first."""
    d = bits.shape[-1]
    weights = 2 ** torch.arange(d - 1, -1, -1, device=bits.device)
    return (bits.long() * weights).sum(-1)


def indices_to_bits(indices: torch.Tensor, codebook_bits: int) -> torch.Tensor:
    """Inverse of `bits_to_indices`."""
    weights = 2 ** torch.arange(codebook_bits - 1, -1, -1, device=indices.device)
    return ((indices.unsqueeze(-1) // weights) % 2).to(torch.uint8)


def psnr(reference: torch.Tensor, estimate: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB for pixels in [-1, 1] (data range 2)."""
    mse = F.mse_loss(estimate.float(), reference.float()).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(data_range**2 / mse)).item()


__all__ = [
    "Ernie5CausalConv3d",
    "Ernie5MultiScaleBitQuantizer",
    "Ernie5VisualTokenizer",
    "Ernie5VisualTokenizerConfig",
    "Ernie5VisualTokenizerOutput",
    "bits_to_indices",
    "indices_to_bits",
    "psnr",
]
