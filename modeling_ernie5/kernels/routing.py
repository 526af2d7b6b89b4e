"""Routing prep shared by the fast experts back-ends: sort (token, slot) pairs by expert once per MoE call.

Every fast back-end (CPU grouped matmuls, Triton grouped GEMMs) works on the same "grouped" layout: the T*K
(token, slot) pairs of a call, stably sorted by expert id, so that each expert's rows form one contiguous
slice. Both expert matmuls (gate_up and down) and their backward reuse one `ExpertGroups`
(ScatterMoE's `flatten_sort_count`; research note moe_kernels.md §2.3 step 1).

Legend: T tokens, K slots per token, S = T*K sorted pairs (valid ones first), E experts.
Slots whose expert index is >= E (the "empty slot" sentinel of elastic top-k) sort to the tail and are never
computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class ExpertGroups:
    """The grouped layout of one MoE call.

    Attributes:
        order_S (`torch.LongTensor` of shape `(T*K,)`):
            Flat (token*K + slot) index of each sorted pair; the first `num_valid` belong to real experts.
        token_S (`torch.LongTensor` of shape `(T*K,)`):
            Token of each sorted pair (`order_S // K`).
        counts_E (`torch.LongTensor` of shape `(E,)`):
            Rows per expert.
        offsets_E (`torch.LongTensor` of shape `(E,)`):
            End row of each expert's slice (inclusive cumulative sum of `counts_E`).

    `num_valid` (pairs routed to a real expert, a host value) is read from the device on first use: a back-end that
    sizes its buffers for all T*K pairs (the Triton one) never waits for it.
    """

    order_S: torch.Tensor
    token_S: torch.Tensor
    counts_E: torch.Tensor
    offsets_E: torch.Tensor

    @cached_property
    def num_valid(self) -> int:
        return int(self.offsets_E[-1]) if self.offsets_E.numel() else 0  # sync point

    @property
    def valid_order(self) -> torch.Tensor:
        return self.order_S[: self.num_valid]

    @property
    def valid_token(self) -> torch.Tensor:
        return self.token_S[: self.num_valid]


def group_by_expert(idx_TK: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Sort the (token, slot) pairs of `idx_TK` by expert; sentinels (>= `num_experts`) go last."""
    if idx_TK.dim() != 2:
        raise ValueError(f"idx_TK must be (tokens, top_k), got shape {tuple(idx_TK.shape)}")
    top_k = idx_TK.shape[1]
    flat_S = idx_TK.reshape(-1).clamp(max=num_experts)
    # Stable, so rows of one expert keep token order: results are deterministic and match the reference loop.
    sorted_S, order_S = torch.sort(flat_S, stable=True)
    # End row of each expert = pairs with expert id <= e, read off the sorted ids (`bincount` would size its output
    # from the largest id, a host sync on CUDA).
    experts = torch.arange(num_experts, device=idx_TK.device, dtype=sorted_S.dtype)
    offsets_E = torch.searchsorted(sorted_S, experts, right=True)
    return ExpertGroups(
        order_S=order_S,
        token_S=torch.div(order_S, max(top_k, 1), rounding_mode="floor"),
        counts_E=torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)),
        offsets_E=offsets_E,
    )
