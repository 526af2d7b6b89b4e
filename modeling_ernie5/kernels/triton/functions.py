"""Autograd wrapper of the Triton experts kernels (ERNIE 5.0 MoE experts; research note moe_kernels.md §2.3).

One `autograd.Function` for the whole expert computation: routing prep once (`ops.sort_routing`: one sort and two
small kernels give the sorted order, positions, weights and the M-block layout), then forward = fused gather +
gate_up GEMM + SwiGLU + combine weight, down GEMM, un-permute-sum; backward = gathered dY @ Wd, fused SwiGLU backward
(which also yields the combine-weight gradient), the two weight gradients (grouped A^T B: the Triton
`grouped_gemm_tn`, or `F.grouped_mm` where that runs CUTLASS, see `weight_grads_by_grouped_mm`), dh @ Wgu and
un-permute-sum. The weights are (out, in) per expert, so the forward multiplies by their transposes and the backward
by the weights as stored. Saved for backward: x, the weights, the pre-activation h (S, 2F) and the routing layout.

Nothing on this path waits for the device (no `.item()`, no data-dependent shapes): buffers are sized for all T*K
pairs and the block layout has a host-known upper bound of blocks, so the host can queue the whole step ahead of
the GPU. (On an H200, dropping the three syncs of the first version saved 0.3-0.4 ms of a 16 ms step; the
routing's `bincount`, a sync of its own on CUDA, was replaced after that measurement.) The host still paid ~1.6 ms
per forward at T=512 for ~40 small launches, mostly the routing prep, hence `sort_routing`.

Legend: T tokens, D hidden, F expert hidden, E experts, K slots per token, S = T*K sorted pairs (routed ones first).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..cpu import decide_grouped_mm
from ...moe import refuse_second_order
from . import ops


# Which GEMM computes the two weight gradients: "auto" (PyTorch's grouped_mm where it runs CUTLASS's Hopper kernels,
# else the Triton `grouped_gemm_tn`), "grouped_mm" or "triton". Read at each forward, so it can be changed at run time.
WEIGHT_GRAD_GEMMS = ("auto", "grouped_mm", "triton")
WEIGHT_GRAD_GEMM = os.environ.get("ERNIE5_TRITON_WEIGHT_GRAD_GEMM", "auto")
# "auto" needs experts at least this wide: grouped_mm first copies the token-side operand into sorted order (bytes
# ~ S*D) to save GEMM time (~ S*D*F), so it pays only for wide experts. H200 fwd+bwd, grouped_mm vs Triton dW:
# F=1536 and F=768 13.7 vs 15.3 and 8.8 vs 9.3 ms at T=16384; F=256 2.81 vs 2.57 ms at T=32768, 1.53 vs 1.43 at 4096.
GROUPED_MM_WEIGHT_GRAD_MIN_INTER = 512


def weight_grads_by_grouped_mm(x_TD, gate_up_EF2D, down_EDF) -> bool:
    """Whether the backward computes dW with `F.grouped_mm` instead of the Triton `grouped_gemm_tn`.

    The weight gradients reduce over each expert's rows; on an H200 (bf16, ERNIE-4.5 shape, T=16384) the Triton
    kernel reached 55% of the dense matmul rate there, against ~80% for the Triton forward/dX GEMMs and ~90% for
    CUTLASS's grouped kernels behind `F.grouped_mm`, which pays for a gathered copy of one operand. "auto" takes it
    for bf16 on compute capability 9.0+ (where PyTorch runs CUTLASS rather than a loop) with 16-byte aligned rows
    and experts at least `GROUPED_MM_WEIGHT_GRAD_MIN_INTER` wide."""
    if WEIGHT_GRAD_GEMM not in WEIGHT_GRAD_GEMMS:
        raise ValueError(f"ERNIE5_TRITON_WEIGHT_GRAD_GEMM must be one of {WEIGHT_GRAD_GEMMS}, got {WEIGHT_GRAD_GEMM!r}")

    def auto(x):
        return (
            x.is_cuda
            and x.dtype == torch.bfloat16
            and down_EDF.shape[2] >= GROUPED_MM_WEIGHT_GRAD_MIN_INTER
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
        )

    return decide_grouped_mm(WEIGHT_GRAD_GEMM, "weight gradients by", auto, x_TD, gate_up_EF2D, down_EDF)


def _triton_weight_grad(a, b, token_S, counts_E, offsets_E, out_dtype, gather_a):
    """Per-expert `a[rows_e]^T b[rows_e]` with one side read through the token index (sorted rows on the other)."""
    gather = dict(a_gather=token_S) if gather_a else dict(b_gather=token_S)
    return ops.grouped_gemm_tn(a, b, counts_E, offsets_E, out_dtype, **gather)


def _grouped_mm_weight_grad(a, b, token_S, counts_E, offsets_E, out_dtype, gather_a):
    """The same through `F.grouped_mm` (groups along the reduced rows): the gathered side is copied to sorted order
    first. Rows past the routed ones (sentinels, never written) lie beyond the last offset and are not read."""
    if gather_a:
        a = a.index_select(0, token_S)
    else:
        b = b.index_select(0, token_S)
    return F.grouped_mm(a.t(), b, offs=offsets_E.to(torch.int32)).to(out_dtype)


class TritonExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, gate_up_EF2D, down_EDF, idx_TK, w_TK, store_h):
        num_tokens, top_k = idx_TK.shape
        # Buffers hold all T*K pairs, so nothing waits for the device to say how many are routed: sentinel pairs
        # sort to the tail, no M-block covers them and their rows are never read.
        num_rows = num_tokens * top_k
        routing = ops.sort_routing(idx_TK, w_TK, gate_up_EF2D.shape[0], x_TD.dtype)
        # The weights are (out, in) per expert; the GEMMs take B as (E, in, out), i.e. their transposed views.
        a_SF, h_SF2 = ops.grouped_gemm(
            x_TD, gate_up_EF2D.transpose(1, 2), routing.layout, num_rows, gather=routing.token_S, swiglu=True,
            w_S=routing.w_S, store_h=store_h,
        )
        y_SD, _ = ops.grouped_gemm(a_SF, down_EDF.transpose(1, 2), routing.layout, num_rows)
        del a_SF
        out_TD = ops.unpermute_sum(y_SD, routing.pos_TK, x_TD.dtype)
        ctx.save_for_backward(x_TD, gate_up_EF2D, down_EDF, w_TK, h_SF2, routing.w_S, routing.token_S,
                              routing.order_S, routing.pos_TK, routing.counts_E, routing.offsets_E,
                              *routing.layout[:3])
        ctx.block_m = routing.layout[3]
        # Decided here, where the weights' dtype and device are known; inference (no backward) skips it.
        ctx.weight_grads_by_grouped_mm = store_h and weight_grads_by_grouped_mm(x_TD, gate_up_EF2D, down_EDF)
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        refuse_second_order("the 'triton' experts back-end", "use experts_backend='reference'")
        (x_TD, gate_up_EF2D, down_EDF, w_TK, h_SF2, w_S, token_S, order_S, pos_TK,
         counts_E, offsets_E, *layout) = ctx.saved_tensors
        if h_SF2 is None:
            raise RuntimeError("the Triton experts forward ran without storing activations (no grad was needed)")
        layout = (*layout, ctx.block_m)
        num_rows = token_S.shape[0]
        need_x, need_gu, need_down, _, need_w = ctx.needs_input_grad[:5]
        dout_TD = dout_TD.contiguous().to(x_TD.dtype)  # also densifies broadcast gradients from `.sum()`
        g_SF, _ = ops.grouped_gemm(dout_TD, down_EDF, layout, num_rows, gather=token_S)  # dY W_down
        dh_SF2, aw_SF, dw_flat = ops.swiglu_backward(g_SF, h_SF2, w_S, offsets_E[-1:], order_S, w_TK.dtype)
        del g_SF
        weight_grad = _grouped_mm_weight_grad if ctx.weight_grads_by_grouped_mm else _triton_weight_grad
        d_down = (
            weight_grad(dout_TD, aw_SF, token_S, counts_E, offsets_E, down_EDF.dtype, gather_a=True)
            if need_down
            else None
        )
        del aw_SF
        d_gate_up = (
            weight_grad(dh_SF2, x_TD, token_S, counts_E, offsets_E, gate_up_EF2D.dtype, gather_a=False)
            if need_gu
            else None
        )
        dx_TD = None
        if need_x:
            dx_SD, _ = ops.grouped_gemm(dh_SF2, gate_up_EF2D, layout, num_rows)  # dh W_gate_up
            dx_TD = ops.unpermute_sum(dx_SD, pos_TK, x_TD.dtype)
        dw_TK = dw_flat.view_as(w_TK) if need_w else None  # already in (token, slot) order, 0 for sentinels
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
