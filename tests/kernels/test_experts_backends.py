"""Every PyTorch experts back-end against the reference loop: outputs and all four gradients (x, gate_up, down,
combine weights) in float64 and float32, over uniform, skewed (empty experts) and sentinel (per-token k) routing,
k from 1 to E, odd widths, an empty batch and a call where no slot has an expert. Runs on CPU."""


import pytest
import torch
import torch.nn.functional as F
from experts_cases import assert_matches, make_case, run_with_grads

from modeling_ernie5.kernels import cpu as cpu_kernels
from modeling_ernie5.kernels.cpu import (
    HALF_DOT_MAX_ROWS,
    ExpertChunk,
    chunk_matmul,
    chunk_matmul_tn,
    plan_chunks,
    plan_shares,
    sorted_experts_forward,
    use_grouped_mm,
)
from modeling_ernie5.kernels.routing import group_by_expert
from modeling_ernie5.moe import EXPERTS_BACKENDS, reference_experts_forward, resolve_experts_backend


def _cpu(driver):
    return lambda *args: sorted_experts_forward(*args, driver=driver)


BACKENDS = {"cpu-auto": _cpu("auto"), "cpu-loop": _cpu("loop"), "cpu-grouped_mm": _cpu("grouped_mm")}
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}

SHAPES = [
    # tokens, hidden, inter, experts, top_k, routing
    (33, 100, 60, 8, 2, "uniform"),
    (40, 64, 32, 8, 3, "skewed"),
    (29, 48, 24, 6, 1, "uniform"),
    (17, 48, 24, 6, 6, "uniform"),  # k = E
    (31, 50, 30, 5, 3, "sentinel"),  # odd, unaligned widths: the loop driver takes over from grouped_mm
    (9, 32, 16, 4, 2, "none"),
    (0, 32, 16, 4, 2, "uniform"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_matches_reference(name, shape, dtype):
    *sizes, routing = shape
    if name == "cpu-grouped_mm" and (dtype == torch.float64 or sizes[1] % 4 or sizes[2] % 4):
        pytest.skip("torch's grouped_mm takes fp32/bf16 with 16-byte aligned rows only (auto falls back)")
    case = make_case(*sizes, dtype=dtype, routing=routing, seed=sum(sizes))
    want = run_with_grads(reference_experts_forward, *case)
    got = run_with_grads(BACKENDS[name], *case)
    assert_matches(got, want, **TOL[dtype])
    with torch.no_grad():  # inference takes its own path (no autograd node, nothing saved)
        torch.testing.assert_close(BACKENDS[name](*case[:5]), want[0], **TOL[dtype])


def test_sentinel_slots_get_zero_weight_gradient_and_no_output():
    x, gate_up, down, idx, w, upstream = make_case(24, 32, 16, 4, 3, routing="sentinel", seed=3)
    _, _, _, _, d_w = run_with_grads(sorted_experts_forward, x, gate_up, down, idx, w, upstream)
    assert (idx == 4).any()
    assert torch.all(d_w[idx == 4] == 0)
    # A token whose slots are all empty gets exactly zero output.
    idx[0] = 4
    w[0] = 0
    out = sorted_experts_forward(x, gate_up, down, idx, w)
    assert torch.all(out[0] == 0)


def test_empty_experts_get_exactly_zero_weight_gradient():
    case = make_case(40, 64, 32, 8, 2, routing="skewed", seed=5)
    _, _, d_gate_up, d_down, _ = run_with_grads(sorted_experts_forward, *case)
    unused = torch.ones(8, dtype=torch.bool)
    unused[case[3].unique()] = False
    assert unused.sum() >= 4
    assert torch.all(d_gate_up[unused] == 0) and torch.all(d_down[unused] == 0)
    assert torch.all(d_gate_up[~unused].abs().sum((1, 2)) > 0)


@pytest.mark.parametrize("fp32_compute", [True, False], ids=["fp32-compute", "native-half"])
@pytest.mark.parametrize("routing", ["uniform", "sentinel"])
def test_bfloat16_close_to_float32_reference(monkeypatch, fp32_compute, routing):
    # Both half-precision paths run here whatever the CPU: the fp32-compute one (chosen on CPUs without native
    # bf16 matmul) and bf16 matmuls throughout.
    monkeypatch.setattr(cpu_kernels, "needs_fp32_compute", lambda x: fp32_compute)
    x, gate_up, down, idx, w, upstream = make_case(64, 64, 32, 8, 2, dtype=torch.float32, routing=routing, seed=7)
    want = run_with_grads(reference_experts_forward, x, gate_up, down, idx, w, upstream)
    low = [t.bfloat16() for t in (x, gate_up, down, w)]
    got = run_with_grads(sorted_experts_forward, *low[:3], idx, low[3], upstream.bfloat16())
    with torch.no_grad():  # the inference path converts each used expert's weights on its own
        got_inference = sorted_experts_forward(*low[:3], idx, low[3])
    for name, g, r in zip(("out", "d_x", "d_gate_up", "d_down", "d_w", "inference"), got + [got_inference], want + want[:1]):
        assert g.dtype == torch.bfloat16
        rel = ((g.float() - r).abs().max() / r.abs().max()).item()
        assert rel < 3e-2, f"{name}: relative max error {rel:.3g}"


@pytest.mark.parametrize("tokens", [3, 40])
def test_half_inference_picks_its_path_by_rows_per_expert(monkeypatch, tokens):
    # On a CPU without native bf16 matmul, decoding-sized batches (<= 4 rows per expert) stay in bf16 through one
    # F.grouped_mm; larger ones take the fp32-compute loop. Both agree with the fp32 reference.
    monkeypatch.setattr(cpu_kernels, "needs_fp32_compute", lambda x: True)
    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(cpu_kernels.F, "grouped_mm", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    x, gate_up, down, idx, w, _ = make_case(tokens, 64, 32, 8, 2, dtype=torch.float32, seed=5)
    want = reference_experts_forward(x, gate_up, down, idx, w)
    with torch.no_grad():
        got = sorted_experts_forward(*(t.bfloat16() for t in (x, gate_up, down)), idx, w.bfloat16())
    small = tokens * 2 <= cpu_kernels.HALF_GROUPED_MAX_ROWS_PER_EXPERT * 8
    assert calls == ([torch.bfloat16, torch.bfloat16] if small else [])
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 3e-2


def test_fp32_compute_only_for_half_precision_on_cpu():
    assert not cpu_kernels.needs_fp32_compute(torch.zeros(2, dtype=torch.float32))
    assert not cpu_kernels.needs_fp32_compute(torch.zeros(2, dtype=torch.float64))
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert cpu_kernels.needs_fp32_compute(torch.zeros(2, dtype=torch.bfloat16)) == (not native)


def test_broadcast_upstream_gradient_is_accepted():
    """`.sum().backward()` hands a 0-stride gradient, which torch's grouped_mm backward rejects on its own."""
    x, gate_up, down, idx, w, _ = make_case(16, 32, 16, 4, 2, dtype=torch.float32, seed=9)
    x.requires_grad_()
    sorted_experts_forward(x, gate_up, down, idx, w).sum().backward()
    reference = x.detach().clone().requires_grad_()
    reference_experts_forward(reference, gate_up, down, idx, w).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=2e-4, atol=2e-5)


def test_chunk_matmuls_agree_with_a_per_expert_loop():
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 5, (23, 2), generator=gen)
    groups = group_by_expert(idx, 6)  # expert 5 never chosen
    a = torch.randn(groups.num_valid, 16, generator=gen)
    b = torch.randn(6, 8, 16, generator=gen)  # (out, in) per expert, as F.linear
    c = torch.randn(groups.num_valid, 8, generator=gen)
    bounds = list(zip((groups.offsets_E - groups.counts_E).tolist(), groups.offsets_E.tolist()))
    want = torch.cat([a[s:e] @ b[i].t() for i, (s, e) in enumerate(bounds)])
    want_tn = torch.stack([a[s:e].t() @ c[s:e] for s, e in bounds])
    counts = groups.counts_E.tolist()
    # grouped_mm: one chunk of every row
    (whole,) = plan_chunks(counts, None)
    offs = groups.offsets_E.to(torch.int32)
    torch.testing.assert_close(chunk_matmul(a, b, whole, offsets_E=offs), want)
    torch.testing.assert_close(chunk_matmul_tn(a, c, whole, offsets_E=offs), want_tn)
    # the loop: small chunks, each writing its rows and its experts' slices
    out, out_tn = torch.full_like(want, float("nan")), torch.zeros_like(want_tn)
    for chunk in plan_chunks(counts, 5):
        rows = slice(chunk.start, chunk.stop)
        chunk_matmul(a[rows], b, chunk, out[rows])
        chunk_matmul_tn(a[rows], c[rows], chunk, out_tn)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out_tn, want_tn)
    assert torch.all(want_tn[5] == 0)
    # Half weights with fp32 rows (the fp32-compute inference path): experts with few rows go through F.linear on
    # the bf16 weight, the others through a converted copy; both agree with the fp32 product to bf16 precision.
    half_counts = [2, HALF_DOT_MAX_ROWS + 3, 0, 1]
    (chunk,) = plan_chunks(half_counts, None)
    rows = a[: sum(half_counts)]
    out = torch.full((rows.shape[0], 8), float("nan"))
    chunk_matmul(rows, b[:4].bfloat16(), chunk, out)
    ends = torch.tensor(half_counts).cumsum(0).tolist()
    want = torch.cat([rows[e - n : e] @ b[i].bfloat16().float().t() for i, (n, e) in enumerate(zip(half_counts, ends))])
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)


