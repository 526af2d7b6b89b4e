"""GPU check of the Triton experts kernels, in one go (issue 3, item 4): correctness first, then bf16 throughput.

1. Correctness, with TF32 off: every Triton launcher (`grouped_gemm` plain / gathered / transposed-B / fused
   SwiGLU, `grouped_gemm_tn` with either side gathered, `swiglu_backward`, `unpermute_sum`) against a plain
   PyTorch computation, then the whole back-end (output and the gradients of x, gate_up, down and the combine
   weights) against the reference loop in fp32 and bf16, over odd widths, skewed loads with empty experts,
   k = E and sentinel slots.
2. Throughput in bf16 at sizes that fill an H100/H200, experts only, every candidate given the same routing:
   ernie5 `triton`, ernie5 `cpu` (sorted PyTorch path, which runs on CUDA through `F.grouped_mm`),
   transformers' `grouped_mm`, `batched_mm` and `eager` on a `Qwen3MoeExperts` holding the same weights, and
   bare `torch.nn.functional.grouped_mm` on pre-sorted rows (the two GEMMs plus SwiGLU, autograd for backward).
   Forward and forward+backward (dense upstream gradient), CUDA-event timing, median of `--iters` rounds (each
   round times every candidate once, in rotating order). Two extra rows: ernie5 `triton` with its Triton
   weight-gradient kernel forced (`auto` may take `F.grouped_mm` there), and ernie5
   `triton` / transformers' `grouped_mm` replayed from CUDA graphs, i.e. with the host's share removed.
   Reports TFLOP/s of active expert FLOPs (6·T·k·d·f / 18·T·k·d·f), the fraction of a measured dense bf16
   matmul rate on this GPU, and the speed-of-light fraction max(FLOPs/dense rate, bytes/bandwidth) / time with
   the bandwidth measured by a device copy (research note moe_kernels.md §5). `--breakdown` adds, per point, the
   device time of each kernel and the costliest host calls (torch profiler), and a cProfile of the host path.

Usage (CUDA machine, `pip install 'ernie5[triton]'`):
    python benchmarks/gpu_moe.py                  # everything, writes benchmarks/results/gpu_moe.json
    python benchmarks/gpu_moe.py --quick          # fewer shapes and iterations
    TRITON_INTERPRET=1 python benchmarks/gpu_moe.py --smoke   # tiny sizes on CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modeling_ernie5  # noqa: E402,F401
from modeling_ernie5.kernels.cpu import sorted_experts_forward  # noqa: E402
from modeling_ernie5.kernels.routing import group_by_expert  # noqa: E402
from modeling_ernie5.kernels.triton import triton_experts_forward  # noqa: E402
from modeling_ernie5.moe import reference_experts_forward  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# name: (hidden, inter, experts, top_k); points are (name, tokens) in the order they run, the large-T points that
# the issue's GPU target is about first, so a run cut short by --budget_s still has them.
DIMS = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "ernie4.5-21b-a3b": (2560, 1536, 64, 6),
    "issue3-target": (512, 256, 64, 8),
    "smoke": (32, 16, 4, 2),
}
POINTS = [
    ("ernie4.5-21b-a3b", 16384), ("qwen3-30b-a3b", 16384), ("qwen3-30b-a3b", 4096), ("issue3-target", 32768),
    ("ernie4.5-21b-a3b", 4096), ("qwen3-30b-a3b", 512), ("issue3-target", 4096), ("ernie4.5-21b-a3b", 512),
]
QUICK_POINTS = POINTS[:3]
SMOKE_POINTS = [("smoke", 24)]


# ------------------------------------------------------------------------------------------------ inputs


def make_inputs(tokens, hidden, inter, experts, top_k, dtype, device, routing="uniform", seed=0):
    # Drawn on the device itself: the large timing shapes hold ~0.5 G weights, slow to draw on one CPU thread.
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=gen, device=device)
    x = torch.randn(tokens, hidden, **kw)
    gate_up = torch.randn(experts, 2 * inter, hidden, **kw) / hidden**0.5  # (out, in) per expert, as Ernie5Experts
    down = torch.randn(experts, hidden, inter, **kw) / inter**0.5
    scores = torch.rand(tokens, experts, **kw)
    if routing == "skewed":
        scores[:, :2] += 10.0 * (torch.rand(tokens, 1, **kw) < 0.9)
        scores[:, experts // 2 :] -= 100.0
    idx = scores.topk(top_k, dim=-1).indices
    w = torch.rand(tokens, top_k, **kw) + 0.1
    if routing == "sentinel":
        k_tok = torch.randint(0, top_k + 1, (tokens,), **kw)
        empty = torch.arange(top_k, device=device)[None, :] >= k_tok[:, None]
        idx, w = idx.masked_fill(empty, experts), w.masked_fill(empty, 0.0)
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    upstream = torch.randn(tokens, hidden, **kw)
    cast = lambda t: t.to(dtype=dtype)  # noqa: E731
    return cast(x), cast(gate_up), cast(down), idx, cast(w), cast(upstream)


def rel_err(a, b) -> float:
    if a.numel() == 0:
        return 0.0
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


# ------------------------------------------------------------------------------------------- correctness


def check_launchers(device) -> dict:
    """Each launcher of ops.py against plain PyTorch on the same sorted layout (fp32, TF32 off)."""
    from modeling_ernie5.kernels.triton import ops

    out = {}
    tokens, hidden, inter, experts, top_k = (45, 100, 60, 6, 3) if device.type == "cuda" else (21, 40, 24, 4, 2)
    x, gate_up, down, idx, w, dy = make_inputs(tokens, hidden, inter, experts, top_k, torch.float32, device, "skewed")
    groups = group_by_expert(idx, experts)
    rows, tok = groups.num_valid, groups.valid_token
    routing = ops.sort_routing(idx, w, experts, torch.float32)
    for name, got, want in (("order", routing.order_S, groups.order_S), ("token", routing.token_S, groups.token_S),
                            ("offsets", routing.offsets_E, groups.offsets_E), ("counts", routing.counts_E, groups.counts_E)):
        out[f"sort_routing({name})"] = float((got != want).sum())
    layout = routing.layout
    bounds = list(zip((groups.offsets_E - groups.counts_E).tolist(), groups.offsets_E.tolist()))

    def per_expert(a_rows, b_E):
        return torch.cat([a_rows[s:e] @ b_E[i] for i, (s, e) in enumerate(bounds)])

    x_S = x[tok]
    gu_B = gate_up.transpose(1, 2)  # the forward's (E, in, out) operand: a column-major view of the weights
    c, _ = ops.grouped_gemm(x, gu_B, layout, rows, gather=tok)
    out["grouped_gemm(gather)"] = rel_err(c, per_expert(x_S, gu_B))
    c, _ = ops.grouped_gemm(x_S.contiguous(), gu_B, layout, rows)
    out["grouped_gemm(plain)"] = rel_err(c, per_expert(x_S, gu_B))
    g_SD = torch.randn(rows, 2 * inter, device=device)
    c, _ = ops.grouped_gemm(g_SD, gate_up, layout, rows)
    out["grouped_gemm(row-major B)"] = rel_err(c, per_expert(g_SD, gate_up))
    w_S = w.reshape(-1)[groups.valid_order].contiguous()
    a, h = ops.grouped_gemm(x, gu_B, layout, rows, gather=tok, swiglu=True, w_S=w_S, store_h=True)
    h_ref = per_expert(x_S, gu_B)
    out["grouped_gemm(swiglu h)"] = rel_err(h, h_ref)
    out["grouped_gemm(swiglu act*w)"] = rel_err(a, F.silu(h_ref[:, :inter]) * h_ref[:, inter:] * w_S[:, None])
    dW = ops.grouped_gemm_tn(x, h_ref, groups.counts_E, groups.offsets_E, torch.float32, a_gather=tok)
    dW_ref = torch.stack([x_S[s:e].t() @ h_ref[s:e] for s, e in bounds])
    out["grouped_gemm_tn(a_gather)"] = rel_err(dW, dW_ref)
    dW = ops.grouped_gemm_tn(a, dy, groups.counts_E, groups.offsets_E, torch.float32, b_gather=tok)
    dy_S = dy[tok]
    out["grouped_gemm_tn(b_gather)"] = rel_err(dW, torch.stack([a[s:e].t() @ dy_S[s:e] for s, e in bounds]))
    g_SF = torch.randn(rows, inter, device=device)
    dh, aw, dw = ops.swiglu_backward(g_SF, h_ref.contiguous(), w_S, groups.offsets_E[-1:],
                                     torch.arange(rows, device=device), torch.float32)
    gate, up = h_ref[:, :inter], h_ref[:, inter:]
    sig = torch.sigmoid(gate)
    out["swiglu_backward(dh)"] = rel_err(
        dh, torch.cat([g_SF * w_S[:, None] * up * sig * (1 + gate * (1 - sig)), g_SF * w_S[:, None] * gate * sig], 1)
    )
    out["swiglu_backward(aw)"] = rel_err(aw, F.silu(gate) * up * w_S[:, None])
    out["swiglu_backward(dw)"] = rel_err(dw, (g_SF * F.silu(gate) * up).sum(-1))
    pos = torch.full((tokens * top_k,), -1, dtype=torch.long, device=device)
    pos[groups.valid_order] = torch.arange(rows, device=device)
    y = torch.randn(rows, hidden, device=device)
    got = ops.unpermute_sum(y, pos.view(tokens, top_k), torch.float32)
    want = torch.zeros(tokens, hidden, device=device).index_add_(0, tok, y)
    out["unpermute_sum"] = rel_err(got, want)
    return out


def with_weight_grad_gemm(choice, *args):
    """The Triton back-end with its weight-gradient GEMM forced (the choice is made in the forward)."""
    from modeling_ernie5.kernels.triton import functions

    saved, functions.WEIGHT_GRAD_GEMM = functions.WEIGHT_GRAD_GEMM, choice
    try:
        return triton_experts_forward(*args)
    finally:
        functions.WEIGHT_GRAD_GEMM = saved


def check_backend(device) -> dict:
    """The whole Triton back-end vs the reference: output and every gradient."""
    out = {}
    cases = [
        ("odd-sentinel", (37, 100, 60, 8, 3), "sentinel"),
        ("skewed-empty", (64, 128, 64, 8, 2), "skewed"),
        ("k=E", (16, 64, 32, 4, 4), "uniform"),
    ]
    if device.type == "cuda":  # the interpreter (--smoke) would take minutes on this one
        cases.append(("larger", (512, 256, 128, 16, 4), "uniform"))
    for name, sizes, routing in cases:
        # bf16 with either weight-gradient GEMM ("auto" picks by expert width; grouped_mm needs 16-byte rows).
        variants = [(torch.float32, "auto"), (torch.bfloat16, "triton")]
        if sizes[1] % 8 == 0 and sizes[2] % 8 == 0:
            variants.append((torch.bfloat16, "grouped_mm"))
        for dtype, dw_gemm in variants:
            x, gu, dn, idx, w, dy = make_inputs(*sizes, torch.float32, device, routing, seed=len(name))
            ref_leaves = [t.clone().requires_grad_() for t in (x, gu, dn, w)]
            ref_out = reference_experts_forward(ref_leaves[0], ref_leaves[1], ref_leaves[2], idx, ref_leaves[3])
            ref = [ref_out, *torch.autograd.grad(ref_out, ref_leaves, dy)]
            leaves = [t.to(dtype).clone().requires_grad_() for t in (x, gu, dn, w)]
            got_out = with_weight_grad_gemm(dw_gemm, leaves[0], leaves[1], leaves[2], idx, leaves[3])
            got = [got_out, *torch.autograd.grad(got_out, leaves, dy.to(dtype))]
            errs = {k: rel_err(g, r) for k, g, r in zip(("out", "dx", "dgate_up", "ddown", "dw"), got, ref)}
            out[f"{name}/{str(dtype).replace('torch.', '')}/dW {dw_gemm}"] = errs
    return out


# ---------------------------------------------------------------------------------------------- timing


def timer(device):
    if device.type == "cuda":
        def run(fn, iters, warmup):
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)
    else:
        def run(fn, iters, warmup):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
    return run


def dense_rate(device, dtype, measure, smoke) -> float:
    """Dense matmul FLOP/s of this device in `dtype` (best of a few square-ish sizes)."""
    sizes = [(64, 64, 64)] if smoke else [(8192, 8192, 8192), (16384, 4096, 4096), (4096, 8192, 2048)]
    best = 0.0
    for m, n, k in sizes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        t = measure(lambda: a @ b, 3 if smoke else 20, 1 if smoke else 5)
        best = max(best, 2 * m * n * k / t)
    return best


def copy_bandwidth(device, measure, smoke) -> float:
    n = 2**16 if smoke else 2**28  # 1 GiB of fp32 on a GPU
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), 3 if smoke else 20, 1 if smoke else 5)
    return 2 * n * 4 / t


def layout_comparison(device, measure, smoke, iters, warmup) -> dict:
    """The experts' forward GEMMs (fused gather + gate_up + SwiGLU, then down) with the weights stored (E, in, out),
    as in the H200 runs of the 5th session, against (E, out, in) read through a transposed view, as now. Each
    layout is autotuned for itself (the autotuner's key does not include strides, so its cache is cleared)."""
    from modeling_ernie5.kernels.triton import ops

    name, tokens = SMOKE_POINTS[0] if smoke else ("ernie4.5-21b-a3b", 16384)
    hidden, inter, experts, top_k = DIMS[name]
    x, gate_up, down, idx, w, _ = make_inputs(tokens, hidden, inter, experts, top_k, torch.bfloat16, device)
    rows = tokens * top_k
    routing = ops.sort_routing(idx, w, experts, torch.bfloat16)
    out = {"shape": name, "tokens": tokens}
    variants = {
        "E_in_out_contiguous": (gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()),
        "E_out_in_transposed_view": (gate_up.transpose(1, 2), down.transpose(1, 2)),
    }
    for label, (gate_up_B, down_B) in variants.items():
        for tuned in (ops._grouped_gemm_tuned, ops._grouped_gemm_swiglu_tuned):
            tuned.cache.clear()

        def forward(gu=gate_up_B, dn=down_B):
            a, _ = ops.grouped_gemm(x, gu, routing.layout, rows, gather=routing.token_S, swiglu=True, w_S=routing.w_S)
            ops.grouped_gemm(a, dn, routing.layout, rows)

        out[f"{label}_fwd_ms"] = measure(forward, iters, warmup) * 1e3
    out["new_over_old"] = out["E_out_in_transposed_view_fwd_ms"] / out["E_in_out_contiguous_fwd_ms"]
    return out


def hf_experts(impl, gate_up, down):
    """transformers' Qwen3-MoE experts module holding our weights (the same (E, out, in) layout)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    experts, two_f, hidden = gate_up.shape
    cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=two_f // 2, num_experts=experts)
    cfg._experts_implementation = impl
    module = Qwen3MoeExperts(cfg).to(device=gate_up.device, dtype=gate_up.dtype)
    with torch.no_grad():
        module.gate_up_proj.copy_(gate_up)
        module.down_proj.copy_(down)
    return module


# Public since torch 2.10 or so; older builds with the CUDA kernel expose the private op.
GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def bare_grouped_mm(x, gate_up, down, idx, w):
    """The floor of a PyTorch implementation: sort, two grouped matmuls with SwiGLU, weighted scatter-add."""
    groups = group_by_expert(idx, gate_up.shape[0])
    offs = groups.offsets_E.to(torch.int32)
    tok = groups.valid_token
    h = GROUPED_MM(x[tok], gate_up.transpose(1, 2), offs=offs)
    inter = h.shape[1] // 2
    a = F.silu(h[:, :inter]) * h[:, inter:]
    y = GROUPED_MM(a, down.transpose(1, 2), offs=offs) * w.reshape(-1)[groups.valid_order, None]
    return torch.zeros_like(x).index_add(0, tok, y)


GRAPHED = "graph:"
GRAPH_CANDIDATES = ("ernie5:triton", "hf:grouped_mm")


def cuda_graphed(step):
    """`step` captured once into a CUDA graph (after a warm-up on a side stream, as PyTorch asks); returns its
    replay. Only a step that never waits for the device can be captured: ernie5's Triton path is built to be one."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def host_profile(hidden, inter, experts, top_k, tokens, device, calls=20, top=25) -> dict:
    """Where the host spends a Triton forward and a forward+backward at a small T (cProfile, no device sync inside
    the calls): the Python functions with the most own time, and the host microseconds per call."""
    import cProfile
    import io
    import pstats

    x, gu, dn, idx, w, dy = make_inputs(tokens, hidden, inter, experts, top_k, torch.bfloat16, device)
    gu.requires_grad_()
    dn.requires_grad_()
    xg = x.clone().requires_grad_()
    steps = {
        "forward": lambda: triton_experts_forward(x, gu.detach(), dn.detach(), idx, w),
        "forward_backward": lambda: triton_experts_forward(xg, gu, dn, idx, w).backward(dy),
    }
    found = {}
    for label, step in steps.items():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        host_us = (time.perf_counter() - t0) / calls * 1e6
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            step()
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
        found[label] = {"host_us_per_call": host_us, "profile": text.getvalue()[-6000:]}
    return found


def bench_shape(name, hidden, inter, experts, top_k, tokens, device, measure, iters, warmup, dense, bandwidth):
    dtype = torch.bfloat16
    x, gu, dn, idx, w, dy = make_inputs(tokens, hidden, inter, experts, top_k, dtype, device)
    flops_f = 6 * tokens * top_k * hidden * inter
    active = int(torch.unique(idx[idx < experts]).numel())
    bytes_f = 3 * active * hidden * inter * 2 + 2 * tokens * hidden * 2 + tokens * top_k * 8
    bytes_fb = 2 * bytes_f + 3 * active * hidden * inter * 4 + 3 * tokens * hidden * 2
    fns = {
        "ernie5:triton": lambda a, b, c: triton_experts_forward(a, b, c, idx, w),
        "ernie5:triton(dW triton)": lambda a, b, c: with_weight_grad_gemm("triton", a, b, c, idx, w),
        "ernie5:cpu(sorted+grouped_mm)": lambda a, b, c: sorted_experts_forward(a, b, c, idx, w),
    }
    if GROUPED_MM is not None:
        fns["torch:F.grouped_mm(bare)"] = lambda a, b, c: bare_grouped_mm(a, b, c, idx, w)
    modules = {}
    for impl in ("grouped_mm", "batched_mm", "eager"):
        copies = tokens * top_k * 3 * hidden * inter * 2
        if impl == "batched_mm" and copies > 8 * 2**30:
            continue
        if impl == "eager" and tokens > 4096:
            continue
        modules[f"hf:{impl}"] = hf_experts(impl, gu, dn)
    rows = {}
    candidates = list(fns.items()) + [(k, None) for k in modules]
    if device.type == "cuda":  # the same steps replayed from CUDA graphs: what is left once host overhead is gone
        candidates += [(GRAPHED + k, fns.get(k)) for k in GRAPH_CANDIDATES if k in fns or k in modules]
    prepared = {}
    for cand, fn in candidates:
        base = cand.removeprefix(GRAPHED)
        if base in modules:
            mod = modules[base]
            params = [mod.gate_up_proj, mod.down_proj]
            fwd = lambda xx, m=mod: m(xx, idx, w)  # noqa: E731
        else:
            params = [gu.clone().requires_grad_(), dn.clone().requires_grad_()]
            fwd = lambda xx, f=fn, p=params: f(xx, p[0], p[1])  # noqa: E731
        xg = x.clone().requires_grad_()

        def run_fwd(fwd=fwd):
            with torch.no_grad():
                fwd(x)

        def run_fwd_bwd(fwd=fwd, params=params, xg=xg):
            for p in params:
                p.grad = None
            xg.grad = None
            fwd(xg).backward(dy)

        try:
            if cand.startswith(GRAPHED):
                run_fwd, run_fwd_bwd = cuda_graphed(run_fwd), cuda_graphed(run_fwd_bwd)
            measure(run_fwd, 1, warmup)  # compiles, autotunes and warms up; a failure shows here
            measure(run_fwd_bwd, 1, warmup)
        except Exception as exc:  # a back-end that cannot run this shape is recorded, not fatal
            rows[cand] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        prepared[cand] = (run_fwd, run_fwd_bwd)
    # Rounds rotate through the candidates, each timed once per round, so clock and thermal drift and any
    # background work fall on all of them alike (timing each candidate's calls back to back gave two identical
    # forwards 7-27% apart in one run).
    names = list(prepared)
    times = {cand: ([], []) for cand in names}
    for r in range(iters):
        for cand in names[r % len(names):] + names[: r % len(names)]:
            run_fwd, run_fwd_bwd = prepared[cand]
            times[cand][0].append(measure(run_fwd, 1, 0))
            times[cand][1].append(measure(run_fwd_bwd, 1, 0))
    for cand, (fwd_times, fwd_bwd_times) in times.items():
        tf, tb = statistics.median(fwd_times), statistics.median(fwd_bwd_times)
        rows[cand] = {
            "fwd_ms": tf * 1e3,
            "fwd_ms_min_max": [min(fwd_times) * 1e3, max(fwd_times) * 1e3],
            "fwd_tflops": flops_f / tf / 1e12,
            "fwd_fraction_of_dense": flops_f / tf / dense,
            "fwd_sol": max(flops_f / dense, bytes_f / bandwidth) / tf,
            "fwd_bwd_ms": tb * 1e3,
            "fwd_bwd_ms_min_max": [min(fwd_bwd_times) * 1e3, max(fwd_bwd_times) * 1e3],
            "fwd_bwd_tflops": 3 * flops_f / tb / 1e12,
            "fwd_bwd_fraction_of_dense": 3 * flops_f / tb / dense,
            "fwd_bwd_sol": max(3 * flops_f / dense, bytes_fb / bandwidth) / tb,
        }
    del prepared
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for cand, r in rows.items():
        # Graph replays are compared with transformers' back-ends replayed the same way, plain runs with plain runs.
        prefix = GRAPHED if cand.startswith(GRAPHED) else ""
        hf = [h for k, h in rows.items() if k.startswith(prefix + "hf:") and "error" not in h]
        if "error" in r or not hf:
            continue
        r["fwd_vs_hf_best"] = min(h["fwd_ms"] for h in hf) / r["fwd_ms"]
        r["fwd_bwd_vs_hf_best"] = min(h["fwd_bwd_ms"] for h in hf) / r["fwd_bwd_ms"]
    return {"shape": name, "hidden": hidden, "inter": inter, "experts": experts, "top_k": top_k, "tokens": tokens,
            "tokens_per_expert": tokens * top_k / experts, "results": rows}


def kernel_breakdown(hidden, inter, experts, top_k, tokens, device, iters=5) -> dict:
    """Where one forward+backward spends its time (torch profiler), ernie5 `triton` against HF `grouped_mm`: device
    time per kernel (us per step, largest first), the wall time per step, and the host calls that cost the most
    (a wall time well above the summed kernel time means the GPU waited for the host)."""
    from torch.profiler import ProfilerActivity, profile

    x, gu, dn, idx, w, dy = make_inputs(tokens, hidden, inter, experts, top_k, torch.bfloat16, device)
    mod = hf_experts("grouped_mm", gu, dn)
    params = [gu.clone().requires_grad_(), dn.clone().requires_grad_()]
    runs = {
        "ernie5:triton": (lambda xx: triton_experts_forward(xx, params[0], params[1], idx, w), params),
        "hf:grouped_mm": (lambda xx: mod(xx, idx, w), [mod.gate_up_proj, mod.down_proj]),
    }
    found = {}
    for cand, (fwd, leaves) in runs.items():
        xg = x.clone().requires_grad_()

        def step():
            for t in (*leaves, xg):
                t.grad = None
            fwd(xg).backward(dy)

        step()  # compiled and tuned already by the timing pass
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - t0) / iters * 1e6
        kernels, host = {}, {}
        for evt in prof.key_averages():
            name = evt.key[:90]
            if str(evt.device_type).endswith("CUDA"):
                us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
                kernels[name] = kernels.get(name, 0.0) + us / iters
            else:
                host[name] = host.get(name, 0.0) + evt.self_cpu_time_total / iters
        top = lambda d, n: dict(sorted(d.items(), key=lambda kv: -kv[1])[:n])  # noqa: E731
        found[cand] = {"wall_us_per_step": wall_us, "kernel_us_per_step": sum(kernels.values()),
                       "kernels": top(kernels, 10), "host_self_us": top(host, 8)}
    return found


