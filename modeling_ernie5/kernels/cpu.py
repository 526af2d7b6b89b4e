"""Fast PyTorch experts back-end (CPU, and any device without Triton): sorted grouped matmuls with their own autograd.

Implements the expert computation of the ERNIE 5.0 MoE layer (paper §2.1; DESIGN.md §3) as in the research note
moe_kernels.md §4: sort the (token, slot) pairs by expert once, gather the token rows, run the gate_up and down
matmuls over each expert's contiguous slice, apply SwiGLU and the combine weight, and scatter-add back to tokens.

Why a hand-written `autograd.Function` rather than autograd over slices:
- indexing a 3D expert parameter under autograd (`W[e]`) makes every expert zero-fill a gradient the size of the
  whole parameter; here each expert's weight gradient is written straight into its slice of one buffer;
- only `x` (already alive), the pre-activation `h_SF2` and the routing layout are saved: the SwiGLU output, the
  gathered inputs and the expert outputs are recomputed or never kept, so peak memory stays below the reference;
- the combine weight is folded into the (S, F) activation before the down matmul, which is cheaper than scaling
  the (S, D) output when F < D, and its gradient is read off the backward's own intermediate
  (d w_s = <dout_t Wd_e^T, a_s>), so the expert outputs are not stored.

Matmuls run through `torch.nn.functional.grouped_mm` where its CPU kernel accepts the inputs (fp32/bf16/fp16,
16-byte aligned strides) and otherwise through a loop of `torch.mm(..., out=slice)` (float64, odd widths).

Legend: T tokens, D hidden, F expert hidden, E experts, K slots per token, S sorted (token, slot) pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .routing import ExpertGroups, group_by_expert

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Which matmul driver the back-end uses: "auto" (grouped_mm when it can run, else the loop), "grouped_mm", "loop".
MATMUL_DRIVERS = ("auto", "grouped_mm", "loop")


def _aligned(t: torch.Tensor) -> bool:
    if t.data_ptr() % 16:
        return False
    return all(s == 1 or (s * t.element_size()) % 16 == 0 for s in t.stride())


def use_grouped_mm(driver: str, groups: ExpertGroups, x_TD, gate_up_EDF2, down_EFD) -> bool:
    """Decide once per call whether `F.grouped_mm` drives the matmuls (forward and backward alike).

    It needs fp32/bf16/fp16 and 16-byte aligned rows; every intermediate is a fresh contiguous (rows, D), (rows, F)
    or (rows, 2F) tensor, so checking the widths and the weights suffices. On CPU it runs one `mm` per expert,
    empty or not (~4 ms per call for 64 experts at decode), so "auto" prefers the loop over the non-empty experts
    when at most half of them have rows.
    """
    if driver == "loop" or not hasattr(F, "grouped_mm"):
        return False
    itemsize = x_TD.element_size()
    ok = (
        x_TD.dtype in _GROUPED_MM_DTYPES
        and gate_up_EDF2.dtype == down_EFD.dtype == x_TD.dtype
        and (x_TD.shape[1] * itemsize) % 16 == 0
        and (down_EFD.shape[1] * itemsize) % 16 == 0
        and _aligned(gate_up_EDF2)
        and _aligned(down_EFD)
    )
    if driver == "grouped_mm":
        if not ok:
            raise ValueError("matmul driver 'grouped_mm' needs fp32/bf16/fp16 inputs with 16-byte aligned strides")
        return True
    if ok and x_TD.device.type == "cpu":
        active = int((groups.counts_E > 0).sum())
        return 2 * active > groups.counts_E.shape[0]
    return ok


def grouped_matmul(a_SK: torch.Tensor, b_EKN: torch.Tensor, groups: ExpertGroups, grouped: bool) -> torch.Tensor:
    """Rows of expert e times `b_EKN[e]`: (S, K) x (E, K, N) -> (S, N), only the first `groups.num_valid` rows."""
    if grouped:
        return F.grouped_mm(a_SK, b_EKN, offs=groups.offsets_E.to(torch.int32))
    out_SN = a_SK.new_empty(a_SK.shape[0], b_EKN.shape[-1])
    start = 0
    for e, n in enumerate(groups.counts_E.tolist()):  # sync point: slice bounds on the host
        if n:
            torch.mm(a_SK[start : start + n], b_EKN[e], out=out_SN[start : start + n])
            start += n
    return out_SN


def grouped_matmul_tn(a_SM: torch.Tensor, b_SN: torch.Tensor, groups: ExpertGroups, grouped: bool) -> torch.Tensor:
    """Per-expert `a_e^T @ b_e` over each expert's rows (weight gradients): (S, M), (S, N) -> (E, M, N).

    Experts with no rows get zeros."""
    num_experts = groups.counts_E.shape[0]
    a_MS = a_SM.t()
    if grouped:
        return F.grouped_mm(a_MS, b_SN, offs=groups.offsets_E.to(torch.int32))
    out_EMN = a_SM.new_empty(num_experts, a_SM.shape[1], b_SN.shape[1])
    start = 0
    for e, n in enumerate(groups.counts_E.tolist()):  # sync point: slice bounds on the host
        if n:
            torch.mm(a_MS[:, start : start + n], b_SN[start : start + n], out=out_EMN[e])
            start += n
        else:
            out_EMN[e].zero_()
    return out_EMN


def _forward_weight(w_EKN: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The right operand of a forward GEMM, column-major for half types on CPU when the batch is large enough.

    CPUs without native bf16/fp16 matmul (AVX2) multiply `a @ b` several times faster when `b` is the
    transpose of a contiguous matrix, the layout the backward's `W^T` views already have (measured 7x for bf16
    512^3 on an AVX2 EPYC). One transposed copy of the weights costs a pass over them, which only pays when each
    expert sees a few rows, so decode-sized calls keep the stored layout.
    """
    if w_EKN.device.type != "cpu" or w_EKN.dtype not in (torch.bfloat16, torch.float16):
        return w_EKN
    if num_rows < 4 * w_EKN.shape[0]:
        return w_EKN
    return w_EKN.transpose(1, 2).contiguous().transpose(1, 2)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    # Sums over k (and over experts for dx) run in fp32 for half types, like transformers' reshape+sum.
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class SortedExpertsFunction(torch.autograd.Function):
    """out_TD = sum_k w_TK * SwiGLU_e(x_TD) through sorted grouped matmuls; see the module docstring."""

    @staticmethod
    def forward(ctx, x_TD, gate_up_EDF2, down_EFD, idx_TK, w_TK, driver):
        num_tokens, hidden = x_TD.shape
        num_experts, _, two_f = gate_up_EDF2.shape
        inter = two_f // 2
        groups = group_by_expert(idx_TK, num_experts)
        grouped = use_grouped_mm(driver, groups, x_TD, gate_up_EDF2, down_EFD)
        order_S, token_S = groups.valid_order, groups.valid_token
        out_TD = torch.zeros(num_tokens, hidden, dtype=_accumulate_dtype(x_TD.dtype), device=x_TD.device)
        h_SF2 = x_TD.new_empty(0, two_f)
        if groups.num_valid:
            x_SD = x_TD.index_select(0, token_S)
            h_SF2 = grouped_matmul(x_SD, _forward_weight(gate_up_EDF2, groups.num_valid), groups, grouped)[: groups.num_valid]
            del x_SD
            w_S = w_TK.reshape(-1).index_select(0, order_S).to(x_TD.dtype)
            a_SF = F.silu(h_SF2[:, :inter])
            a_SF.mul_(h_SF2[:, inter:]).mul_(w_S[:, None])  # combine weight folded into the (S, F) activation
            y_SD = grouped_matmul(a_SF, _forward_weight(down_EFD, groups.num_valid), groups, grouped)[: groups.num_valid]
            out_TD.index_add_(0, token_S, y_SD.to(out_TD.dtype))
        ctx.save_for_backward(x_TD, gate_up_EDF2, down_EFD, w_TK, h_SF2)
        ctx.groups = groups
        ctx.grouped = grouped
        return out_TD.to(x_TD.dtype)

    @staticmethod
    def backward(ctx, dout_TD):
        x_TD, gate_up_EDF2, down_EFD, w_TK, h_SF2 = ctx.saved_tensors
        groups, grouped = ctx.groups, ctx.grouped
        need_x, need_gu, need_down, _, need_w = ctx.needs_input_grad[:5]
        num_tokens, hidden = x_TD.shape
        num_experts, _, two_f = gate_up_EDF2.shape
        inter = two_f // 2
        dx_TD = d_gate_up = d_down = dw_TK = None
        if groups.num_valid == 0:
            # No real expert was hit: every gradient is exactly zero.
            return (
                torch.zeros_like(x_TD) if need_x else None,
                torch.zeros_like(gate_up_EDF2) if need_gu else None,
                torch.zeros_like(down_EFD) if need_down else None,
                None,
                torch.zeros_like(w_TK) if need_w else None,
                None,
            )
        order_S, token_S = groups.valid_order, groups.valid_token
        # A broadcast (0-stride) upstream gradient, as from `.sum().backward()`, is made dense once here.
        dout_SD = dout_TD.contiguous().to(x_TD.dtype).index_select(0, token_S)
        w_S = w_TK.reshape(-1).index_select(0, order_S).to(x_TD.dtype)

        g_SF = grouped_matmul(dout_SD, down_EFD.transpose(1, 2), groups, grouped)[: groups.num_valid]
        gate_SF, up_SF = h_SF2[:, :inter], h_SF2[:, inter:]
        sig_SF = torch.sigmoid(gate_SF)
        silu_SF = gate_SF * sig_SF
        a_SF = silu_SF * up_SF
        if need_w:
            acc = _accumulate_dtype(x_TD.dtype)
            dw_S = (g_SF.to(acc) * a_SF.to(acc)).sum(-1)  # = <dout_t, y_s>: d out / d w for this pair
            dw_TK = torch.zeros(w_TK.numel(), dtype=w_TK.dtype, device=w_TK.device)
            dw_TK[order_S] = dw_S.to(w_TK.dtype)
            dw_TK = dw_TK.view_as(w_TK)
        if need_down:
            a_SF.mul_(w_S[:, None])
            d_down = grouped_matmul_tn(a_SF, dout_SD, groups, grouped).to(down_EFD.dtype)
        del a_SF, dout_SD
        if need_x or need_gu:
            g_SF.mul_(w_S[:, None])  # now d a_SF
            dh_SF2 = h_SF2.new_empty(groups.num_valid, two_f)
            torch.mul(g_SF, silu_SF, out=dh_SF2[:, inter:])
            # silu'(g) = s * (1 + g * (1 - s)), in one buffer with in-place steps
            dsilu_SF = torch.neg(sig_SF).add_(1).mul_(gate_SF).add_(1).mul_(sig_SF)
            torch.mul(g_SF, up_SF, out=dh_SF2[:, :inter]).mul_(dsilu_SF)
            del dsilu_SF, sig_SF, silu_SF, g_SF
            if need_gu:
                x_SD = x_TD.index_select(0, token_S)
                d_gate_up = grouped_matmul_tn(x_SD, dh_SF2, groups, grouped).to(gate_up_EDF2.dtype)
                del x_SD
            if need_x:
                dx_SD = grouped_matmul(dh_SF2, gate_up_EDF2.transpose(1, 2), groups, grouped)[: groups.num_valid]
                dx_TD = torch.zeros(num_tokens, hidden, dtype=_accumulate_dtype(x_TD.dtype), device=x_TD.device)
                dx_TD.index_add_(0, token_S, dx_SD.to(dx_TD.dtype))
                dx_TD = dx_TD.to(x_TD.dtype)
        return dx_TD, d_gate_up, d_down, None, dw_TK, None


