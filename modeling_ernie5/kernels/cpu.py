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

How the work is laid out on CPU (measured on the 2-core test VM at one thread, fp32, D=512 F=256 E=64 K=8, whole
MoE block: fwd+bwd 1.68 -> 1.26 s at T=4096 and 0.25 -> 0.22 s at T=512 against the unchunked formulation):
- the sorted rows are processed in chunks of whole experts, a few hundred rows each, and every step of the forward
  (gather, gate_up, SwiGLU, down, scatter-add) or of the backward (gather, dA, SwiGLU backward, dW_down, dW_gate_up,
  dX, scatter-add) runs on one chunk before the next, while its rows are still in cache;
- the per-chunk intermediates live in a few small scratch buffers reused by every chunk. Full-size (S, D)
  intermediates are what the unchunked formulation spent most of its non-matmul time on: each is a fresh mapping
  of tens of MiB whose first write faults in every 4 KiB page (~45 ms per 64 MiB at one thread on the test VM,
  as long as ten 512x512x512 matmuls);
- with several intra-op threads, the chunks are shared out over that many threads, each running its chunks with
  single-threaded ops (`run_chunks`): the per-expert matmuls are small, and two of them side by side on one core
  each do more per second than one after the other on both (fp32 fwd+bwd, 2 threads: T=1024 236 -> 213 ms,
  T=4096 864 -> 736 ms). Chunks hold whole experts, so threads write disjoint weight-gradient slices; each thread
  scatter-adds into its own token-row buffer, summed at the end (one extra (T, D) buffer per extra thread);
- matmuls write straight into their destination (`torch.mm(..., out=slice)`), so the only large fresh buffers are
  the saved `h_SF2` and the two weight gradients, and the latter reuse the previous step's memory once it has been
  released (`REUSE_GRAD_BUFFERS`). (Advising the weight gradients onto transparent huge pages cut
  short calls by ~15% when they follow each other at once, but on a VM that hands free huge pages back to the host
  it made T=512 fwd+bwd 25% slower when calls are more than ~1 s apart, so it is not done.)

bf16/fp16 on a CPU without native half-precision matmul (AVX2 without AVX512-BF16/AMX) compute in fp32
(`needs_fp32_compute`): PyTorch emulates half matmuls there several times slower than converting the operands.

Off CPU (and when asked with `driver="grouped_mm"`) the whole batch is one chunk and the matmuls go through
`torch.nn.functional.grouped_mm`, which on CUDA is one grouped kernel instead of a host loop.

Legend: T tokens, D hidden, F expert hidden, E experts, K slots per token, S sorted (token, slot) pairs,
R rows of one chunk.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..moe import accumulate_dtype, refuse_second_order
from .routing import ExpertGroups, group_by_expert

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Which matmul driver the back-end uses: "auto" (grouped_mm off CPU when it can run, else the loop), "grouped_mm",
# "loop".
MATMUL_DRIVERS = ("auto", "grouped_mm", "loop")
# Up to this many rows of one expert, half-precision inference on a CPU without native half matmul reads the weight
# through `F.linear`'s half dot-product kernel instead of converting it to fp32: one 512x512 bf16 expert, rows 1/2/4,
# 47/86/148 us against 74/159/164 us converted (2 threads, this repo's test VM).
HALF_DOT_MAX_ROWS = 4
# Half-precision inference on such a CPU with at most this many (token, slot) rows per expert (decoding, small
# batches) stays in half precision and runs through one `F.grouped_mm`, whose per-expert products use the same dot
# kernel and whose expert loop is in C++ (64 experts of 512x512 + 512x256 in bf16, top-8, 2 threads: 0.94-0.95 vs
# 1.06-1.18 ms at 1 token, 15.9 vs 22.3 ms at 32 tokens = 4 rows per expert; at 6 rows per expert converting wins).
HALF_GROUPED_MAX_ROWS_PER_EXPERT = 4
# Rows per chunk of the CPU loop. Chunks of 256..1024 rows measured within noise of each other at T=512 and
# T=4096; 128 was ~8% slower (per-op overhead), and one unchunked pass loses the cache reuse.
CHUNK_ROWS = 512