def test_chunks_hold_whole_experts_and_skip_empty_ones():
    counts = [3, 0, 700, 2, 2, 0, 600, 1]
    chunks = plan_chunks(counts, 512)
    assert [(c.start, c.stop) for c in chunks] == [(0, 703), (703, 1307), (1307, 1308)]
    assert chunks[0].pieces == ((0, 0, 3), (2, 3, 703))
    assert chunks[1].pieces == ((3, 0, 2), (4, 2, 4), (6, 4, 604))
    assert [p[0] for c in chunks for p in c.pieces] == [e for e, n in enumerate(counts) if n]
    assert plan_chunks([0, 0], 512) == []
    (whole,) = plan_chunks(counts, None)
    assert (whole.start, whole.stop) == (0, sum(counts))
    # a run of experts keeps the rows' absolute positions
    assert plan_chunks(counts, 512, range(3, 7)) == [ExpertChunk(703, 1307, ((3, 0, 2), (4, 2, 4), (6, 4, 604)))]


def test_thread_shares_cut_between_experts_nearest_to_equal_rows():
    """Shares are cut at the expert boundary nearest each thread's ideal row, not after the chunk that crosses it:
    64 experts of 128 rows (T=1024, k=8) in 512-row chunks split 4096 / 4096 on two threads, and an uneven routing
    lands within half an expert of the middle."""
    shares = plan_shares([128] * 64, 512, 2)
    assert [sum(c.stop - c.start for c in share) for share in shares] == [4096, 4096]
    assert shares[1][0].start == 4096 and [c for share in shares for c in share] == plan_chunks([128] * 64, 512)
    # Uneven: the old rule (first chunk boundary at or past half of 1426 rows) gave 1425 / 1; the nearest
    # expert boundary gives 703 / 723.
    counts = [3, 0, 700, 300, 2, 0, 420, 1]
    first, second = plan_shares(counts, 512, 2)
    assert (first[-1].stop, second[0].start, second[-1].stop) == (703, 703, 1426)
    # Three threads, a dominant expert, and runs with no rows left out; always every non-empty expert exactly once.
    for counts, parts in (([5, 5, 5, 5], 3), ([1000, 1, 1, 1], 3), ([0, 0, 9, 0], 4), ([0, 0], 2)):
        shares = plan_shares(counts, 4, parts)
        assert all(shares) and len(shares) <= parts
        assert [p[0] for share in shares for c in share for p in c.pieces] == [e for e, n in enumerate(counts) if n]


