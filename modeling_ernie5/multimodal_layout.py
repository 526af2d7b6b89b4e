"""Token layout of images in an ERNIE 5.0 sequence: Uni-RoPE positions and attention blocks (DESIGN.md §3).

Sequences (ERNIE 5.0 Fig. 2): understanding `... <boi> I I ... I <eoi> ...` with `understanding_grid^2`
placeholders per image; generation `... <boi> S1 .. Sk <eoi>` with one placeholder per token of every scale of the
schedule. Every image has a fixed token count (the image processor resizes to one size), so positions and blocks
follow from the token ids alone: the processor and the model call the same functions and always agree.

Positions: text t = h = w = a counter over real (non-pad) tokens. An image starting at counter p gets t = p and
(h, w) = p + its grid coordinates, coarse scales centre-aligned on the finest grid; after the image the counter
resumes at max(position) + 1 = p + grid side. `rope_deltas` = (counter after the sequence) - (real tokens), so a
decode step at real index n sits at n + delta (what Qwen2-VL keeps as rope_deltas).

Blocks (for `masks.build_block_causal_mask`): one per text token, one per understanding image, one per scale of a
generated image, increasing along the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import build_block_causal_mask
from .rope import image_position_ids


@dataclass(frozen=True)
class ImageLayout:
    """Token ids and grids that fix where image tokens go.

    Args:
        image_token_id (`int`): understanding placeholder.
        image_gen_token_id (`int`): generation placeholder.
        understanding_grid (`int`): side of the understanding token grid per image.
        scale_schedule (`tuple[int, ...]`): side of each generation scale, coarse to fine.
    """

    image_token_id: int
    image_gen_token_id: int
    understanding_grid: int
    scale_schedule: tuple[int, ...]

    @classmethod
    def from_config(cls, config) -> "ImageLayout":
        vc = config.vision_config
        if vc is None:
            raise ValueError("this model has no vision_config; image tokens are not available")
        return cls(
            config.image_token_id,
            config.image_gen_token_id,
            vc.understanding_grid,
            tuple(vc.tokenizer_config.scale_schedule),
        )

    @property
    def understanding_tokens(self) -> int:
        return self.understanding_grid**2

    @property
    def generation_tokens(self) -> int:
        return sum(s * s for s in self.scale_schedule)


def _run_length(row: list[int], start: int, token: int) -> int:
    end = start
    while end < len(row) and row[end] == token:
        end += 1
    return end - start


def layout_positions_and_blocks(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layout: ImageLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uni-RoPE positions, attention block ids and rope deltas of a batch.

    Args:
        input_ids (`torch.LongTensor` of shape `(B, L)`).
        attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 for real tokens; pads get position 0.
        layout (`ImageLayout`).

    Returns:
        `(position_ids (3, B, L) float, block_ids (B, L) long, rope_deltas (B,) long)`.

    Raises:
        `ValueError` when a run of placeholders does not make whole images (understanding) or whole scales
        (generation; a partial image made of whole scales is allowed, as during generation).
    """
    b, length = input_ids.shape
    positions = torch.zeros(3, b, length, dtype=torch.float32)
    blocks = torch.zeros(b, length, dtype=torch.long)
    deltas = torch.zeros(b, dtype=torch.long)
    ids = input_ids.tolist()
    real = attention_mask.bool().tolist() if attention_mask is not None else [[True] * length] * b
    g = layout.understanding_grid
    full = layout.scale_schedule[-1]
    for r in range(b):
        row, counter, block, i = ids[r], 0, 0, 0
        while i < length:
            if not real[r][i]:
                i += 1
                continue
            tok = row[i]
            if tok == layout.image_token_id:
                run = _run_length(row, i, tok)
                if run % layout.understanding_tokens:
                    raise ValueError(
                        f"row {r}: {run} consecutive image placeholders at index {i} is not a multiple of "
                        f"{layout.understanding_tokens} (tokens per image); expand <image> with the processor"
                    )
                for _ in range(run // layout.understanding_tokens):
                    n = layout.understanding_tokens
                    positions[:, r, i : i + n] = image_position_ids(g, g, counter)
                    blocks[r, i : i + n] = block
                    block, counter, i = block + 1, counter + g, i + n
            elif tok == layout.image_gen_token_id:
                run = _run_length(row, i, tok)
                end = i + run
                while i < end:
                    start = counter
                    for s in layout.scale_schedule:
                        if i >= end:
                            break
                        if i + s * s > end:
                            raise ValueError(
                                f"row {r}: generation placeholders at index {i} stop inside a {s}x{s} scale; "
                                f"images need whole scales of {list(layout.scale_schedule)}"
                            )
                        positions[:, r, i : i + s * s] = image_position_ids(s, full, start)
                        blocks[r, i : i + s * s] = block
                        block, i = block + 1, i + s * s
                    counter = start + full
            else:
                positions[:, r, i] = counter
                blocks[r, i] = block
                block, counter, i = block + 1, counter + 1, i + 1
        deltas[r] = counter - sum(real[r])
    return positions.to(input_ids.device), blocks.to(input_ids.device), deltas.to(input_ids.device)


def image_positions_and_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config,
    dtype: torch.dtype,
    position_ids: torch.Tensor | None = None,
):
    """Positions, block-causal mask and rope deltas for a prefill holding image tokens, or None without any.

    Shared by the backbone (which TRL and `generate` call directly) and `Ernie5ForConditionalGeneration`, so a
    sequence gets the same positions and mask whichever entry point it goes through. The caller's `position_ids`
    are kept when given; a caller's 4D mask is kept too, its padding read from the diagonal (a pad token attends
    nowhere, not even to itself, in the masks `build_block_causal_mask` and the processor make). With both given
    there is nothing to derive.
    """
    if config.vision_config is None or input_ids is None:
        return None
    four_d = attention_mask is not None and attention_mask.dim() == 4
    if four_d and (position_ids is not None or attention_mask.shape[-2] != attention_mask.shape[-1]):
        return None
    is_image = (input_ids == config.image_token_id) | (input_ids == config.image_gen_token_id)
    if not bool(is_image.any()):
        return None
    layout = ImageLayout.from_config(config)
    if four_d:
        diagonal = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)
        real = diagonal if diagonal.dtype == torch.bool else diagonal > torch.finfo(diagonal.dtype).min / 2
        positions, _, deltas = layout_positions_and_blocks(input_ids, real, layout)
        mask = attention_mask
    else:
        positions, blocks, deltas = layout_positions_and_blocks(input_ids, attention_mask, layout)
        mask = build_block_causal_mask(blocks, attention_mask, dtype)
    return (positions if position_ids is None else position_ids), mask, deltas


__all__ = ["ImageLayout", "image_positions_and_mask", "layout_positions_and_blocks"]
