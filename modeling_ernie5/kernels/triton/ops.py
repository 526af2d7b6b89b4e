"""Triton kernels and their launchers for the ERNIE 5.0 experts (research note moe_kernels.md §2.3).

The layout is the sorted one of `..routing.ExpertGroups`: the (token, slot) pairs of a call sorted by expert, each
expert a contiguous run of rows. The kernels never materialise a permuted copy of the tokens:

- `grouped_gemm`: C[r] = A[gather[r] or r] @ B[expert(r)] over M-blocks that each belong to one expert
  (vLLM-style block metadata; only the block *indices* are padded, never the data). The gather (permute) is fused
  into the A load; B may be any strided view, so the (out, in) weights enter the forward transposed without copies. With
  `swiglu=True` one launch computes both the gate and the up tile and writes `silu(gate) * up * w` (the
  combine weight applied in the epilogue) plus, for training, the pre-activation `h`.
- `grouped_gemm_tn`: per-expert C[e] = A[rows_e]^T @ B[rows_e] with either side gathered (weight gradients,
  ScatterMoE's `groupXtY`).
- `swiglu_backward`: from g = dY_s Wd and h, writes dh (weighted), the weighted activation for dWd and the
  combine-weight gradient <g, silu(gate) * up> in one pass.
- `unpermute_sum`: out[t] = sum_k Y[pos[t, k]], a deterministic gather-reduce instead of atomic scatter-adds.

Numerics: every product accumulates in fp32 (fp64 for fp64 inputs). bf16/fp16 operands go to `tl.dot` as they
are on a GPU (tensor cores) but are up-cast first under the interpreter, which cannot do bf16 arithmetic; fp32
`tl.dot` uses IEEE precision (no TF32) so GPU results match the interpreter and the reference.
Only the launchers below are called from outside (by `functions.py`).

Legend: T tokens, D hidden, F expert hidden, E experts, K slots per token, S sorted pairs, NB M-blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..routing import group_by_expert

# Read once, when this module is imported (the same moment `@triton.jit` decides interpreter vs. compiler).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter computes on bf16/fp16 bit patterns; fp32/fp64 are "upcast" to themselves (a no-op).
    return INTERPRETED or dtype in (torch.float32, torch.float64)


# Autotuning compiles every candidate tile once per new key (sizes, BLOCK_M, dtypes): worth it for a long run, not
# for a correctness pass over many small shapes or a quick start. `ERNIE5_TRITON_AUTOTUNE=0` (or setting `AUTOTUNE`
# on this module before a launch) uses the one fixed tile below instead.
AUTOTUNE = os.environ.get("ERNIE5_TRITON_AUTOTUNE", "1") not in ("", "0")

if INTERPRETED:  # the interpreter accepts exactly one autotune config; the fixed tiles differ to exercise the masks
    GEMM_TILES = SWIGLU_TILES = [(32, 32, 4, 1)]
    TN_TILES = [(32, 32, 32, 4, 1)]
    FIXED_GEMM_TILE = dict(BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)
    FIXED_TN_TILE = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_R=16, num_warps=1, num_stages=1)
else:
    # (BLOCK_N, BLOCK_K, warps, stages); BLOCK_M comes from the routing (`pick_block_m`). The SwiGLU variant keeps
    # two accumulators, so its BLOCK_N stops at 128 (a 128 x 256 output tile per program, gate and up together).
    SWIGLU_TILES = [(64, 32, 4, 3), (128, 32, 4, 4), (128, 64, 8, 3), (64, 64, 4, 4), (128, 64, 8, 4)]
    GEMM_TILES = SWIGLU_TILES + [(256, 64, 8, 3), (256, 64, 8, 4)]
    TN_TILES = [
        (64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 4),
    ]
    FIXED_GEMM_TILE = dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    FIXED_TN_TILE = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_R=32, num_warps=4, num_stages=3)


def _gemm_configs(tiles):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in tiles]


def _tn_configs(tiles):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": br}, num_warps=w, num_stages=s)
        for bm, bn, br, w, s in tiles
    ]


# --------------------------------------------------------------------------------------------- grouped GEMM


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, h_ptr, w_ptr, gather_ptr,
    block_expert_ptr, block_row_ptr, block_end_ptr,
    N, K,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn, stride_hm,
    GATHER: tl.constexpr, SWIGLU: tl.constexpr, STORE_H: tl.constexpr, UPCAST: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # N-tiles of one M-block run next to each other, so the gathered A block is read from memory once and the
    # expert's weights (a few MB) stay in L2 across that expert's M-blocks.
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // tiles_n
    pid_n = tl.program_id(0) % tiles_n
    row0 = tl.load(block_row_ptr + pid_m)
    row_end = tl.load(block_end_ptr + pid_m)
    if row0 >= row_end:  # a spare block: the grid is sized before the device knows how many blocks there are
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    if GATHER:
        a_rows = tl.load(gather_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    b_base = b_ptr + expert * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(a.to(ACC), b.to(ACC), input_precision="ieee", out_dtype=ACC)
        else:
            acc += tl.dot(a, b, out_dtype=ACC)
        if SWIGLU:
            # The up half sits N columns after the gate half of the same [gate | up] weight.
            b_up = tl.load(b_base + ks[:, None] * stride_bk + (cols[None, :] + N) * stride_bn,
                           mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST:
                acc_up += tl.dot(a.to(ACC), b_up.to(ACC), input_precision="ieee", out_dtype=ACC)
            else:
                acc_up += tl.dot(a, b_up, out_dtype=ACC)
    out_mask = row_mask[:, None] & col_mask[None, :]
    if SWIGLU:
        if STORE_H:
            h_offs = rows[:, None].to(tl.int64) * stride_hm + cols[None, :]
            tl.store(h_ptr + h_offs, acc.to(h_ptr.dtype.element_ty), mask=out_mask)
            tl.store(h_ptr + h_offs + N, acc_up.to(h_ptr.dtype.element_ty), mask=out_mask)
        w = tl.load(w_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up * w[:, None]
    c_offs = rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)


_GEMM_KEY = ["N", "K", "SWIGLU", "BLOCK_M"]
_grouped_gemm_tuned = triton.autotune(configs=_gemm_configs(GEMM_TILES), key=_GEMM_KEY)(_grouped_gemm_kernel)
_grouped_gemm_swiglu_tuned = triton.autotune(configs=_gemm_configs(SWIGLU_TILES), key=_GEMM_KEY)(_grouped_gemm_kernel)


def max_blocks(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the M-blocks of `num_rows` rows over `num_experts` runs (each run adds at most one partial
    block, and every block holds a row): the grid size, known on the host without reading the routing."""
    return min(triton.cdiv(num_rows, block_m) + num_experts, num_rows)