@pytest.mark.parametrize("routing", ["uniform", "skewed", "sentinel"])
def test_many_small_chunks_match_reference(routing, monkeypatch):
    """Chunks of a few rows: every chunk boundary, scratch reuse and the per-chunk scatter-adds are exercised."""
    monkeypatch.setattr(cpu_kernels, "CHUNK_ROWS", 7)
    case = make_case(45, 40, 24, 8, 3, dtype=torch.float64, routing=routing, seed=11)
    want = run_with_grads(reference_experts_forward, *case)
    got = run_with_grads(sorted_experts_forward, *case)
    assert_matches(got, want, **TOL[torch.float64])
    with torch.no_grad():  # the inference path keeps gate_up in chunk scratch instead
        torch.testing.assert_close(sorted_experts_forward(*case[:5]), want[0], **TOL[torch.float64])


@pytest.fixture
def intra_op_threads():
    """Run with several intra-op threads (the suite runs with one), restoring the count afterwards."""
    before = torch.get_num_threads()

    def use(n):
        torch.set_num_threads(n)

    yield use
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("routing", ["uniform", "skewed", "sentinel"])
def test_chunks_on_several_threads_match_reference(routing, threads, monkeypatch, intra_op_threads):
    """Chunks shared out over threads (each thread its own scratch and token-row accumulators, summed at the end;
    weight-gradient slices and sorted rows written in place), in training, no-grad and inference mode; the
    intra-op thread count comes back afterwards."""
    monkeypatch.setattr(cpu_kernels, "CHUNK_ROWS", 7)
    intra_op_threads(threads)
    shares = []
    run_chunks = cpu_kernels.run_chunks
    monkeypatch.setattr(cpu_kernels, "run_chunks", lambda plan, body, make: shares.append(len(plan)) or run_chunks(plan, body, make))
    case = make_case(45, 40, 24, 8, 3, dtype=torch.float64, routing=routing, seed=11)
    want = run_with_grads(reference_experts_forward, *case)
    got = run_with_grads(sorted_experts_forward, *case)
    assert_matches(got, want, **TOL[torch.float64])
    with torch.no_grad():
        torch.testing.assert_close(sorted_experts_forward(*case[:5]), want[0], **TOL[torch.float64])
    with torch.inference_mode():  # the workers must take the caller's mode to write into inference tensors
        torch.testing.assert_close(sorted_experts_forward(*case[:5]), want[0], **TOL[torch.float64])
    assert shares == [threads] * 4  # forward, backward, no-grad, inference: all threaded
    assert torch.get_num_threads() == threads


