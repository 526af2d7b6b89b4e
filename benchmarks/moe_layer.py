"""Benchmark of one MoE layer: ernie5's experts back-ends against transformers' Qwen3-MoE block (issue 3, item 3).

Whole blocks (router + routed experts) are timed in one process, forward (under `no_grad`) and forward+backward
(gradients for the input and every parameter, a fixed dense random upstream gradient), following the
fair-measurement recipe of ../shared/research/moe_kernels.md §4.2:

- both blocks hold the same initialised weights (normal(0, 0.02)) and the same router weight, so they route the
  same tokens to the same experts (in bf16 transformers' router computes its logits in bf16 and ours in fp32, so
  a few near-tie choices may differ);
- transformers' back-end is set explicitly (`config._experts_implementation`); a standalone block would
  otherwise run its eager loop;
- candidates are interleaved inside every timing round, after a warm-up round, and medians (plus minima) are
  reported together with the load average;
- throughput counts active expert FLOPs only (6·T·k·d·f forward, 18·T·k·d·f forward+backward); the router runs
  inside the timed region of both blocks but is not counted;
- "dense" is the same six GEMMs (forward: 2, backward: 4) with one shared weight instead of per-expert ones:
  the matmul rate this machine reaches on equal FLOPs, the yardstick for "fraction of dense". Where half
  precision is emulated (no AVX512-BF16/AMX), "dense:fp32" runs them in fp32 too and the faster of the two is
  the yardstick;
- peak memory is the peak of PyTorch allocations during one forward+backward above what was live before
  (profiler allocation events; gradients of the parameters included).

Usage:
    python benchmarks/moe_layer.py --quick                 # target shape, fp32 + bf16, a few rounds
    python benchmarks/moe_layer.py                         # T in {512, 2048, 8192} (+4096), two shapes
    python benchmarks/moe_layer.py --shapes target --tokens 4096 --dtypes float32 --rounds 7

Writes benchmarks/results/moe_layer.json and moe_layer.png and prints a ratio table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modeling_ernie5  # noqa: E402,F401  (registers the fast back-ends)
from modeling_ernie5 import Ernie5Config  # noqa: E402
from modeling_ernie5.moe import Ernie5SparseMoeBlock  # noqa: E402
from modeling_ernie5.kernels import cpu as cpu_kernels  # noqa: E402
from modeling_ernie5.kernels.cpu import needs_fp32_compute  # noqa: E402
from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# "target": the shape of issue 3's targets. "ablation": one MoE layer of the paper's ablation model
# (ERNIE 5.0 §6.4.2 as sized by the `ablation-3b` preset): wider experts, 16x the FLOPs per token.
SHAPES = {
    "target": dict(hidden=512, inter=256, experts=64, top_k=8),
    "ablation": dict(hidden=1024, inter=1024, experts=64, top_k=8),
}
OURS = ("ernie5:cpu", "ernie5:reference")
THEIRS = ("qwen3:grouped_mm", "qwen3:eager", "qwen3:batched_mm")
# Per-pair weight copies of batched_mm above this size are not attempted.
BATCHED_MM_LIMIT_BYTES = 2**29


def load_average() -> float:
    return os.getloadavg()[0]


def peak_extra_mib(fn) -> float:
    """Peak of the memory PyTorch allocates while `fn` runs, above what was live before, in MiB.

    Read from the profiler's allocation events (CPU has no allocator peak counter, and the process RSS high-water
    mark is blurred by glibc keeping freed blocks)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def build_blocks(shape: dict, dtype: torch.dtype, seed: int = 0):
    """An ernie5 block and a transformers Qwen3-MoE block with identical weights (no shared experts)."""
    ernie_cfg = Ernie5Config(
        hidden_size=shape["hidden"],
        moe_intermediate_size=shape["inter"],
        num_experts=shape["experts"],
        num_experts_per_tok=shape["top_k"],
        num_shared_experts=0,
    )
    ernie_cfg._experts_implementation = "eager"  # Ernie5Experts.forward -> our registry (config.experts_backend)
    ernie = Ernie5SparseMoeBlock(ernie_cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ernie.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    qwen_cfg = Qwen3MoeConfig(
        hidden_size=shape["hidden"],
        moe_intermediate_size=shape["inter"],
        num_experts=shape["experts"],
        num_experts_per_tok=shape["top_k"],
        norm_topk_prob=True,
    )
    qwen_cfg._experts_implementation = "grouped_mm"
    qwen = Qwen3MoeSparseMoeBlock(qwen_cfg)
    with torch.no_grad():
        qwen.gate.weight.copy_(ernie.gate.weight)
        qwen.experts.gate_up_proj.copy_(ernie.experts.gate_up_proj)  # same (E, out, in) layout
        qwen.experts.down_proj.copy_(ernie.experts.down_proj)
    return ernie.to(dtype), qwen.to(dtype)


class Candidate:
    """One timed implementation: `run(x)` returns the block output (B, L, D)."""

    def __init__(self, name, module, run, setup):
        self.name, self.module, self.run, self.setup = name, module, run, setup


def candidates(ernie, qwen, tokens: int, shape: dict, dtype: torch.dtype, include_slow: bool):
    """Timed implementations; with `include_slow=False` the reference loop and transformers' eager are left out."""
    out = []

    def ours(backend):
        return lambda: setattr(ernie.experts.config, "experts_backend", backend)

    out.append(Candidate("ernie5:cpu", ernie, lambda x: ernie(x)[0], ours("cpu")))
    if include_slow:
        out.append(Candidate("ernie5:reference", ernie, lambda x: ernie(x)[0], ours("reference")))

    def theirs(impl):
        return lambda: setattr(qwen.experts.config, "_experts_implementation", impl)

    out.append(Candidate("qwen3:grouped_mm", qwen, qwen, theirs("grouped_mm")))
    if include_slow:
        out.append(Candidate("qwen3:eager", qwen, qwen, theirs("eager")))
    copies = tokens * shape["top_k"] * 3 * shape["hidden"] * shape["inter"] * torch.finfo(dtype).bits // 8
    if copies <= BATCHED_MM_LIMIT_BYTES:
        out.append(Candidate("qwen3:batched_mm", qwen, qwen, theirs("batched_mm")))
    return out


def dense_gemms(tokens: int, shape: dict, dtype: torch.dtype, seed: int = 1):
    """Forward and forward+backward closures of the six expert GEMMs with one dense weight (equal FLOPs).

    Every right operand is stored column-major (the transpose of a contiguous matrix): on CPUs without native
    bf16 matmul that is the fast layout (several times faster than row-major), and for fp32 it makes no difference,
    so this is the best dense rate either way."""
    gen = torch.Generator().manual_seed(seed)
    s, d, f = tokens * shape["top_k"], shape["hidden"], shape["inter"]

    def col_major(rows, cols):
        return torch.randn(cols, rows, generator=gen).to(dtype).t()

    a = torch.randn(s, d, generator=gen).to(dtype)
    h = torch.randn(s, f, generator=gen).to(dtype)
    dy = torch.randn(s, d, generator=gen).to(dtype)
    dh = torch.randn(s, 2 * f, generator=gen).to(dtype)
    w1, w2 = col_major(d, 2 * f), col_major(f, d)
    w2_t, w1_t = col_major(d, f), col_major(2 * f, d)  # the backward's W^T operands
    h_t, a_t = h.t().contiguous(), a.t().contiguous()
    dy_cm, dh_cm = col_major(s, d), col_major(s, 2 * f)

    def fwd():
        a @ w1
        h @ w2

    def fwd_bwd():
        fwd()
        dy @ w2_t
        h_t @ dy_cm
        dh @ w1_t
        a_t @ dh_cm

    return fwd, fwd_bwd


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_point(shape_name: str, tokens: int, dtype: torch.dtype, rounds: int, include_slow: bool, memory: bool):
    shape = SHAPES[shape_name]
    ernie, qwen = build_blocks(shape, dtype)
    gen = torch.Generator().manual_seed(2)
    x_base = torch.randn(1, tokens, shape["hidden"], generator=gen).to(dtype)
    upstream = torch.randn(1, tokens, shape["hidden"], generator=gen).to(dtype)
    cands = candidates(ernie, qwen, tokens, shape, dtype, include_slow)
    # The yardstick is the best rate this machine gets for these products. Where half-precision matmul is emulated
    # (`needs_fp32_compute`), the same GEMMs in fp32 are several times faster, and that is what ernie5's back-end
    # computes in: measuring "% of dense" against the emulated rate alone gave 336-610% in bf16.
    dense_dtypes = {"dense": dtype}
    if needs_fp32_compute(x_base):
        dense_dtypes["dense:fp32"] = torch.float32
    dense_runs = {name: dense_gemms(tokens, shape, dt) for name, dt in dense_dtypes.items()}

    def forward(c):
        c.setup()
        with torch.no_grad():
            c.run(x_base)

    def forward_backward(c):
        c.setup()
        c.module.zero_grad(set_to_none=True)
        x = x_base.clone().requires_grad_()
        c.run(x).backward(upstream)

    # Parity of every candidate against transformers' grouped_mm (fp32 only: bf16 routing may differ on ties).
    parity = {}
    with torch.no_grad():
        base = next(c for c in cands if c.name == "qwen3:grouped_mm")
        base.setup()
        want = base.run(x_base).float()
        for c in cands:
            c.setup()
            got = c.run(x_base).float()
            parity[c.name] = ((got - want).abs().max() / want.abs().max()).item()

    times = {c.name: {"fwd": [], "fwd_bwd": []} for c in cands}
    for name in dense_runs:
        times[name] = {"fwd": [], "fwd_bwd": []}
    load_before = load_average()
    for r in range(rounds + 1):  # round 0 warms up and is discarded
        order = cands[r % len(cands):] + cands[: r % len(cands)]  # rotate so no candidate always runs first
        for c in order:
            tf = timed(lambda: forward(c))
            tb = timed(lambda: forward_backward(c))
            if r:
                times[c.name]["fwd"].append(tf)
                times[c.name]["fwd_bwd"].append(tb)
        for name, (dense_fwd, dense_fwd_bwd) in dense_runs.items():
            tf, tb = timed(dense_fwd), timed(dense_fwd_bwd)
            if r:
                times[name]["fwd"].append(tf)
                times[name]["fwd_bwd"].append(tb)
    peaks = {}
    if memory:  # one forward+backward each, the untimed slow candidates included (the reference is the bar)
        # With gradient-buffer reuse the weight gradients would land in memory held from the timed rounds and not
        # show up as allocations here: count them as every other candidate's are, freshly allocated.
        reuse, cpu_kernels.REUSE_GRAD_BUFFERS = cpu_kernels.REUSE_GRAD_BUFFERS, False
        try:
            for c in candidates(ernie, qwen, tokens, shape, dtype, include_slow=True):
                if c.name != "qwen3:batched_mm":
                    peaks[c.name] = peak_extra_mib(lambda: forward_backward(c))
                c.module.zero_grad(set_to_none=True)
        finally:
            cpu_kernels.REUSE_GRAD_BUFFERS = reuse
    flops = {"fwd": 6 * tokens * shape["top_k"] * shape["hidden"] * shape["inter"]}
    flops["fwd_bwd"] = 3 * flops["fwd"]
    rows = {}
    for name, t in times.items():
        row = {}
        for phase in ("fwd", "fwd_bwd"):
            med = statistics.median(t[phase])
            row[phase] = {"median_s": med, "min_s": min(t[phase]), "gflops": flops[phase] / med / 1e9, "runs": t[phase]}
        row["peak_extra_mib"] = peaks.pop(name, None)
        row["rel_err_vs_qwen3_grouped_mm"] = parity.get(name)
        rows[name] = row
    for name, peak in peaks.items():  # measured for memory only, not timed
        rows[name] = {"peak_extra_mib": peak, "rel_err_vs_qwen3_grouped_mm": None}
    for phase in ("fwd", "fwd_bwd"):
        hf_best = min(rows[n][phase]["median_s"] for n in rows if n.startswith("qwen3:") and phase in rows[n])
        dense = min(rows[name][phase]["median_s"] for name in dense_runs)
        for name, row in rows.items():
            if phase not in row:
                continue
            row[phase]["speedup_vs_hf_best"] = hf_best / row[phase]["median_s"]
            row[phase]["fraction_of_dense"] = dense / row[phase]["median_s"]
    return {
        "shape": shape_name,
        **shape,
        "tokens": tokens,
        "tokens_per_expert": tokens * shape["top_k"] / shape["experts"],
        "dtype": str(dtype).replace("torch.", ""),
        "rounds": rounds,
        "loadavg_before": load_before,
        "loadavg_after": load_average(),
        "results": rows,
    }


def print_table(point: dict) -> None:
    print(
        f"\n== {point['shape']} D={point['hidden']} F={point['inter']} E={point['experts']} K={point['top_k']} "
        f"T={point['tokens']} {point['dtype']}  (median of {point['rounds']}; load {point['loadavg_before']:.1f}"
        f"->{point['loadavg_after']:.1f})"
    )
    head = f"{'impl':<18}{'fwd ms':>9}{'GF/s':>8}{'xHF':>7}{'%dense':>8}{'f+b ms':>10}{'GF/s':>8}{'xHF':>7}{'%dense':>8}{'peak MiB':>10}{'relerr':>9}"
    print(head)
    for name, row in point["results"].items():
        peak = row["peak_extra_mib"]
        if "fwd" not in row:
            print(f"{name:<18}{'(memory only, not timed)':>75}{peak:>10.0f}")
            continue
        f, b = row["fwd"], row["fwd_bwd"]
        err = row["rel_err_vs_qwen3_grouped_mm"]
        print(
            f"{name:<18}{f['median_s'] * 1e3:>9.1f}{f['gflops']:>8.1f}{f['speedup_vs_hf_best']:>7.2f}"
            f"{100 * f['fraction_of_dense']:>7.0f}%{b['median_s'] * 1e3:>10.1f}{b['gflops']:>8.1f}"
            f"{b['speedup_vs_hf_best']:>7.2f}{100 * b['fraction_of_dense']:>7.0f}%"
            f"{(f'{peak:.0f}' if peak is not None else '-'):>10}{(f'{err:.1e}' if err is not None else '-'):>9}"
        )


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(p["shape"], p["dtype"]) for p in points})
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (shape, dtype) in zip(axes[0], groups):
        pts = sorted((p for p in points if (p["shape"], p["dtype"]) == (shape, dtype)), key=lambda p: p["tokens"])
        names = sorted({n for p in pts for n in p["results"]})
        for name in names:
            xs = [p["tokens"] for p in pts if "fwd_bwd" in p["results"].get(name, {})]
            ys = [p["results"][name]["fwd_bwd"]["gflops"] for p in pts if "fwd_bwd" in p["results"].get(name, {})]
            ax.plot(xs, ys, "--" if name.startswith("dense") else "-o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("fwd+bwd active GFLOP/s")
        ax.set_title(f"{shape} {dtype}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="target shape at T=4096 only, 3 rounds, reference and eager measured for memory only")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    parser.add_argument("--tokens", nargs="+", type=int, default=None)
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per point (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slow-up-to", type=int, default=None,
                        help="run the reference loop and transformers' eager only up to this many tokens")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--out", type=Path, default=RESULTS / "moe_layer.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    shapes = args.shapes or (["target"] if args.quick else ["target", "ablation"])
    tokens = args.tokens or ([4096] if args.quick else [512, 2048, 4096, 8192])
    rounds = args.rounds or (3 if args.quick else 5)
    slow_up_to = args.slow_up_to if args.slow_up_to is not None else (0 if args.quick else 2048)
    from tqdm import tqdm

    plan = [(s, t, d) for s in shapes for t in tokens for d in args.dtypes if not (s == "ablation" and t == 4096)]
    report = {
        "benchmark": "moe_layer",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "points": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for shape, t, dtype in tqdm(plan, desc="moe_layer", unit="point"):
        point = bench_point(shape, t, getattr(torch, dtype), rounds, t <= slow_up_to, not args.no_memory)
        print_table(point)
        report["points"].append(point)
        args.out.write_text(json.dumps(report, indent=1))  # finished points survive an interrupted sweep
    plot(report["points"], args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
