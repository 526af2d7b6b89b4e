"""A lease-sized GPU check (~1 minute on an H200) for the two kernel choices made after the last full
`gpu_moe.py` run:

1. the M-block layout kernel, now one program per group of blocks: `ops.sort_routing` against the plain PyTorch
   routing (the kernel tests' reference) at full sizes, exact equality of every output, and its time next to the
   `torch.sort` it starts with;
2. the weight-gradient GEMM rule (`functions.GROUPED_MM_WEIGHT_GRAD_MIN_INTER`): experts fwd+bwd in bf16 with the
   Triton dW kernel, with `F.grouped_mm`, and with "auto", at an expert width below and two above the threshold.

Usage: python benchmarks/gpu_followup.py (CUDA; writes results/gpu_followup.json). `--smoke` runs tiny sizes, on CPU
under TRITON_INTERPRET=1 in the test suite, so that a lease is never spent on a crash.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from gpu_moe import make_inputs, timer, with_weight_grad_gemm  # noqa: E402
from modeling_ernie5.kernels.triton import functions, ops  # noqa: E402

ROUTING_CASES = [  # tokens, experts, top_k, skewed (3 crowded experts, and a sentinel slot on every 7th token)
    (16384, 64, 6, False), (16384, 128, 8, False), (16384, 64, 6, True), (512, 128, 8, False), (65536, 128, 8, False),
]  # fmt: skip
GEMM_CASES = [  # name, tokens, hidden, expert width, experts, top_k
    ("issue-target", 32768, 512, 256, 64, 8),
    ("ernie-4.5-21b-a3b", 16384, 2560, 1536, 64, 6),
    ("qwen3-30b-a3b", 16384, 2048, 768, 128, 8),
]
SMOKE_ROUTING_CASES = [(37, 6, 3, True), (20, 40, 2, False)]
SMOKE_GEMM_CASES = [("smoke", 24, 32, 16, 4, 2)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ITERS = {"routing": (50, 5), "gemm": (15, 3)}  # (timed, warm-up) calls; --smoke: (1, 1)


def median_ms(fn, iters: int, warmup: int) -> float:
    """Median in ms with `gpu_moe.py`'s timer (CUDA events on a GPU; the recorded run took the upper median of 50)."""
    return timer(torch.device(DEVICE))(fn, iters, warmup) * 1e3


def check_routing(tokens, experts, top_k, skewed) -> dict:
    scores = torch.rand(tokens, experts, device=DEVICE)
    if skewed:
        scores[:, :3] += 5
    w, idx = scores.topk(top_k, dim=1)
    w = w.softmax(-1)
    if skewed:
        idx[::7, -1] = experts  # sentinel: an unused slot
    got = ops.sort_routing(idx, w, experts, torch.float32)
    want = ops.sort_routing_reference(idx, w, experts, torch.float32, got.layout[3])
    return dict(
        mismatched=ops.routing_mismatches(got, want),
        sort_routing_ms=median_ms(lambda: ops.sort_routing(idx, w, experts, torch.bfloat16), *ITERS["routing"]),
        torch_sort_ms=median_ms(lambda: torch.sort(idx.reshape(-1).clamp(max=experts), stable=True), *ITERS["routing"]),
    )


def time_weight_grad_gemms(tokens, hidden, inter, experts, top_k) -> dict:
    x, gate_up, down, idx, w, dy = make_inputs(tokens, hidden, inter, experts, top_k, torch.bfloat16, DEVICE)
    for t in (x, gate_up, down, w):
        t.requires_grad_()
    row = {}
    for choice in ("triton", "grouped_mm", "auto"):  # the order of the recorded run
        step = lambda: torch.autograd.backward(with_weight_grad_gemm(choice, x, gate_up, down, idx, w), dy)  # noqa: E731
        row[f"{choice}_ms"] = median_ms(step, *ITERS["gemm"])
    flops = 18 * tokens * top_k * hidden * inter
    row.update({f"{c}_tflops": flops / row[f"{c}_ms"] / 1e9 for c in functions.WEIGHT_GRAD_GEMMS})
    row["auto_takes_grouped_mm"] = functions.weight_grads_by_grouped_mm(x, gate_up, down)  # with the default "auto"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_followup.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one timed call each (CPU: TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if DEVICE != "cuda" and not args.smoke:
        print("needs CUDA (or --smoke under TRITON_INTERPRET=1)")
        return 2
    routing_cases, gemm_cases = (SMOKE_ROUTING_CASES, SMOKE_GEMM_CASES) if args.smoke else (ROUTING_CASES, GEMM_CASES)
    if args.smoke:
        ITERS.update(routing=(1, 1), gemm=(1, 1))
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (triton interpreter)"
    report = {"device": device_name, "torch": torch.__version__, "routing": {}, "weight_grad_gemm": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for case in routing_cases:
        key = "T{}_E{}_k{}{}".format(*case[:3], "_skewed" if case[3] else "")
        report["routing"][key] = check_routing(*case)
        print(key, report["routing"][key], flush=True)
        args.out.write_text(json.dumps(report, indent=1))
    for name, *dims in gemm_cases:
        report["weight_grad_gemm"][name] = time_weight_grad_gemms(*dims)
        print(name, report["weight_grad_gemm"][name], flush=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0 if not any(r["mismatched"] for r in report["routing"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