def test_chunk_threads_setting(monkeypatch, intra_op_threads):
    """"auto" follows the intra-op thread count up to a cap, never more threads than chunks; "1" keeps one thread; a
    worker's error reaches the caller and the intra-op thread count is restored."""
    intra_op_threads(2)
    assert cpu_kernels._chunk_threads(16) == 2 and cpu_kernels._chunk_threads(1) == 1
    monkeypatch.setattr(cpu_kernels, "CHUNK_THREADS", "1")
    assert cpu_kernels._chunk_threads(16) == 1
    monkeypatch.setattr(cpu_kernels, "CHUNK_THREADS", "auto")
    intra_op_threads(cpu_kernels.CHUNK_THREADS_AUTO_MAX + 2)  # "auto" stops at the cap (one accumulator each)
    assert cpu_kernels._chunk_threads(64) == cpu_kernels.CHUNK_THREADS_AUTO_MAX
    intra_op_threads(2)
    monkeypatch.setattr(cpu_kernels, "CHUNK_THREADS", "auto")
    shares = plan_shares([5, 5, 5, 5], 5, 2)
    seen = []

    def body(chunk, state):
        seen.append((chunk.start, state, torch.get_num_threads()))
        if chunk.start == 15:
            raise RuntimeError("worker failed")

    with pytest.raises(RuntimeError, match="worker failed"):
        cpu_kernels.run_chunks(shares, body, lambda i: f"state{i}")
    assert torch.get_num_threads() == 2
    # Contiguous shares of equal rows, one state per thread, every op single-threaded inside.
    assert sorted((start, state) for start, state, _ in seen) == [(0, "state0"), (5, "state0"), (10, "state1"), (15, "state1")]
    assert {n for _, _, n in seen} == {1}
    # A plan made for two threads meets one allowed thread (the backward reuses the forward's plan): every chunk,
    # in order, on the calling thread with one state.
    seen.clear()
    intra_op_threads(1)
    cpu_kernels.run_chunks(shares, lambda chunk, state: seen.append((chunk.start, state)), lambda i: f"state{i}")
    assert seen == [(0, "state0"), (5, "state0"), (10, "state0"), (15, "state0")]


def test_chunks_on_threads_work_in_a_forked_child(intra_op_threads):
    """A forked child inherits the thread pool object but none of its threads, so work sent there would wait
    forever: the child must make its own pool. The child gives up after 20 s (SIGALRM) instead of hanging."""
    import os
    import signal

    intra_op_threads(2)
    case = make_case(64, 16, 8, 4, 2, dtype=torch.float32, seed=5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "CHUNK_ROWS", 8)
        want = sorted_experts_forward(*case[:5])  # the parent's pool now exists
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            signal.alarm(20)
            try:
                got = sorted_experts_forward(*case[:5])
                os._exit(0 if torch.equal(got, want) else 3)
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child hung (-14 = killed by its alarm) or computed wrong"



