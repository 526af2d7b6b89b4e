"""Uni-RoPE: rotary embeddings over a (t, h, w) position triple per token (ERNIE 5.0 §2.2.3).

Text and audio tokens carry t = h = w = their index, so for them Uni-RoPE is ordinary RoPE. Visual tokens
carry (frame, row, column), possibly fractional for centre-aligned coarse scales. The head's frequency pairs
are split among the three axes by `config.rope_section` (the report leaves the split open; DESIGN.md §3 takes
ERNIE 4.5-VL's proportion). As in ERNIE 4.5-VL, h and w share the high frequencies by interleaving and t
takes the lowest ones, so temporal distance is encoded at the slowest rates.
"""

from __future__ import annotations

import torch
from torch import nn


def pair_axes(rope_section: list[int]) -> torch.Tensor:
    """Axis (0 = t, 1 = h, 2 = w) that drives each frequency pair, highest frequency first."""
    t, h, w = rope_section
    axes: list[int] = []
    remaining = {1: h, 2: w}
    turn = 1
    while remaining[1] or remaining[2]:
        if remaining[turn]:
            axes.append(turn)
            remaining[turn] -= 1
        turn = 3 - turn
    axes.extend([0] * t)
    return torch.tensor(axes, dtype=torch.long)


def text_position_ids(batch_size: int, seq_len: int, offset: int | torch.Tensor = 0, device=None) -> torch.Tensor:
    """Position triples for plain text: t = h = w = index. Returns (3, B, L)."""
    idx = torch.arange(seq_len, device=device).unsqueeze(0).expand(batch_size, -1)
    if isinstance(offset, torch.Tensor):
        idx = idx + offset.view(-1, 1).to(idx.device)
    else:
        idx = idx + offset
    return idx.unsqueeze(0).expand(3, -1, -1)


class Ernie5UniRotaryEmbedding(nn.Module):
    """Computes cos/sin tables for (3, B, L) positions; buffers are non-persistent (rebuilt on load)."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.rope_section = list(config.rope_section)
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("axes", pair_axes(self.rope_section), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (3, B, L), float or int. Angles in fp32: bf16 positions lose integer precision past 256.
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        pos_BLP = position_ids.float().permute(1, 2, 0)[..., self.axes]  # (B, L, pairs): each pair's axis position
        freqs_BLP = pos_BLP * self.inv_freq
        emb = torch.cat((freqs_BLP, freqs_BLP), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q, k: (B, heads, L, head_dim); cos, sin: (B, L, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def centered_grid_positions(grid: int, full: int) -> torch.Tensor:
    """Row (or column) coordinates of a `grid`-cell scale on a `full`-cell grid, centre-aligned (ERNIE 5.0 §2.2.3).

    Cell i covers [i * full / grid, (i + 1) * full / grid) of the full grid, so its centre sits at
    (i + 0.5) * full / grid - 0.5 in full-grid units; the finest scale gets 0, 1, ..., full - 1 and coarser
    scales fractional positions between them (the report says scales align on their geometric centres).
    """
    return (torch.arange(grid, dtype=torch.float32) + 0.5) * (full / grid) - 0.5


def image_position_ids(grid: int, full: int, start: float) -> torch.Tensor:
    """(3, grid * grid) Uni-RoPE triples of one image scale in row-major order: t = start (the image's frame
    index continues the text counter), h and w = start + centre-aligned row / column."""
    coords = centered_grid_positions(grid, full)
    rows = coords[:, None].expand(grid, grid).reshape(-1)
    cols = coords[None, :].expand(grid, grid).reshape(-1)
    return torch.stack([torch.full_like(rows, 0.0), rows, cols]) + start


__all__ = [
    "Ernie5UniRotaryEmbedding",
    "apply_rotary_pos_emb",
    "centered_grid_positions",
    "image_position_ids",
    "pair_axes",
    "text_position_ids",
]