# --- driver choice and chunking -----------------------------------------------------------------------------------
def _aligned(t: torch.Tensor) -> bool:
    if t.data_ptr() % 16:
        return False
    return all(s == 1 or (s * t.element_size()) % 16 == 0 for s in t.stride())


def grouped_mm_can_run(x_TD: torch.Tensor, gate_up_EF2D: torch.Tensor, down_EDF: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` can take this call: fp32/bf16/fp16 and 16-byte aligned rows. Every intermediate is a
    fresh contiguous (rows, D), (rows, F) or (rows, 2F) tensor, so checking the widths and the weights suffices."""
    if not hasattr(F, "grouped_mm"):
        return False
    itemsize = x_TD.element_size()
    return (
        x_TD.dtype in _GROUPED_MM_DTYPES
        and gate_up_EF2D.dtype == down_EDF.dtype == x_TD.dtype
        and (x_TD.shape[1] * itemsize) % 16 == 0
        and (down_EDF.shape[2] * itemsize) % 16 == 0
        and _aligned(gate_up_EF2D)
        and _aligned(down_EDF)
    )


def decide_grouped_mm(choice: str, what: str, auto, x_TD, gate_up_EF2D, down_EDF) -> bool:
    """The back-ends' grouped_mm switches: "grouped_mm" insists (and says so when it cannot run), "auto" takes it
    when it can run and `auto(x_TD)` agrees, any other choice (the back-end's own kernels) declines."""
    if choice not in ("auto", "grouped_mm"):
        return False
    ok = grouped_mm_can_run(x_TD, gate_up_EF2D, down_EDF)
    if choice == "grouped_mm" and not ok:
        raise ValueError(f"{what} 'grouped_mm' needs fp32/bf16/fp16 inputs with 16-byte aligned strides")
    return ok and (choice == "grouped_mm" or auto(x_TD))


def use_grouped_mm(driver: str, x_TD: torch.Tensor, gate_up_EF2D: torch.Tensor, down_EDF: torch.Tensor) -> bool:
    """Decide once per call whether `F.grouped_mm` drives the matmuls (forward and backward alike).

    "auto" never picks it on CPU for training or fp32: there it is a loop of one `mm` per expert (empty ones
    included) that allocates full-size outputs, whereas the chunked loop writes into slices of cache-sized scratch
    buffers (fwd+bwd 1.1x faster at T=512, 1.25x at T=4096 with one thread, same chunked code driven either way).
    (`sorted_experts_forward` asks for it explicitly for small half-precision inference batches.)
    """
    return decide_grouped_mm(driver, "matmul driver", lambda x: x.device.type != "cpu", x_TD, gate_up_EF2D, down_EDF)


class ExpertChunk(NamedTuple):
    """Sorted rows `[start, stop)`, made of whole experts: `pieces` holds `(expert, lo, hi)` with `lo`/`hi`
    relative to `start`, one per non-empty expert of the chunk, in row order."""

    start: int
    stop: int
    pieces: tuple[tuple[int, int, int], ...]


def plan_chunks(counts: list[int], target_rows: int | None, experts: range | None = None) -> list[ExpertChunk]:
    """Split the sorted rows into chunks of whole experts, closing a chunk once it holds `target_rows` rows.

    An expert is never split, so every weight-gradient slice is one `mm` (no partial sums, which in bf16 would
    round once per part); a chunk is therefore as large as its busiest expert, at most S rows under a fully skewed
    routing. `target_rows=None` makes one chunk of all rows. `experts` restricts the plan to a contiguous run of
    experts (one thread's share, `plan_shares`); row positions stay those of all sorted rows.
    """
    experts = range(len(counts)) if experts is None else experts
    row = sum(counts[: experts.start])
    chunks, pieces, start = [], [], row
    for expert in experts:
        n = counts[expert]
        if not n:
            continue
        pieces.append((expert, row - start, row - start + n))
        row += n
        if target_rows is not None and row - start >= target_rows:
            chunks.append(ExpertChunk(start, row, tuple(pieces)))
            pieces, start = [], row
    if pieces:
        chunks.append(ExpertChunk(start, row, tuple(pieces)))
    return chunks


def plan_shares(counts: list[int], target_rows: int | None, parts: int) -> list[list[ExpertChunk]]:
    """Chunks for `parts` threads: contiguous runs of whole experts with about the same number of rows, each cut at
    the expert boundary nearest its ideal row, then `plan_chunks` within each run (empty runs are left out).

    Cutting between experts rather than between chunks keeps the threads within about half an expert of each
    other; cutting the list of ~512-row chunks instead left one thread up to a whole chunk behind (at T=1024 the
    faster thread waited 5-10 ms of a 60-130 ms call). The split depends on the counts only: deterministic."""
    prefix = [0]
    for n in counts:
        prefix.append(prefix[-1] + n)
    cuts = [0]
    for part in range(1, parts):
        ideal = prefix[-1] * part / parts
        cuts.append(min(range(cuts[-1], len(counts) + 1), key=lambda b: abs(prefix[b] - ideal)))
    cuts.append(len(counts))
    shares = [plan_chunks(counts, target_rows, range(lo, hi)) for lo, hi in zip(cuts, cuts[1:])]
    return [share for share in shares if share]


def chunk_matmul(a_RK, w_ENK, chunk: ExpertChunk, out_RN=None, offsets_E=None) -> torch.Tensor:
    """Each expert's rows of the chunk times the transpose of that expert's (out, in) matrix, as `F.linear`:
    (R, K) x (E, N, K) -> (R, N). `w_ENK` may be a transposed view (the backward multiplies by W, not W^T).

    With `offsets_E` (grouped_mm's int32 end rows, one chunk of all experts) a single `F.grouped_mm`; otherwise
    one `torch.mm` per piece into `out_RN`."""
    if offsets_E is not None:
        return F.grouped_mm(a_RK, w_ENK.transpose(1, 2), offs=offsets_E)
    for e, lo, hi in chunk.pieces:
        w_NK = w_ENK[e]
        if w_NK.dtype != a_RK.dtype:
            # Half weights meet fp32 rows only on the fp32-compute inference path (`needs_fp32_compute`). A few rows
            # go through PyTorch's half-precision dot-product kernel on the (out, in) weight as it is (no copy);
            # more rows are cheaper with the weight converted once.
            if hi - lo <= HALF_DOT_MAX_ROWS and w_NK.is_contiguous():
                out_RN[lo:hi] = F.linear(a_RK[lo:hi].to(w_NK.dtype), w_NK)
                continue
            w_NK = w_NK.to(a_RK.dtype)
        torch.mm(a_RK[lo:hi], w_NK.t(), out=out_RN[lo:hi])
    return out_RN


def chunk_matmul_tn(a_RM, b_RN, chunk: ExpertChunk, out_EMN=None, offsets_E=None) -> torch.Tensor:
    """Per-expert `a_e^T @ b_e` (weight gradients: `a` the output side, `b` the input side of a (out, in) weight),
    written into `out_EMN[e]` for the chunk's experts.

    With `offsets_E` (one chunk of all experts) a single `F.grouped_mm`, returned as a new (E, M, N) tensor in
    which experts without rows are zero."""
    if offsets_E is not None:
        return F.grouped_mm(a_RM.t(), b_RN, offs=offsets_E)
    for e, lo, hi in chunk.pieces:
        torch.mm(a_RM[lo:hi].t(), b_RN[lo:hi], out=out_EMN[e])
    return out_EMN


def needs_fp32_compute(x: torch.Tensor) -> bool:
    """Whether bf16/fp16 matmuls should run in fp32: on a CPU without native half-precision matmul (AVX2 without
    AVX512-BF16/AMX) oneDNN emulates them, measured 6-8x slower than converting the operands to fp32 and back
    (512x512 weights, 512 rows, one thread: 55 ms in bf16, 7 ms converted) and still 2x slower for one row."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    mkldnn = torch.ops.mkldnn
    native = mkldnn._is_mkldnn_bf16_supported() if x.dtype == torch.bfloat16 else mkldnn._is_mkldnn_fp16_supported()
    return not native


def _gather_rows(src_TD: torch.Tensor, tok_R: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    """`src_TD[tok_R]`, into the first rows of the chunk scratch `buf` when there is one (the loop driver)."""
    if buf is None:
        return src_TD.index_select(0, tok_R)
    return torch.index_select(src_TD, 0, tok_R, out=buf[: tok_R.shape[0]])


# --- weight-gradient buffers -------------------------------------------------------------------------------------
# Reuse each expert weight's gradient buffer across steps when nothing references it any more (the usual
# `zero_grad(set_to_none=True)` loop). A fresh buffer above glibc's 32 MiB mmap threshold is new pages on every step,
# and faulting them in doubled the weight-gradient loops at T=1024 (64 + 32 MiB per layer: 94-112 ms vs 51 ms into
# warm memory, 2 threads); transformers' experts pay the same. What it costs: between steps the buffer stays
# allocated, as `zero_grad(set_to_none=False)` would keep it; peak memory is unchanged. `False` turns it off.
REUSE_GRAD_BUFFERS = True
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private; without it nothing is reused


class _GradBuffer:
    """The memory of the last gradient handed out for one weight (an attribute of that weight, so it lives as long
    as the weight does). Only the storage is held, never a tensor: autograd then still takes the returned gradient
    as `.grad` without copying it (it copies a gradient tensor that something else references). Not pickled: a
    saved weight carries no gradient memory."""

    __slots__ = ("storage",)

    def __init__(self):
        self.storage = None

    def __reduce__(self):
        return (_GradBuffer, ())


def grad_buffer_slot(weight: torch.Tensor) -> _GradBuffer | None:
    """The weight's gradient-buffer slot, created on first use; None when reuse is off or cannot be checked."""
    if not REUSE_GRAD_BUFFERS or _use_count is None or weight.device.type != "cpu":
        return None
    slot = getattr(weight, "_ernie5_grad_buffer", None)
    if slot is None:
        slot = _GradBuffer()
        weight._ernie5_grad_buffer = slot
    return slot


def weight_grad_buffer(weight: torch.Tensor, slot: _GradBuffer | None) -> torch.Tensor:
    """An uninitialised contiguous tensor shaped like `weight` for its gradient: on the slot's memory when nothing
    but the slot refers to it any more (the gradient handed out last time has been dropped), else on new memory.

    The slot takes new memory only when the weight has no `.grad`, i.e. when this gradient becomes `.grad`. Under
    gradient accumulation (or `zero_grad(set_to_none=False)`) the gradient is added into the existing `.grad` and
    then dropped, and the slot keeps pointing at `.grad`'s memory, reused once the step's `.grad` is released:
    holding the added one instead would keep a second full-size buffer alive through every later forward."""
    held = slot.storage if slot is not None else None
    if held is not None and held.nbytes() == weight.numel() * weight.element_size() and _use_count(held._cdata) == 1:
        return weight.new_empty(0).set_(held, 0, weight.shape)
    fresh = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    if slot is not None and weight.grad is None:
        slot.storage = fresh.untyped_storage()
    return fresh


# --- chunks side by side ------------------------------------------------------------------------------------------
# The chunk loop runs on this many threads, each taking a contiguous share of the experts (`plan_shares`) with
# single-threaded ops, instead of one chunk after the other with every op split over the intra-op threads: the
# per-expert matmuls are small (~128 rows at T=1024, E=64, k=8), and such matmuls gain little from a second
# intra-op thread. "auto" (default) = the intra-op thread count up to CHUNK_THREADS_AUTO_MAX; "1" = off. Each extra
# thread costs one (T, D) accumulator, and the gain was measured with 2 threads only, hence the cap.
CHUNK_THREADS = os.environ.get("ERNIE5_CPU_CHUNK_THREADS", "auto")
CHUNK_THREADS_AUTO_MAX = 4
_chunk_pool: ThreadPoolExecutor | None = None
_chunk_pool_workers = 0
_chunk_pool_pid = 0  # a forked child inherits the pool object but not its threads: it makes its own


def _chunk_threads(num_chunks: int) -> int:
    intra = torch.get_num_threads()
    wanted = min(intra, CHUNK_THREADS_AUTO_MAX) if CHUNK_THREADS == "auto" else int(CHUNK_THREADS)
    return max(1, min(wanted, intra, num_chunks))


def run_chunks(shares: list[list[ExpertChunk]], body, make_state) -> list:
    """`body(chunk, state)` for every chunk, one thread per share (`plan_shares`), with `make_state(i)` (scratch
    buffers, accumulators) per thread i; returns the states. Chunks hold whole experts, so threads write disjoint
    weight-gradient slices and sorted rows; what several chunks add into (token rows) goes to each thread's own
    accumulator, summed by the caller. Should fewer threads be allowed now than when the shares were planned (the
    backward reuses the forward's plan), every chunk runs on the calling thread.

    The intra-op thread count is set to 1 for the duration (process-wide, restored after) so that the threads do
    not each fan out into a thread team: two levels of threads on two cores would oversubscribe them."""
    global _chunk_pool, _chunk_pool_workers, _chunk_pool_pid
    threads = max(len(shares), 1)
    if threads > 1 and _chunk_threads(threads) < threads:
        shares, threads = [[chunk for share in shares for chunk in share]], 1
    states = [make_state(i) for i in range(threads)]
    if threads <= 1:
        for chunk in (shares[0] if shares else ()):
            body(chunk, states[0])
        return states
    # Grad and inference mode are thread-local: workers take the caller's (ops write into `out=` buffers, which
    # autograd must not record).
    inference = torch.is_inference_mode_enabled()

    def run(share, state):
        with torch.inference_mode() if inference else torch.no_grad():
            for chunk in share:
                body(chunk, state)

    if _chunk_pool_workers < threads - 1 or _chunk_pool_pid != os.getpid():
        if _chunk_pool is not None and _chunk_pool_pid == os.getpid():
            _chunk_pool.shutdown(wait=False)
        _chunk_pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="ernie5-chunks")
        _chunk_pool_workers, _chunk_pool_pid = threads - 1, os.getpid()
    intra = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [_chunk_pool.submit(run, share, state) for share, state in zip(shares[1:], states[1:])]
        run(shares[0], states[0])
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(intra)
    return states


class _Layout(NamedTuple):
    """Everything the backward needs to walk the same chunks as the forward."""

    groups: ExpertGroups
    shares: list[list[ExpertChunk]]  # one list of chunks per thread
    offsets_E: torch.Tensor | None  # int32 end rows when grouped_mm drives the matmuls, else None
    max_rows: int


def _layout(idx_TK: torch.Tensor, num_experts: int, grouped: bool) -> _Layout:
    groups = group_by_expert(idx_TK, num_experts)
    counts = groups.counts_E.tolist()  # sync point: chunk bounds on the host
    if grouped:  # one chunk of all rows, one thread
        shares = [plan_chunks(counts, None)]
    else:
        chunks = plan_chunks(counts, CHUNK_ROWS)
        threads = _chunk_threads(len(chunks))  # never more threads than chunks (decoding: one chunk, one thread)
        shares = [chunks] if threads == 1 else plan_shares(counts, CHUNK_ROWS, threads)
    offsets_E = groups.offsets_E.to(torch.int32) if grouped else None
    max_rows = max((c.stop - c.start for share in shares for c in share), default=0)
    return _Layout(groups, shares, offsets_E, max_rows)


def _experts_forward(x_TD, gate_up_EF2D, down_EDF, w_TK, layout: _Layout, save_h: bool):
    """The forward pass chunk by chunk; returns `(out_TD, h_SF2)`, `h_SF2` only when `save_h`."""
    groups, shares, offs, max_rows = layout
    num_tokens, hidden = x_TD.shape
    two_f = gate_up_EF2D.shape[1]
    inter = two_f // 2
    acc = accumulate_dtype(x_TD.dtype)
    out_TD = torch.zeros(num_tokens, hidden, dtype=acc, device=x_TD.device)
    loop = offs is None
    h_SF2 = x_TD.new_empty(groups.num_valid if save_h and loop else 0, two_f)
    if not groups.num_valid:
        return out_TD.to(x_TD.dtype), h_SF2
    token_S = groups.valid_token
    w_S = w_TK.reshape(-1).index_select(0, groups.valid_order).to(x_TD.dtype)

    def make_state(i):
        # Chunk scratch (the grouped path allocates per call instead); x_RD is reused for the down output y_RD.
        # Thread 0 adds into out_TD itself, the others into their own buffer.
        return dict(
            out=out_TD if i == 0 else torch.zeros_like(out_TD),
            x=x_TD.new_empty(max_rows, hidden) if loop else None,
            h=x_TD.new_empty(max_rows, two_f) if loop and not save_h else None,
            a=x_TD.new_empty(max_rows, inter) if loop else None,
        )

    def body(chunk, st):
        rows = chunk.stop - chunk.start
        tok_R = token_S[chunk.start : chunk.stop]
        x_RD = _gather_rows(x_TD, tok_R, st["x"])
        if loop:
            h_RF2 = chunk_matmul(x_RD, gate_up_EF2D, chunk, h_SF2[chunk.start : chunk.stop] if save_h else st["h"][:rows])
        else:
            h_RF2 = chunk_matmul(x_RD, gate_up_EF2D, chunk, offsets_E=offs)
            st["h_saved"] = h_RF2  # one chunk of all rows: grouped_mm's output is the saved tensor
        gate_RF, up_RF = h_RF2[:, :inter], h_RF2[:, inter:]
        a_RF = torch.sigmoid(gate_RF, out=st["a"][:rows]) if loop else torch.sigmoid(gate_RF)
        a_RF.mul_(gate_RF).mul_(up_RF).mul_(w_S[chunk.start : chunk.stop, None])  # combine weight folded in
        y_RD = chunk_matmul(a_RF, down_EDF, chunk, x_RD, offs)  # x_RD is dead once h is computed
        st["out"].index_add_(0, tok_R, y_RD.to(acc))

    states = run_chunks(shares, body, make_state)  # the grouped path is one chunk: one thread
    if not loop and save_h:
        h_SF2 = states[0]["h_saved"]
    for st in states[1:]:
        out_TD.add_(st["out"])
    return out_TD.to(x_TD.dtype), h_SF2


class SortedExpertsFunction(torch.autograd.Function):
    """out_TD = sum_k w_TK * SwiGLU_e(x_TD) through sorted grouped matmuls; see the module docstring."""

    @staticmethod
    def forward(ctx, x_TD, gate_up_EF2D, down_EDF, idx_TK, w_TK, driver):
        grouped = use_grouped_mm(driver, x_TD, gate_up_EF2D, down_EDF)
        layout = _layout(idx_TK, gate_up_EF2D.shape[0], grouped)
        out_TD, h_SF2 = _experts_forward(x_TD, gate_up_EF2D, down_EDF, w_TK, layout, save_h=True)
        ctx.save_for_backward(x_TD, gate_up_EF2D, down_EDF, w_TK, h_SF2)
        ctx.layout = layout
        ctx.grad_slots = (grad_buffer_slot(gate_up_EF2D), grad_buffer_slot(down_EDF))
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        refuse_second_order("the 'cpu' experts back-end", "use experts_backend='reference'")
        x_TD, gate_up_EF2D, down_EDF, w_TK, h_SF2 = ctx.saved_tensors
        groups, shares, offs, max_rows = ctx.layout
        need_x, need_gu, need_down, _, need_w = ctx.needs_input_grad[:5]
        num_tokens, hidden = x_TD.shape
        num_experts, two_f, _ = gate_up_EF2D.shape
        inter = two_f // 2
        dtype, device = x_TD.dtype, x_TD.device
        acc = accumulate_dtype(dtype)
        if groups.num_valid == 0:
            # No real expert was hit: every gradient is exactly zero.
            return (
                torch.zeros_like(x_TD) if need_x else None,
                torch.zeros_like(gate_up_EF2D) if need_gu else None,
                torch.zeros_like(down_EDF) if need_down else None,
                None,
                torch.zeros_like(w_TK) if need_w else None,
                None,
            )
        loop = offs is None
        token_S, order_S = groups.valid_token, groups.valid_order
        # index_select reads a broadcast (0-stride) upstream gradient, as from `.sum().backward()`, as it is.
        dout_TD = dout_TD.to(dtype)
        w_S = w_TK.reshape(-1).index_select(0, order_S).to(dtype)
        d_gate_up = d_down = dx_TD = dw_S = None
        if loop:
            empty_experts = (groups.counts_E == 0).nonzero().flatten()
            # Every expert with rows gets its slice written in full below; the others are zeroed here.
            if need_gu:
                d_gate_up = weight_grad_buffer(gate_up_EF2D, ctx.grad_slots[0])
                d_gate_up.index_fill_(0, empty_experts, 0)
            if need_down:
                d_down = weight_grad_buffer(down_EDF, ctx.grad_slots[1])
                d_down.index_fill_(0, empty_experts, 0)
        if need_x:
            dx_TD = torch.zeros(num_tokens, hidden, dtype=acc, device=device)
        if need_w:
            dw_S = torch.empty(groups.num_valid, dtype=acc, device=device)

        def make_state(i):
            def scratch(cols):
                return x_TD.new_empty(max_rows, cols) if loop else None

            # dout is reused for dx_RD once dW_down is done; s1/s2/s3 hold sigmoid, silu and a / silu'.
            # Thread 0 adds into dx_TD itself, the others into their own buffer.
            names = ("dout", "x", "dh", "g", "s1", "s2", "s3")
            st = dict(zip(names, map(scratch, (hidden, hidden, two_f, inter, inter, inter, inter))))
            st["dx"] = dx_TD if i == 0 or dx_TD is None else torch.zeros_like(dx_TD)
            st["grads"] = {}
            return st

        def rows_of(buf, rows):
            return buf[:rows] if loop else None

        def body(chunk, st):
            rows = chunk.stop - chunk.start
            tok_R = token_S[chunk.start : chunk.stop]
            w_R1 = w_S[chunk.start : chunk.stop, None]
            dout_RD = _gather_rows(dout_TD, tok_R, st["dout"])
            g_RF = chunk_matmul(dout_RD, down_EDF.transpose(1, 2), chunk, rows_of(st["g"], rows), offs)  # d(w*a) = dY W
            gate_RF, up_RF = h_SF2[chunk.start : chunk.stop, :inter], h_SF2[chunk.start : chunk.stop, inter:]
            sig_RF = torch.sigmoid(gate_RF, out=rows_of(st["s1"], rows))
            silu_RF = torch.mul(gate_RF, sig_RF, out=rows_of(st["s2"], rows))
            a_RF = torch.mul(silu_RF, up_RF, out=rows_of(st["s3"], rows))
            if need_w:  # d out / d w_s = <dout_t, y_s> = <g_s, a_s>
                if acc == dtype:
                    dw_S[chunk.start : chunk.stop] = torch.linalg.vecdot(g_RF, a_RF)
                else:
                    dw_S[chunk.start : chunk.stop] = (g_RF.to(acc) * a_RF.to(acc)).sum(-1)
            if need_down:
                a_RF.mul_(w_R1)
                st["grads"]["down"] = chunk_matmul_tn(dout_RD, a_RF, chunk, d_down, offs)
            if need_x or need_gu:
                g_RF.mul_(w_R1)  # now d a
                dh_RF2 = st["dh"][:rows] if loop else x_TD.new_empty(rows, two_f)
                torch.mul(g_RF, silu_RF, out=dh_RF2[:, inter:])
                # silu'(g) = s + silu(g) * (1 - s), in a's buffer (a is done): two passes
                dsilu_RF = torch.sub(1, sig_RF, out=a_RF)
                torch.addcmul(sig_RF, silu_RF, dsilu_RF, out=dsilu_RF)
                torch.mul(g_RF, up_RF, out=dh_RF2[:, :inter]).mul_(dsilu_RF)
                if need_gu:
                    x_RD = _gather_rows(x_TD, tok_R, st["x"])
                    st["grads"]["gate_up"] = chunk_matmul_tn(dh_RF2, x_RD, chunk, d_gate_up, offs)
                if need_x:
                    dx_RD = chunk_matmul(dh_RF2, gate_up_EF2D.transpose(1, 2), chunk, rows_of(st["dout"], rows), offs)
                    st["dx"].index_add_(0, tok_R, dx_RD.to(acc))

        states = run_chunks(shares, body, make_state)
        if not loop:  # one chunk of all rows; grouped_mm returned the weight gradients as new tensors
            d_gate_up = states[0]["grads"].get("gate_up", d_gate_up)
            d_down = states[0]["grads"].get("down", d_down)
        for st in states[1:]:
            if need_x:
                dx_TD.add_(st["dx"])
        dw_TK = None
        if need_w:
            dw_TK = torch.zeros(w_TK.numel(), dtype=w_TK.dtype, device=device)
            dw_TK[order_S] = dw_S.to(w_TK.dtype)
            dw_TK = dw_TK.view_as(w_TK)
        if d_gate_up is not None:
            d_gate_up = d_gate_up.to(gate_up_EF2D.dtype)
        if d_down is not None:
            d_down = d_down.to(down_EDF.dtype)
        return dx_TD.to(dtype) if need_x else None, d_gate_up, d_down, None, dw_TK, None


def sorted_experts_forward(
    x_TD: torch.Tensor,
    gate_up_EF2D: torch.Tensor,
    down_EDF: torch.Tensor,
    idx_TK: torch.Tensor,
    w_TK: torch.Tensor,
    driver: str = "auto",
) -> torch.Tensor:
    """Experts back-end `"cpu"`: same contract as `modeling_ernie5.moe.reference_experts_forward`.

    Args:
        x_TD (`torch.Tensor` of shape `(T, D)`): token hidden states.
        gate_up_EF2D (`torch.Tensor` of shape `(E, 2F, D)`): `[gate | up]` weights, (out, in) per expert.
        down_EDF (`torch.Tensor` of shape `(E, D, F)`): down weights, (out, in) per expert.
        idx_TK (`torch.LongTensor` of shape `(T, K)`): chosen experts; `>= E` marks an empty slot.
        w_TK (`torch.Tensor` of shape `(T, K)`): combine weights (0 at empty slots).
        driver (`str`, *optional*, defaults to `"auto"`): matmul driver, one of `MATMUL_DRIVERS`.
    """
    if driver not in MATMUL_DRIVERS:
        raise ValueError(f"unknown matmul driver {driver!r}; choose one of {MATMUL_DRIVERS}")
    if x_TD.shape[0] == 0:
        # Keep the autograd graph connected so an empty batch still yields (zero) gradients.
        return x_TD.new_zeros(x_TD.shape) + 0 * (x_TD.sum() + gate_up_EF2D.sum() + down_EDF.sum() + w_TK.sum())
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, gate_up_EF2D, down_EDF, w_TK))
    # Half precision on a CPU without native half matmul runs in fp32 (`needs_fp32_compute`); the result keeps
    # x's dtype. The exception is inference on a decoding-sized batch, which stays in half precision through one
    # `F.grouped_mm` (see HALF_GROUPED_MAX_ROWS_PER_EXPERT).
    in_fp32 = driver != "grouped_mm" and needs_fp32_compute(x_TD)
    small = idx_TK.numel() <= HALF_GROUPED_MAX_ROWS_PER_EXPERT * gate_up_EF2D.shape[0]
    if in_fp32 and not needs_grad and driver == "auto" and small and grouped_mm_can_run(x_TD, gate_up_EF2D, down_EDF):
        in_fp32, driver = False, "grouped_mm"
    x_in, w_in = (x_TD.float(), w_TK.float()) if in_fp32 else (x_TD, w_TK)
    if needs_grad:
        # The casts are part of the graph: parameters get their gradients in their own dtype, rounded once.
        weights = (gate_up_EF2D.float(), down_EDF.float()) if in_fp32 else (gate_up_EF2D, down_EDF)
        return SortedExpertsFunction.apply(x_in, *weights, idx_TK, w_in, driver).to(x_TD.dtype)
    # Inference: no autograd node, and the gate_up output stays in chunk scratch instead of being kept. Half
    # weights stay as they are: `chunk_matmul` converts only the experts a batch uses (a decoding step touches k
    # of E, and converting all of them would cost more than its matmuls), or reads them in half precision.
    grouped = use_grouped_mm(driver, x_in, gate_up_EF2D, down_EDF)
    layout = _layout(idx_TK, gate_up_EF2D.shape[0], grouped)
    return _experts_forward(x_in, gate_up_EF2D, down_EDF, w_in, layout, save_h=False)[0].to(x_TD.dtype)


def cpu_backend_available(x: torch.Tensor) -> bool:
    """The sorted back-end is plain PyTorch: it runs on any device and floating dtype."""
    return x.is_floating_point()