def test_matmul_driver_choice():
    x, gate_up, down = torch.zeros(8, 32), torch.zeros(8, 32, 32), torch.zeros(8, 32, 16)
    assert not use_grouped_mm("auto", x, gate_up, down)  # on CPU the chunked loop is faster
    assert use_grouped_mm("grouped_mm", x, gate_up, down)
    assert not use_grouped_mm("loop", x, gate_up, down)
    with pytest.raises(ValueError, match="16-byte"):
        use_grouped_mm("grouped_mm", torch.zeros(8, 30), gate_up, down)
    if torch.cuda.is_available():
        assert use_grouped_mm("auto", x.cuda(), gate_up.cuda(), down.cuda())
        assert not use_grouped_mm("auto", x.double().cuda(), gate_up.double().cuda(), down.double().cuda())


def test_routing_groups_put_sentinels_last_and_keep_token_order():
    idx = torch.tensor([[2, 0], [0, 3], [2, 2]])  # 3 = E: a sentinel; repeated expert within a token is allowed
    groups = group_by_expert(idx, 3)
    assert groups.num_valid == 5
    assert groups.counts_E.tolist() == [2, 0, 3]
    assert groups.valid_token.tolist() == [0, 1, 0, 2, 2]
    assert groups.order_S[-1].item() == 3


def test_registry_auto_picks_the_fast_cpu_backend_and_rejects_unknown_names():
    x = torch.randn(4, 8)
    assert resolve_experts_backend("auto", x) is sorted_experts_forward
    assert EXPERTS_BACKENDS["cpu"] is sorted_experts_forward
    with pytest.raises(ValueError, match="unknown experts_backend"):
        resolve_experts_backend("nope", x)
    with pytest.raises(ValueError, match="cannot run"):
        resolve_experts_backend("triton", x)  # CPU tensor: only the interpreter could run it, and auto never does
    with pytest.raises(ValueError, match="unknown matmul driver"):
        sorted_experts_forward(x, torch.zeros(2, 8, 4), torch.zeros(2, 2, 8), torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1), driver="x")


def _train_steps(gate_up, down, steps, keep_old=False):
    """Steps of `sorted_experts_forward` + backward on leaf weights, `set_to_none` between them as optimizers
    do; returns every step's (d_gate_up, d_down) (clones unless `keep_old`, which keeps the gradients themselves)."""
    grads = []
    for step in range(steps):
        x, _, _, idx, w, upstream = make_case(24, 32, 16, 4, 2, dtype=torch.float32, routing="skewed", seed=step)
        gate_up.grad = down.grad = None
        sorted_experts_forward(x, gate_up, down, idx, w).backward(upstream)
        grads.append((gate_up.grad, down.grad) if keep_old else (gate_up.grad.clone(), down.grad.clone()))
    return grads


def test_weight_gradient_buffers_are_reused_only_when_nobody_holds_them(monkeypatch):
    """With `grad = None` between steps the second backward writes into the first one's buffers (no fresh pages);
    a caller who kept the old gradient gets a new buffer and its values stay as they were; every gradient (empty
    experts' zeros included) equals what fresh buffers give."""
    _, gate_up, down, _, _, _ = make_case(24, 32, 16, 4, 2, dtype=torch.float32, seed=0)
    gate_up.requires_grad_()
    down.requires_grad_()
    fresh_gate_up, fresh_down = gate_up.detach().clone().requires_grad_(), down.detach().clone().requires_grad_()
    monkeypatch.setattr(cpu_kernels, "REUSE_GRAD_BUFFERS", False)
    want = _train_steps(fresh_gate_up, fresh_down, 3)
    monkeypatch.setattr(cpu_kernels, "REUSE_GRAD_BUFFERS", True)

    memory = set()
    for step, (g_gu, g_dn) in enumerate(_train_steps(gate_up, down, 3)):
        torch.testing.assert_close(g_gu, want[step][0], rtol=0, atol=0)
        torch.testing.assert_close(g_dn, want[step][1], rtol=0, atol=0)
        # `.grad` is the handed-out buffer itself (autograd did not copy it) and it is the same memory every step.
        assert gate_up.grad.untyped_storage()._cdata == gate_up._ernie5_grad_buffer.storage._cdata
        memory.add(gate_up._ernie5_grad_buffer.storage._cdata)
    assert len(memory) == 1

    kept = _train_steps(gate_up, down, 3, keep_old=True)
    assert len({g.data_ptr() for g, _ in kept}) == 3  # each kept gradient holds its buffer
    for step, (g_gu, g_dn) in enumerate(kept):
        torch.testing.assert_close(g_gu, want[step][0], rtol=0, atol=0)
        torch.testing.assert_close(g_dn, want[step][1], rtol=0, atol=0)


