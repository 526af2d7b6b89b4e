"""Autograd wrapper of the Triton experts kernels (ERNIE 5.0 MoE experts; research note moe_kernels.md §2.3).

One `autograd.Function` for the whole expert computation: routing prep once (`..routing.group_by_expert` plus
the M-block layout), then forward = fused gather + gate_up GEMM + SwiGLU + combine weight, down GEMM,
un-permute-sum; backward = gathered dY @ Wd, fused SwiGLU backward (which also yields the combine-weight
gradient), the two weight-gradient grouped A^T B kernels, dh @ Wgu and un-permute-sum (weights (out, in) per
expert, so the forward multiplies by their transposes and the backward by the weights as stored). It calls only the
launchers of `ops.py`. Saved for backward: x, the weights, the pre-activation h (S, 2F) and the routing layout.

Nothing on this path waits for the device (no `.item()`, no data-dependent shapes): buffers are sized for all T*K
pairs and the block layout has a host-known upper bound of blocks, so the host can queue the whole step ahead of
the GPU. (On an H200, dropping the three syncs of the first version saved 0.3-0.4 ms of a 16 ms step; the
routing's `bincount`, a sync of its own on CUDA, was replaced after that measurement.)

Legend: T tokens, D hidden, F expert hidden, E experts, K slots per token, S = T*K sorted pairs (routed ones first).
"""

from __future__ import annotations

import torch

from ..routing import group_by_expert
from . import ops


class TritonExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, gate_up_EF2D, down_EDF, idx_TK, w_TK, store_h):
        num_tokens, top_k = idx_TK.shape
        num_experts = gate_up_EF2D.shape[0]
        groups = group_by_expert(idx_TK, num_experts)
        # Buffers hold all T*K pairs, so nothing waits for the device to say how many are routed: sentinel pairs
        # sort to the tail, no M-block covers them and their rows are never read.
        num_rows = num_tokens * top_k
        order_S, token_S = groups.order_S, groups.token_S
        pos_TK = torch.empty(num_rows, dtype=torch.int64, device=x_TD.device)
        pos_TK[order_S] = torch.arange(num_rows, device=x_TD.device)
        pos_TK = pos_TK.view(num_tokens, top_k).masked_fill(idx_TK >= num_experts, -1)
        w_S = w_TK.reshape(-1).index_select(0, order_S).to(x_TD.dtype).contiguous()
        block_m = ops.pick_block_m(num_rows, num_experts)
        layout = (*ops.block_layout(groups.counts_E, groups.offsets_E, block_m, num_rows), block_m)
        # The weights are (out, in) per expert; the GEMMs take B as (E, in, out), i.e. their transposed views.
        a_SF, h_SF2 = ops.grouped_gemm(
            x_TD, gate_up_EF2D.transpose(1, 2), layout, num_rows, gather=token_S, swiglu=True, w_S=w_S, store_h=store_h
        )
        y_SD, _ = ops.grouped_gemm(a_SF, down_EDF.transpose(1, 2), layout, num_rows)
        del a_SF
        out_TD = ops.unpermute_sum(y_SD, pos_TK, x_TD.dtype)
        ctx.save_for_backward(x_TD, gate_up_EF2D, down_EDF, w_TK, h_SF2, w_S, token_S, order_S, pos_TK,
                              groups.counts_E, groups.offsets_E, *layout[:3])
        ctx.block_m = block_m
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        (x_TD, gate_up_EF2D, down_EDF, w_TK, h_SF2, w_S, token_S, order_S, pos_TK,
         counts_E, offsets_E, *layout) = ctx.saved_tensors
        if h_SF2 is None:
            raise RuntimeError("the Triton experts forward ran without storing activations (no grad was needed)")
        layout = (*layout, ctx.block_m)
        num_rows = token_S.shape[0]
        need_x, need_gu, need_down, _, need_w = ctx.needs_input_grad[:5]
        dout_TD = dout_TD.contiguous().to(x_TD.dtype)  # also densifies broadcast gradients from `.sum()`
        g_SF, _ = ops.grouped_gemm(dout_TD, down_EDF, layout, num_rows, gather=token_S)  # dY W_down
        dh_SF2, aw_SF, dw_S = ops.swiglu_backward(g_SF, h_SF2, w_S, offsets_E[-1:])
        del g_SF
        d_down = (
            ops.grouped_gemm_tn(dout_TD, aw_SF, counts_E, offsets_E, down_EDF.dtype, a_gather=token_S)
            if need_down
            else None
        )
        del aw_SF
        d_gate_up = (
            ops.grouped_gemm_tn(dh_SF2, x_TD, counts_E, offsets_E, gate_up_EF2D.dtype, b_gather=token_S)
            if need_gu
            else None
        )
        dx_TD = None
        if need_x:
            dx_SD, _ = ops.grouped_gemm(dh_SF2, gate_up_EF2D, layout, num_rows)  # dh W_gate_up
            dx_TD = ops.unpermute_sum(dx_SD, pos_TK, x_TD.dtype)
        dw_TK = None
        if need_w:
            dw_TK = torch.empty(w_TK.numel(), dtype=w_TK.dtype, device=w_TK.device)
            dw_TK[order_S] = dw_S.to(w_TK.dtype)
            dw_TK = dw_TK.view_as(w_TK).masked_fill(pos_TK < 0, 0)  # sentinel slots: rows the kernel skipped
        # One slot per forward input: x, gate_up, down, idx (integer), w, store_h (flag).
        return dx_TD, d_gate_up, d_down, None, dw_TK, None


def triton_experts_forward(x_TD, gate_up_EF2D, down_EDF, idx_TK, w_TK):
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TD, gate_up_EF2D, down_EDF, w_TK)
    )
    if x_TD.shape[0] == 0 or gate_up_EF2D.shape[0] == 0:
        # No tokens or no experts (known on the host): a zero output that still connects every input to the graph.
        # Batches whose slots are all sentinels take the normal path, which yields zeros without a host sync.
        return x_TD.new_zeros(x_TD.shape) + 0 * (x_TD.sum() + gate_up_EF2D.sum() + down_EDF.sum() + w_TK.sum())
    return TritonExpertsFunction.apply(
        x_TD.contiguous(), gate_up_EF2D, down_EDF, idx_TK, w_TK, needs_grad
    )
