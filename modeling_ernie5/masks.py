"""Attention-mask rules of ERNIE 5.0 (§2.2.3, §5.3), built in one place.

Text and audio attend causally. The rules are built as additive float tensors of shape (B, 1, Q, K) with
0 where attention is allowed and the dtype's minimum elsewhere (not -inf: a fully masked row, such as a left
pad query, then yields a uniform distribution instead of NaNs). `mask_for_attention` hands each attention kernel
the form it takes: that tensor (eager, SDPA and registered custom kernels), a `BlockMask` (flex attention) or the
2D padding mask (flash attention, which applies causality itself).
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


def packed_sequence_ids(position_ids_BL: torch.Tensor) -> torch.Tensor | None:
    """(B, L) index of the packed sequence each token belongs to, or None when no row holds more than one.

    Padding-free batches (TRL's packing) concatenate sequences into one row without an attention mask; their
    positions restart at every sequence (or jump, for a split one), and a new sequence begins wherever the
    position does not follow the previous one by exactly 1."""
    steps = position_ids_BL.diff(dim=-1)
    if bool((steps == 1).all()):
        return None
    starts = torch.nn.functional.pad(steps != 1, (1, 0), value=False)
    return starts.long().cumsum(-1)


def padded_causal_allowed(attention_mask: torch.Tensor | None, batch: int, q_len: int, past_len: int, device,
                          sequence_ids: torch.Tensor | None = None):  # fmt: skip
    """(B, Q, past+Q) boolean: causal, never onto a key that the (B, past+Q) padding mask marks 0, and, for packed
    rows (`sequence_ids`, no cache), never across the sequences of a row."""
    allowed = causal_allowed(batch, q_len, past_len, device)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, -(past_len + q_len) :].to(torch.bool)[:, None, :]
    if sequence_ids is not None:
        allowed = allowed & (sequence_ids[:, :, None] == sequence_ids[:, None, :])
    return allowed


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    past_len: int,
    dtype: torch.dtype,
    device,
    need_explicit: bool,
    sequence_ids: torch.Tensor | None = None,
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
    if not (need_explicit or has_padding or sequence_ids is not None or (past_len > 0 and q_len > 1)):
        return None
    return to_additive(padded_causal_allowed(attention_mask, batch, q_len, past_len, device, sequence_ids), dtype)


def _allowed_from_4d(mask_B1QK: torch.Tensor) -> torch.Tensor:
    """(B, 1, Q, K) boolean or additive mask -> (B, Q, K) boolean 'may attend'."""
    if mask_B1QK.dtype == torch.bool:
        return mask_B1QK[:, 0]
    blocked = mask_B1QK <= torch.finfo(mask_B1QK.dtype).min / 2
    if not bool(((mask_B1QK == 0) | blocked).all()):
        raise ValueError("flex_attention takes 4D masks of 0 (attend) and the dtype's minimum (blocked) only, not biases")
    return ~blocked[:, 0]


def to_block_mask(allowed_BQK: torch.Tensor):
    """Boolean (B, Q, K) 'may attend' mask -> flex attention's `BlockMask` (one pattern for all heads).

    Flex attention could also add the float mask through a `score_mod` that reads it, but in torch 2.13 the
    compiled CPU kernel corrupts the heap when a score_mod indexes a captured tensor; a `mask_mod` is also the
    form that lets flex skip fully masked blocks."""
    from torch.nn.attention.flex_attention import create_block_mask

    allowed_BQK = allowed_BQK.contiguous()

    def may_attend(b, h, q, k):
        return allowed_BQK[b, q, k]

    batch, q_len, k_len = allowed_BQK.shape
    return create_block_mask(may_attend, batch, None, q_len, k_len, device=allowed_BQK.device)


def mask_for_attention(implementation: str | None, attention_mask: torch.Tensor | None, batch: int, q_len: int,
                       past_len: int, dtype: torch.dtype, device, sequence_ids: torch.Tensor | None = None):  # fmt: skip
    """The attention mask in the form the kernel `implementation` (`config._attn_implementation`) takes.

    - flash attention (any implementation named "*flash*"): the (B, past+Q) padding mask, or None without padding;
      the kernel applies causality itself, and finds packed sequences from the `position_ids` / `cu_seq_lens_*`
      the model passes it. It cannot express a 4D mask (the scale-wise block-causal mask of image
      generation), so one raises a ValueError naming the alternatives.
    - `"flex_attention"`: a `BlockMask` of the same rule as the additive mask.
    - anything else (eager, SDPA, custom kernels): `build_attention_mask`'s additive mask, or None where plain
      causal attention suffices and the kernel is known to apply it itself (eager and SDPA).
    `sequence_ids` (`packed_sequence_ids`) keeps the sequences of a packed row apart in the mask forms.
    """
    if implementation is not None and "flash" in implementation:
        if attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError(
                f"attn_implementation={implementation!r} cannot apply a 4D attention mask (such as the scale-wise "
                "block-causal mask of image tokens); use 'sdpa', 'eager' or 'flex_attention' for these inputs"
            )
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return attention_mask[:, -(past_len + q_len) :]
    if implementation == "flex_attention":
        if attention_mask is not None and attention_mask.dim() == 4:
            return to_block_mask(_allowed_from_4d(attention_mask))
        return to_block_mask(padded_causal_allowed(attention_mask, batch, q_len, past_len, device, sequence_ids))
    return build_attention_mask(
        attention_mask, batch, q_len, past_len, dtype, device, need_explicit=implementation not in ("sdpa", "eager", None),
        sequence_ids=sequence_ids,
    )  # fmt: skip


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


__all__ = [
    "build_attention_mask",
    "build_block_causal_mask",
    "causal_allowed",
    "mask_for_attention",
    "packed_sequence_ids",
    "to_additive",
    "to_block_mask",
]
