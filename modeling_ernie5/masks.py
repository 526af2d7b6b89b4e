"""Attention-mask rules of ERNIE 5.0 (§2.2.3, §5.3), built in one place.

Text and audio attend causally. All masks are returned as additive float tensors of shape (B, 1, Q, K) with
0 where attention is allowed and the dtype's minimum elsewhere (not -inf: a fully masked row, such as a left
pad query, then yields a uniform distribution instead of NaNs).
"""

from __future__ import annotations

import torch


def to_additive(allowed_BQK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (B, Q, K) 'may attend' mask -> additive (B, 1, Q, K)."""
    return torch.zeros(allowed_BQK.shape, dtype=dtype, device=allowed_BQK.device).masked_fill(
        ~allowed_BQK, torch.finfo(dtype).min
    )[:, None]


def causal_allowed(batch: int, q_len: int, past_len: int, device) -> torch.Tensor:
    """(B, Q, past+Q) boolean causal pattern for queries placed after `past_len` cached keys."""
    q_pos = torch.arange(past_len, past_len + q_len, device=device)
    k_pos = torch.arange(past_len + q_len, device=device)
    return (k_pos[None, :] <= q_pos[:, None]).expand(batch, -1, -1)


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    past_len: int,
    dtype: torch.dtype,
    device,
    need_explicit: bool,
) -> torch.Tensor | None:
    """Turn the user's mask into the additive (B, 1, Q, K) form the attention kernels take.

    `attention_mask` may be None, a (B, past+Q) padding mask (1 = real token), or an already-built 4D mask
    (boolean 'may attend' or additive), e.g. the processor's scale-wise block-causal mask for images.
    Returns None when plain causal attention suffices and the kernel can apply it itself
    (`need_explicit=False`, no padding, no cache offset).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return to_additive(attention_mask[:, 0], dtype)
        return attention_mask.to(dtype)
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if not (need_explicit or has_padding or (past_len > 0 and q_len > 1)):
        return None
    allowed = causal_allowed(batch, q_len, past_len, device)
    if attention_mask is not None:
        keys_BK = attention_mask[:, -(past_len + q_len) :].to(torch.bool)
        allowed = allowed & keys_BK[:, None, :]
    return to_additive(allowed, dtype)


def build_block_causal_mask(
    block_ids: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Scale-wise block-causal mask (ERNIE 5.0 §2.2.3): bidirectional within a block, causal across blocks.

    `block_ids` (B, L) must be non-decreasing along each row: every text token is its own block (so text stays
    causal), all tokens of one image scale (or one understanding image) share a block, and later scales and frames
    get larger ids. Query q may attend key k iff block[k] <= block[q] and k is not padding.
    Returns the additive (B, 1, L, L) mask that `build_attention_mask` passes through unchanged.
    """
    allowed = block_ids[:, None, :] <= block_ids[:, :, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(torch.bool)[:, None, :]
    return to_additive(allowed, dtype)


__all__ = ["build_attention_mask", "build_block_causal_mask", "causal_allowed", "to_additive"]