@triton.jit
def _count_at_most(sorted_ptr, num_rows, values, search_steps):
    # Vectorised binary search: for each value, how many of the sorted ids are <= it (searchsorted, right=True).
    lo = tl.zeros_like(values)
    hi = lo + num_rows
    for _ in range(search_steps):
        active = lo < hi
        mid = (lo + hi) // 2
        ids = tl.load(sorted_ptr + mid, mask=active, other=0)
        right = active & (ids <= values)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def _route_rows_kernel(
    order_ptr, sorted_ptr, w_ptr, token_ptr, pos_ptr, w_out_ptr, num_rows, num_experts, top_k,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < num_rows
    slot = tl.load(order_ptr + rows, mask=mask, other=0)
    expert = tl.load(sorted_ptr + rows, mask=mask, other=0)
    tl.store(token_ptr + rows, slot // top_k, mask=mask)
    # Every slot appears once in `order`, so this scatter fills the whole (T*K) position table.
    tl.store(pos_ptr + slot, tl.where(expert < num_experts, rows.to(tl.int64), -1), mask=mask)
    w = tl.load(w_ptr + slot, mask=mask, other=0.0)
    tl.store(w_out_ptr + rows, w.to(w_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _block_layout_kernel(
    sorted_ptr, offsets_ptr, counts_ptr, block_expert_ptr, block_row_ptr, block_end_ptr,
    num_rows, num_experts, num_blocks, search_steps,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # Each program rebuilds the small per-expert table (E is tens to hundreds: two binary searches and a cumsum) and
    # fills BLOCK_B entries of the M-block table; one launch replaces a dozen small PyTorch ops on the host, and the
    # programs run side by side instead of one program walking every block (40-90 us at T=16384 on an H200).
    experts = tl.arange(0, BLOCK_E)
    e_mask = experts < num_experts
    end = _count_at_most(sorted_ptr, num_rows, experts, search_steps)
    start = _count_at_most(sorted_ptr, num_rows, experts - 1, search_steps)
    counts = tl.where(e_mask, end - start, 0)
    if tl.program_id(0) == 0:
        tl.store(offsets_ptr + experts, end.to(tl.int64), mask=e_mask)
        tl.store(counts_ptr + experts, counts.to(tl.int64), mask=e_mask)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    last = tl.cumsum(blocks, 0)  # one past each expert's last M-block
    first = last - blocks
    routed = tl.max(tl.where(e_mask, end, 0), 0)
    block = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    # Exactly one expert owns each used block; empty experts (first == last) own none, spare blocks have none.
    owns = (first[None, :] <= block[:, None]) & (block[:, None] < last[None, :])
    used = tl.sum(owns.to(tl.int32), 1) > 0
    owner = tl.sum(tl.where(owns, experts[None, :], 0), 1)
    row = tl.sum(tl.where(owns, start[None, :] + (block[:, None] - first[None, :]) * BLOCK_M, 0), 1)
    row_end = tl.sum(tl.where(owns, end[None, :], 0), 1)
    b_mask = block < num_blocks
    tl.store(block_expert_ptr + block, tl.where(used, owner, num_experts - 1), mask=b_mask)
    tl.store(block_row_ptr + block, tl.where(used, row, routed), mask=b_mask)
    tl.store(block_end_ptr + block, tl.where(used, row_end, routed), mask=b_mask)


@dataclass
class SortedRouting:
    """One MoE call's (token, slot) pairs sorted by expert, as the kernels read them (S = T*K rows, routed first).

    `pos_TK[t, k]` is the sorted row of slot (t, k) or -1 for a sentinel slot; `w_S` the combine weights in sorted
    order; `counts_E` / `offsets_E` rows per expert and one past each expert's last row; `layout` the M-block
    metadata `(block_expert, block_row, block_end, block_m)`: for every block of at most `block_m` rows inside one
    expert's run, its expert, first row and the end of that run. There are `max_blocks(S, E, block_m)` blocks; the
    spare ones at the end have first row == end, and the kernels return at once for them.
    """

    order_S: torch.Tensor
    token_S: torch.Tensor
    pos_TK: torch.Tensor
    w_S: torch.Tensor
    counts_E: torch.Tensor
    offsets_E: torch.Tensor
    layout: tuple


def sort_routing(idx_TK: torch.Tensor, w_TK: torch.Tensor, num_experts: int, dtype: torch.dtype) -> SortedRouting:
    """Sort the (token, slot) pairs by expert and build everything the grouped kernels need, without a host sync:
    one stable sort (rows of one expert keep token order, so results match the reference loop) and two launches,
    instead of ~30 small PyTorch ops, whose host cost dominated a call below T ~ 4096 on an H200."""
    num_tokens, top_k = idx_TK.shape
    num_rows = num_tokens * top_k
    device = idx_TK.device
    sorted_S, order_S = torch.sort(idx_TK.reshape(-1).clamp(max=num_experts), stable=True)
    token_S = torch.empty_like(order_S)
    pos_TK = torch.empty_like(order_S)
    w_S = torch.empty(num_rows, dtype=dtype, device=device)
    per_expert = torch.empty(2, num_experts, dtype=torch.int64, device=device)
    block_m = pick_block_m(num_rows, num_experts)
    num_blocks = max_blocks(num_rows, num_experts, block_m)
    blocks = torch.empty(3, num_blocks, dtype=torch.int32, device=device)
    if num_rows > 0:
        block = 32 if INTERPRETED else 256
        _route_rows_kernel[(triton.cdiv(num_rows, block),)](
            order_S, sorted_S, w_TK.reshape(-1), token_S, pos_TK, w_S, num_rows, num_experts, top_k, BLOCK=block,
        )
        block_e = max(16, triton.next_power_of_2(num_experts))
        # Small block groups under the interpreter, so that the tests' few blocks still span several programs.
        block_b = 8 if INTERPRETED else max(1, min(64, 8192 // block_e))
        _block_layout_kernel[(triton.cdiv(num_blocks, block_b),)](
            sorted_S, per_expert[0], per_expert[1], blocks[0], blocks[1], blocks[2],
            num_rows, num_experts, num_blocks, num_rows.bit_length(),
            BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_B=block_b,
        )
    else:
        per_expert.zero_()
    return SortedRouting(
        order_S=order_S, token_S=token_S, pos_TK=pos_TK.view(num_tokens, top_k), w_S=w_S,
        offsets_E=per_expert[0], counts_E=per_expert[1], layout=(blocks[0], blocks[1], blocks[2], block_m),
    )


def sort_routing_reference(
    idx_TK: torch.Tensor, w_TK: torch.Tensor, num_experts: int, dtype: torch.dtype, block_m: int
) -> SortedRouting:
    """What `sort_routing` computes, in plain PyTorch ops (with host syncs): the definition its kernels are checked
    against, exactly, by the tests and by `benchmarks/gpu_followup.py` at full sizes. `block_m` is taken from the
    result under test, since `pick_block_m` depends on whether Triton is interpreted."""
    num_tokens, top_k = idx_TK.shape
    device = idx_TK.device
    groups = group_by_expert(idx_TK, num_experts)
    order_S, offsets_E, counts_E = groups.order_S, groups.offsets_E, groups.counts_E
    pos_TK = torch.empty_like(order_S)
    pos_TK[order_S] = torch.arange(order_S.numel(), device=device)
    pos_TK = pos_TK.view(num_tokens, top_k).masked_fill(idx_TK >= num_experts, -1)
    # M-blocks: expert e owns blocks [first_e, last_e), each starting block_m rows after the previous one.
    last_E = ((counts_E + block_m - 1) // block_m).cumsum(0)
    used = int(last_E[-1]) if num_experts else 0
    block_B = torch.arange(used, device=device)
    owner_B = torch.searchsorted(last_E, block_B, right=True)
    first_E = last_E - (counts_E + block_m - 1) // block_m
    row_B = (offsets_E - counts_E)[owner_B] + (block_B - first_E[owner_B]) * block_m
    # Spare blocks (up to the host-side bound) point at the end of the routed rows, under the last expert.
    routed = int(offsets_E[-1]) if num_experts else 0
    spare = max_blocks(order_S.numel(), num_experts, block_m) - used
    pad = lambda t, value: torch.cat([t, t.new_full((spare,), value)]).to(torch.int32)  # noqa: E731
    layout = (pad(owner_B, num_experts - 1), pad(row_B, routed), pad(offsets_E[owner_B], routed), block_m)
    return SortedRouting(
        order_S=order_S, token_S=groups.token_S, pos_TK=pos_TK, w_S=w_TK.reshape(-1)[order_S].to(dtype),
        counts_E=counts_E, offsets_E=offsets_E, layout=layout,
    )


def routing_mismatches(got: SortedRouting, want: SortedRouting) -> list[str]:
    """Names of the fields (the three block tables included) where two routings differ; exact comparison."""
    names = ("order_S", "token_S", "pos_TK", "w_S", "counts_E", "offsets_E")
    pairs = [(name, getattr(got, name), getattr(want, name)) for name in names]
    pairs += zip(("block_expert", "block_row", "block_end", "block_m"), got.layout, want.layout)
    same = lambda a, b: torch.equal(a.cpu(), b.cpu()) if torch.is_tensor(a) else a == b  # noqa: E731
    return [name for name, a, b in pairs if not same(a, b)]


def pick_block_m(num_rows: int, num_experts: int) -> int:
    """Rows per M-block: small when experts see few tokens (decode), large when they are GEMM-sized."""
    if INTERPRETED:
        return 32
    per_expert = num_rows / max(num_experts, 1)
    return 16 if per_expert <= 16 else 64 if per_expert <= 256 else 128


def grouped_gemm(
    a: torch.Tensor,
    b_EKN: torch.Tensor,
    layout,
    num_rows: int,
    gather: torch.Tensor | None = None,
    swiglu: bool = False,
    w_S: torch.Tensor | None = None,
    store_h: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grouped GEMM over the sorted rows; returns `(C, h)` where `h` is only set for `swiglu=True, store_h=True`.

    Args:
        a: (rows of A, K); row r of the output reads A[gather[r]] if `gather` is given, else A[r].
        b_EKN: (E, K, N') per-expert right operand (any strides). With `swiglu`, N' = 2N holding [gate | up].
        layout: `(block_expert, block_row, block_end, block_m)`, `SortedRouting.layout`.
        num_rows: S, the number of sorted rows (output rows).
        w_S: (S,) combine weights, applied in the SwiGLU epilogue.
    """
    block_expert, block_row, block_end, block_m = layout
    num_k = a.shape[1]
    if b_EKN.shape[1] != num_k:
        raise ValueError(f"inner sizes differ: A has {num_k}, B has {b_EKN.shape[1]}")
    n_out = b_EKN.shape[2] // 2 if swiglu else b_EKN.shape[2]
    c = a.new_empty(num_rows, n_out)
    h = a.new_empty(num_rows, 2 * n_out) if (swiglu and store_h) else None
    if num_rows == 0 or block_expert.numel() == 0:
        return c, h
    dummy = c
    grid = lambda meta: (block_expert.numel() * triton.cdiv(n_out, meta["BLOCK_N"]),)  # noqa: E731
    tuned = _grouped_gemm_swiglu_tuned if swiglu else _grouped_gemm_tuned
    kernel, tile = (tuned, {}) if AUTOTUNE else (_grouped_gemm_kernel, FIXED_GEMM_TILE)
    kernel[grid](
        a, b_EKN, c, h if h is not None else dummy, w_S if w_S is not None else dummy,
        gather if gather is not None else block_row,
        block_expert, block_row, block_end,
        n_out, num_k,
        a.stride(0), a.stride(1), b_EKN.stride(0), b_EKN.stride(1), b_EKN.stride(2), c.stride(0), c.stride(1),
        h.stride(0) if h is not None else 0,
        GATHER=gather is not None, SWIGLU=swiglu, STORE_H=h is not None, UPCAST=_upcast(a.dtype),
        ACC=_acc_dtype(a.dtype), BLOCK_M=block_m, **tile,
    )
    return c, h


# ------------------------------------------------------------------------------------- grouped A^T B (dW)


@triton.jit
def _grouped_gemm_tn_kernel(
    a_ptr, b_ptr, c_ptr, a_gather_ptr, b_gather_ptr, offsets_ptr, counts_ptr,
    M, N,
    stride_ar, stride_am, stride_br, stride_bn, stride_ce, stride_cm, stride_cn,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # All tiles of one expert before the next expert: that expert's rows of A and B (a few MB) stay in L2 while
    # its tiles run, instead of every tile re-reading them from memory.
    tile = tl.program_id(0)
    expert = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    ms = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M
    n_mask = ns < N
    end = tl.load(offsets_ptr + expert)
    start = end - tl.load(counts_ptr + expert)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_mask = rows < end
        if A_GATHER:
            a_rows = tl.load(a_gather_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        if B_GATHER:
            b_rows = tl.load(b_gather_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        else:
            b_rows = rows.to(tl.int64)
        # A^T tile loaded directly as (BLOCK_M, BLOCK_R): no transpose of data.
        a_t = tl.load(a_ptr + a_rows[None, :] * stride_ar + ms[:, None] * stride_am,
                      mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_br + ns[None, :] * stride_bn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(a_t.to(ACC), b.to(ACC), input_precision="ieee", out_dtype=ACC)
        else:
            acc += tl.dot(a_t, b, out_dtype=ACC)
    c_offs = expert * stride_ce + ms[:, None] * stride_cm + ns[None, :] * stride_cn
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_grouped_gemm_tn_tuned = triton.autotune(configs=_tn_configs(TN_TILES), key=["M", "N"])(_grouped_gemm_tn_kernel)


def grouped_gemm_tn(
    a: torch.Tensor,
    b: torch.Tensor,
    counts_E: torch.Tensor,
    offsets_E: torch.Tensor,
    out_dtype: torch.dtype,
    a_gather: torch.Tensor | None = None,
    b_gather: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert `A[rows_e]^T @ B[rows_e]` -> (E, M, N); sorted row r reads A[a_gather[r]] / B[b_gather[r]]."""
    num_experts = counts_E.shape[0]
    m, n = a.shape[1], b.shape[1]
    c = torch.empty(num_experts, m, n, dtype=out_dtype, device=a.device)
    if num_experts == 0:
        return c

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), num_experts)

    kernel, tile = (_grouped_gemm_tn_tuned, {}) if AUTOTUNE else (_grouped_gemm_tn_kernel, FIXED_TN_TILE)
    kernel[grid](
        a, b, c,
        a_gather if a_gather is not None else offsets_E, b_gather if b_gather is not None else offsets_E,
        offsets_E, counts_E,
        m, n,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), c.stride(2),
        A_GATHER=a_gather is not None, B_GATHER=b_gather is not None, UPCAST=_upcast(a.dtype),
        ACC=_acc_dtype(a.dtype), **tile,
    )
    return c


# ----------------------------------------------------------------------------------------- SwiGLU backward


@triton.jit
def _swiglu_backward_kernel(
    g_ptr, h_ptr, w_ptr, order_ptr, dh_ptr, aw_ptr, dw_ptr, num_valid_ptr,
    num_rows, F,
    stride_g, stride_h, stride_dh, stride_aw,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = rows < num_rows
    # The combine-weight gradient goes straight to its (token, slot) place; sentinel slots (the rows past the
    # routed ones, which hold no data) get 0 there.
    slots = tl.load(order_ptr + rows, mask=in_range, other=0)
    num_valid = tl.load(num_valid_ptr)
    dw = tl.zeros((BLOCK_M,), dtype=ACC)
    if tl.program_id(0) * BLOCK_M < num_valid:
        r_mask = rows < num_valid
        rows64 = rows.to(tl.int64)
        w = tl.load(w_ptr + rows, mask=r_mask, other=0.0).to(ACC)
        for f0 in range(0, F, BLOCK_F):
            fs = f0 + tl.arange(0, BLOCK_F)
            mask = r_mask[:, None] & (fs < F)[None, :]
            g = tl.load(g_ptr + rows64[:, None] * stride_g + fs[None, :], mask=mask, other=0.0).to(ACC)
            gate = tl.load(h_ptr + rows64[:, None] * stride_h + fs[None, :], mask=mask, other=0.0).to(ACC)
            up = tl.load(h_ptr + rows64[:, None] * stride_h + fs[None, :] + F, mask=mask, other=0.0).to(ACC)
            sig = 1.0 / (1.0 + tl.exp(-gate))
            silu = gate * sig
            act = silu * up
            dw += tl.sum(g * act, axis=1)
            gw = g * w[:, None]
            tl.store(aw_ptr + rows64[:, None] * stride_aw + fs[None, :], (act * w[:, None]).to(aw_ptr.dtype.element_ty),
                     mask=mask)
            d_gate = gw * up * sig * (1.0 + gate * (1.0 - sig))
            tl.store(dh_ptr + rows64[:, None] * stride_dh + fs[None, :], d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
            tl.store(dh_ptr + rows64[:, None] * stride_dh + fs[None, :] + F, (gw * silu).to(dh_ptr.dtype.element_ty),
                     mask=mask)
    tl.store(dw_ptr + slots, dw.to(dw_ptr.dtype.element_ty), mask=in_range)


def swiglu_backward(
    g_SF: torch.Tensor, h_SF2: torch.Tensor, w_S: torch.Tensor, num_valid: torch.Tensor, order_S: torch.Tensor,
    dw_dtype: torch.dtype,
):
    """From g = dY_s Wd (unweighted) and the pre-activation h = [gate | up]: returns `(dh_SF2, aw_SF, dw)` with dh
    the gradient of h (combine weight applied), aw = w * silu(gate) * up (the left operand of dWd) and dw the
    combine-weight gradient <g, silu(gate) * up>, accumulated in fp32 and written in `dw_dtype` at each row's
    (token, slot) place `order_S[r]` of a flat (T*K,) tensor. Only the first `num_valid` rows (a one-element device
    tensor) are computed; dh and aw are left unwritten past them, and dw is 0 for those (sentinel) slots."""
    num_rows, inter = g_SF.shape
    dh = torch.empty_like(h_SF2)
    aw = torch.empty_like(g_SF)
    dw = torch.empty(num_rows, dtype=dw_dtype, device=g_SF.device)
    if num_rows == 0:
        return dh, aw, dw
    block_m, block_f = (32, 32) if INTERPRETED else (32, 128)
    _swiglu_backward_kernel[(triton.cdiv(num_rows, block_m),)](
        g_SF, h_SF2, w_S, order_S, dh, aw, dw, num_valid, num_rows, inter,
        g_SF.stride(0), h_SF2.stride(0), dh.stride(0), aw.stride(0),
        ACC=_acc_dtype(g_SF.dtype), BLOCK_M=block_m, BLOCK_F=block_f,
    )
    return dh, aw, dw


# ------------------------------------------------------------------------------------ un-permute and sum


@triton.jit
def _unpermute_sum_kernel(
    y_ptr, pos_ptr, out_ptr, num_tokens, D, stride_y, stride_out,
    TOP_K: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_mask = toks < num_tokens
    d_mask = ds < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
    for k in range(TOP_K):
        pos = tl.load(pos_ptr + toks.to(tl.int64) * TOP_K + k, mask=t_mask, other=-1).to(tl.int64)
        valid = pos >= 0  # -1 marks an empty slot (sentinel expert)
        y = tl.load(y_ptr + pos[:, None] * stride_y + ds[None, :], mask=valid[:, None] & d_mask[None, :], other=0.0)
        acc += y.to(ACC)
    tl.store(out_ptr + toks.to(tl.int64)[:, None] * stride_out + ds[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_mask[:, None] & d_mask[None, :])


def unpermute_sum(y_SD: torch.Tensor, pos_TK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum_k y[pos[t, k]] (skipping pos = -1): back from the sorted layout to tokens, deterministically."""
    num_tokens, top_k = pos_TK.shape
    hidden = y_SD.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=out_dtype, device=y_SD.device)
    if num_tokens == 0:
        return out
    block_t, block_d = (16, 32) if INTERPRETED else (16, 128)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(hidden, block_d))
    _unpermute_sum_kernel[grid](
        y_SD, pos_TK, out, num_tokens, hidden, y_SD.stride(0), out.stride(0),
        TOP_K=top_k, ACC=_acc_dtype(y_SD.dtype), BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return out