def test_gradient_accumulation_keeps_one_buffer_per_weight_and_saves_none(monkeypatch):
    """Micro-steps adding into `.grad` (the Trainer's gradient accumulation): the same sums as fresh buffers, the
    slot points at `.grad`'s own memory (no second full-size buffer kept alive), that memory is reused after the
    optimizer step releases `.grad`, and a saved weight carries no gradient memory."""
    import io

    _, gate_up, down, _, _, _ = make_case(24, 32, 16, 4, 2, dtype=torch.float32, seed=0)
    weights = {reuse: (gate_up.clone().requires_grad_(), down.clone().requires_grad_()) for reuse in (False, True)}
    sums = {}
    for reuse, (gu, dn) in weights.items():
        monkeypatch.setattr(cpu_kernels, "REUSE_GRAD_BUFFERS", reuse)
        sums[reuse], memory = [], set()
        for step in range(2):
            gu.grad = dn.grad = None
            for micro in range(2):
                x, _, _, idx, w, upstream = make_case(24, 32, 16, 4, 2, dtype=torch.float32, seed=10 * step + micro)
                sorted_experts_forward(x, gu, dn, idx, w).backward(upstream)
            sums[reuse].append(gu.grad.clone())
            if reuse:
                assert gu._ernie5_grad_buffer.storage._cdata == gu.grad.untyped_storage()._cdata
                memory.add(gu.grad.data_ptr())
        if reuse:
            assert len(memory) == 1
    for got, want in zip(sums[True], sums[False]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(weights[True][0].detach().clone())
    x, _, _, idx, w, upstream = make_case(24, 32, 16, 4, 2, dtype=torch.float32, seed=5)
    sorted_experts_forward(x, holder.weight, down, idx, w).backward(upstream)
    holder.weight.grad = None
    saved = io.BytesIO()
    torch.save(holder, saved)
    assert len(saved.getvalue()) < 1.5 * holder.weight.nbytes


def test_second_order_gradients_are_refused_not_wrong():
    """The backward writes into buffers with `out=` matmuls, so it has no graph: `create_graph=True` through it must
    fail loudly, naming the way out (a gradient penalty would otherwise be silently dropped)."""
    x, gate_up, down, idx, w, upstream = make_case(13, 16, 16, 4, 2, dtype=torch.float64, routing="sentinel")
    x = x.clone().requires_grad_()
    loss = (sorted_experts_forward(x, gate_up.clone().requires_grad_(), down, idx, w) * upstream).sum()
    with pytest.raises(RuntimeError, match="no second-order gradients.*experts_backend='reference'"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_weight_grad_buffer_is_handed_out_again_only_once_released(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "REUSE_GRAD_BUFFERS", True)
    weight = torch.zeros(3, 8, 4)
    slot = cpu_kernels.grad_buffer_slot(weight)
    assert slot is cpu_kernels.grad_buffer_slot(weight)  # one slot per weight
    first = cpu_kernels.weight_grad_buffer(weight, slot)
    view = first[0]
    del first
    second = cpu_kernels.weight_grad_buffer(weight, slot)  # a view of the first is still alive
    assert second.data_ptr() != view.data_ptr()
    third = cpu_kernels.weight_grad_buffer(weight, slot)  # `second` (now the slot's memory) is alive
    assert third.data_ptr() != second.data_ptr()
    where = third.data_ptr()  # the slot now holds the third's memory
    del second, third
    again = cpu_kernels.weight_grad_buffer(weight, slot)
    assert again.data_ptr() == where and again.shape == weight.shape and again.is_contiguous()
    monkeypatch.setattr(cpu_kernels, "REUSE_GRAD_BUFFERS", False)
    assert cpu_kernels.grad_buffer_slot(torch.zeros(2)) is None