def plot(report: dict, path: Path) -> None:
    """TFLOP/s against tokens, one panel per shape and pass, with the measured dense rate and 60% of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(p["shape"] for p in report["points"]))
    fig, axes = plt.subplots(2, len(shapes), figsize=(5 * len(shapes), 7.5), squeeze=False)
    dense = report["dense_bf16_tflops"]
    for col, shape in enumerate(shapes):
        pts = sorted((p for p in report["points"] if p["shape"] == shape), key=lambda p: p["tokens"])
        names = list(dict.fromkeys(n for p in pts for n in p["results"]))
        for row, (key, label) in enumerate((("fwd_tflops", "forward"), ("fwd_bwd_tflops", "forward+backward"))):
            ax = axes[row][col]
            for name in names:
                xy = [(p["tokens"], p["results"][name][key]) for p in pts if key in p["results"].get(name, {})]
                if xy:
                    ax.plot(*zip(*xy), "-o", label=name, lw=2.5 if name == "ernie5:triton" else 1.2)
            ax.axhline(dense, ls="--", c="gray", lw=1, label=f"dense bf16 matmul {dense:.0f}")
            ax.axhline(0.6 * dense, ls=":", c="gray", lw=1, label="60% of dense")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens T")
            ax.set_ylabel("TFLOP/s (active expert FLOPs)")
            ax.set_title(f"{shape}, {label}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(f"{report['device']}, bf16, torch {report['versions']['torch']}, triton {report['versions']['triton']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tuned_configs(ops) -> dict:
    """The tile the autotuner picked for each key it has seen (empty when autotuning was off)."""
    found = {}
    for name in ("_grouped_gemm_swiglu_tuned", "_grouped_gemm_tuned", "_grouped_gemm_tn_tuned"):
        for key, config in getattr(getattr(ops, name), "cache", {}).items():
            found[f"{name}{key}"] = str(config)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--breakdown", action="store_true", help="per-kernel device and host times at every point")
    parser.add_argument("--points", nargs="*", default=None, metavar="SHAPE:T",
                        help=f"run only these points, e.g. qwen3-30b-a3b:4096 (shapes: {', '.join(DIMS)})")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="start no new timing point after this many seconds (a lent GPU's time is short)")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="only draw the plot of a saved report (next to it, .png), e.g. one fetched from a GPU box")
    parser.add_argument("--out", type=Path, default=None, help="defaults to results/gpu_moe.json (gpu_moe_smoke.json with --smoke)")
    args = parser.parse_args(argv)
    if args.replot is not None:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        print(f"wrote {args.replot.with_suffix('.png')}")
        return 0
    if args.out is None:  # a CPU smoke run must never pass for (or overwrite) a real GPU result
        args.out = RESULTS / ("gpu_moe_smoke.json" if args.smoke else "gpu_moe.json")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # correctness pass compares against IEEE fp32
        torch.backends.cudnn.allow_tf32 = False
    elif args.smoke and os.environ.get("TRITON_INTERPRET") == "1":
        device = torch.device("cpu")
    else:
        print("no CUDA device: run on a GPU machine, or use --smoke with TRITON_INTERPRET=1")
        return 2
    import triton

    from modeling_ernie5.kernels.triton import ops

    started = time.perf_counter()
    report = {
        "benchmark": "gpu_moe",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (triton interpreter)",
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
    }
    print(f"device: {report['device']}  versions: {report['versions']}", flush=True)
    ops.AUTOTUNE = False  # correctness needs every code path, not the best tile: one compile per variant
    failures = []
    for part, check in (("launchers", check_launchers), ("backend", check_backend)):
        try:
            report[part] = check(device)
        except Exception as exc:  # e.g. a kernel that does not compile: record it and still time the others
            report[part] = {}
            failures.append(f"{part}: {type(exc).__name__}: {exc}"[:2000])
            traceback.print_exc()
    failures += [k for k, v in report["launchers"].items() if v > 1e-4]
    for case, errs in report["backend"].items():
        limit = 1e-4 if "/float32/" in case else 4e-2
        failures += [f"{case}:{k}" for k, v in errs.items() if v > limit]
    print("launchers:", json.dumps(report["launchers"], indent=1))
    print("backend:", json.dumps(report["backend"], indent=1))
    report["correctness_failures"] = failures
    report["correctness_s"] = time.perf_counter() - started
    print("correctness:", "OK" if not failures else f"FAILED {failures}", f"({report['correctness_s']:.0f} s)",
          flush=True)
    ops.AUTOTUNE = device.type == "cuda"

    measure = timer(device)
    dense = dense_rate(device, torch.bfloat16, measure, args.smoke)
    bandwidth = copy_bandwidth(device, measure, args.smoke)
    report["dense_bf16_tflops"] = dense / 1e12
    report["copy_bandwidth_gbs"] = bandwidth / 1e9
    print(f"dense bf16 matmul: {dense / 1e12:.1f} TFLOP/s, copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    iters = args.iters or (2 if args.smoke else 10 if args.quick else 25)
    warmup = 1 if args.smoke else 3
    try:
        report["layout"] = layout_comparison(device, measure, args.smoke, iters, warmup)
        print("forward GEMMs by weight layout (ms):", json.dumps(report["layout"]), flush=True)
    except Exception as exc:  # a diagnostic; never worth losing the timings below
        report["layout"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        traceback.print_exc()
    points = SMOKE_POINTS if args.smoke else QUICK_POINTS if args.quick else POINTS
    if args.points:
        points = [(spec.rsplit(":", 1)[0], int(spec.rsplit(":", 1)[1])) for spec in args.points]
        unknown = [n for n, _ in points if n not in DIMS]
        if unknown:
            parser.error(f"unknown shape(s) {unknown}; known: {list(DIMS)}")
    report["points"] = []
    report["skipped_points"] = []
    for name, tokens in points:
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            report["skipped_points"].append(f"{name} T={tokens}")
            continue
        t_point = time.perf_counter()
        point = bench_shape(name, *DIMS[name], tokens, device, measure, iters, warmup, dense, bandwidth)
        point["seconds"] = time.perf_counter() - t_point
        report["points"].append(point)
        report["autotuned"] = tuned_configs(ops)
        if device.type == "cuda" and args.breakdown:
            try:
                point["breakdown"] = kernel_breakdown(*DIMS[name], tokens, device)
                for cand, b in point["breakdown"].items():
                    print(f"{cand}: wall {b['wall_us_per_step']:.0f} us/step, kernels {b['kernel_us_per_step']:.0f} us")
                    for kname, us in b["kernels"].items():
                        print(f"  {us:9.1f}  {kname}")
                    print("  host (self):", ", ".join(f"{k[:40]} {v:.0f}" for k, v in b["host_self_us"].items()))
            except Exception as exc:  # a profiler problem must not cost the timings
                point["breakdown"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"\n== {name} T={tokens} ({point['tokens_per_expert']:.0f} tokens/expert), bf16, "
              f"{point['seconds']:.0f} s incl. autotuning")
        print(f"{'impl':<30}{'fwd ms':>9}{'TF/s':>8}{'%dense':>8}{'xHF':>6}{'f+b ms':>10}{'TF/s':>8}{'%dense':>8}{'xHF':>6}{'SOL':>6}")
        for cand, r in point["results"].items():
            if "error" in r:
                print(f"{cand:<30} error: {r['error'][:80]}")
                continue
            print(f"{cand:<30}{r['fwd_ms']:>9.3f}{r['fwd_tflops']:>8.1f}{100 * r['fwd_fraction_of_dense']:>7.0f}%"
                  f"{r.get('fwd_vs_hf_best', float('nan')):>6.2f}{r['fwd_bwd_ms']:>10.3f}{r['fwd_bwd_tflops']:>8.1f}"
                  f"{100 * r['fwd_bwd_fraction_of_dense']:>7.0f}%{r.get('fwd_bwd_vs_hf_best', float('nan')):>6.2f}"
                  f"{r['fwd_bwd_sol']:>6.2f}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))  # keep finished points if a later one crashes
    if device.type == "cuda" and args.breakdown:
        try:
            report["host_profile"] = host_profile(*DIMS["qwen3-30b-a3b"], 512, device)
            for label, prof in report["host_profile"].items():
                print(f"\nhost time per {label} call at qwen3-30b-a3b T=512: {prof['host_us_per_call']:.0f} us")
                print(prof["profile"])
        except Exception as exc:
            report["host_profile"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    if report["skipped_points"]:
        print(f"\nskipped (over --budget_s): {report['skipped_points']}")
    report["total_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out} after {report['total_s']:.0f} s")
    if report["points"]:
        try:
            plot(report, args.out.with_suffix(".png"))
        except ImportError:
            print("matplotlib is not installed: no plot (draw it later with --replot)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