def sorted_experts_forward(
    x_TD: torch.Tensor,
    gate_up_EDF2: torch.Tensor,
    down_EFD: torch.Tensor,
    idx_TK: torch.Tensor,
    w_TK: torch.Tensor,
    driver: str = "auto",
) -> torch.Tensor:
    """Experts back-end `"cpu"`: same contract as `modeling_ernie5.moe.reference_experts_forward`.

    Args:
        x_TD (`torch.Tensor` of shape `(T, D)`): token hidden states.
        gate_up_EDF2 (`torch.Tensor` of shape `(E, D, 2F)`): `[gate | up]` weights.
        down_EFD (`torch.Tensor` of shape `(E, F, D)`): down weights.
        idx_TK (`torch.LongTensor` of shape `(T, K)`): chosen experts; `>= E` marks an empty slot.
        w_TK (`torch.Tensor` of shape `(T, K)`): combine weights (0 at empty slots).
        driver (`str`, *optional*, defaults to `"auto"`): matmul driver, one of `MATMUL_DRIVERS`.
    """
    if driver not in MATMUL_DRIVERS:
        raise ValueError(f"unknown matmul driver {driver!r}; choose one of {MATMUL_DRIVERS}")
    if x_TD.shape[0] == 0:
        # Keep the autograd graph connected so an empty batch still yields (zero) gradients.
        return x_TD.new_zeros(x_TD.shape) + 0 * (x_TD.sum() + gate_up_EDF2.sum() + down_EFD.sum() + w_TK.sum())
    return SortedExpertsFunction.apply(x_TD, gate_up_EDF2, down_EFD, idx_TK, w_TK, driver)


def cpu_backend_available(x: torch.Tensor) -> bool:
    """The sorted back-end is plain PyTorch: it runs on any device and floating dtype."""
    return x.is_floating_point()
