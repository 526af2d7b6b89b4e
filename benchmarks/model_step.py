"""Whole-model benchmark: a small ernie5 model against transformers' Qwen3-MoE with the same dimensions (issue 2,
"Benchmark harness"; issue 3, whole-model target).

Both models are built through their `ForCausalLM` classes (so `post_init` initialises every weight) with the
same vocabulary, hidden size, layers, heads, experts, top-k and expert width; ernie5 runs without shared experts
and without multi-token prediction so that both do the same work per token (its fp32 router and balancing bias
stay on: they are part of the model). The experts back-end of every candidate is set explicitly: ours through
`config.experts_backend`, transformers' through `config._experts_implementation`.

`ernie5:cpu+fused_ce` is the same model with `config.fused_linear_cross_entropy` (the training loss computed
without materialising the logits; it changes the training step only, decoding is identical).

Two measurements, candidates interleaved in every round, medians reported with the load average:
- training step: forward with labels + `loss.backward()` over a (batch, seq) batch, in tokens/s;
- cached greedy decoding: `generate` of `--new-tokens` tokens after a short prompt (DynamicCache), in tokens/s.

The weights of the two models differ (different architectures: Qwen3 has q/k norms, ernie5 Uni-RoPE), so the
routing is alike in distribution (near-uniform at initialisation) but not identical token by token.

Usage:
    python benchmarks/model_step.py --quick
    python benchmarks/model_step.py --batch 4 --seq 512 --rounds 5
    python benchmarks/model_step.py --phases decode --rounds 15 --dtype bfloat16   # decoding alone, many rounds

Writes benchmarks/results/model_step_<dtype>.json (model_step_<phase>_<dtype>.json when one phase is timed) and
the matching .png, and prints a ratio table.
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

from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM  # noqa: E402
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# MoE-dominated small model: the MoE layers use issue 3's target expert shape.
DIMS = dict(
    vocab_size=8192,
    hidden_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=64,
    num_experts_per_tok=8,
    moe_intermediate_size=256,
)


def build_models(dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    ernie = Ernie5ForCausalLM(
        Ernie5Config(**DIMS, intermediate_size=1024, num_shared_experts=0, num_nextn_predict_layers=0,
                     max_position_embeddings=4096)
    )
    torch.manual_seed(seed)
    qwen = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(**DIMS, intermediate_size=1024, norm_topk_prob=True, decoder_sparse_step=1,
                       mlp_only_layers=[], max_position_embeddings=4096, router_aux_loss_coef=0.0)
    )
    return ernie.to(dtype), qwen.to(dtype)


def candidates(ernie, qwen, include_slow: bool, tokens: int):
    def ours(backend, fused_loss=False):
        def setup():
            ernie.config._experts_implementation = "eager"  # Ernie5Experts.forward -> our registry
            ernie.config.experts_backend = backend
            ernie.config.fused_linear_cross_entropy = fused_loss
        return setup

    def theirs(impl):
        def setup():
            qwen.config._experts_implementation = impl
        return setup

    out = [
        ("ernie5:cpu", ernie, ours("cpu")),
        ("ernie5:cpu+fused_ce", ernie, ours("cpu", fused_loss=True)),
        ("qwen3:grouped_mm", qwen, theirs("grouped_mm")),
    ]
    if include_slow:
        out += [("ernie5:reference", ernie, ours("reference")), ("qwen3:eager", qwen, theirs("eager"))]
    # batched_mm copies every chosen expert's weights per (token, slot): only small batches.
    copies = tokens * DIMS["num_experts_per_tok"] * 3 * DIMS["hidden_size"] * DIMS["moe_intermediate_size"] * 4
    if copies <= 2**29:
        out.append(("qwen3:batched_mm", qwen, theirs("batched_mm")))
    return out


def train_step(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()


def decode(model, prompt, new_tokens):
    model.eval()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       use_cache=True, pad_token_id=0)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# phase: (plot title, seconds key, tokens/s key) of the report rows.
PHASES = {
    "train": ("training step", "train_step_s", "train_tokens_per_s"),
    "decode": ("cached decoding", "decode_s", "decode_tokens_per_s"),
}


def run(args) -> dict:
    dtype = getattr(torch, args.dtype)
    ernie, qwen = build_models(dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, DIMS["vocab_size"], (args.batch, args.seq), generator=gen)
    prompt = torch.randint(1, DIMS["vocab_size"], (args.decode_batch, args.prompt), generator=gen)
    cands = candidates(ernie, qwen, args.slow, args.batch * args.seq)
    if "train" not in args.phases:  # the fused loss changes training only: its decoding is the `cpu` row's
        cands = [c for c in cands if c[0] != "ernie5:cpu+fused_ce"]
    work = {
        "train": (lambda model: train_step(model, ids), args.batch * args.seq),
        "decode": (lambda model: decode(model, prompt, args.new_tokens), args.decode_batch * args.new_tokens),
    }
    times = {name: {phase: [] for phase in args.phases} for name, _, _ in cands}
    load_before = os.getloadavg()[0]
    from tqdm import tqdm

    for r in tqdm(range(args.rounds + 1), desc="model_step rounds"):  # round 0 is a discarded warm-up
        order = cands[r % len(cands):] + cands[: r % len(cands)]
        for name, model, setup in order:
            setup()
            for phase in args.phases:
                elapsed = timed(lambda: work[phase][0](model))
                if r:
                    times[name][phase].append(elapsed)
    rows = {name: {} for name in times}
    for phase in args.phases:
        _, seconds_key, rate_key = PHASES[phase]
        for name, row in rows.items():
            median = statistics.median(times[name][phase])
            row.update({seconds_key: median, rate_key: work[phase][1] / median, f"{phase}_runs": times[name][phase]})
        best = max(row[rate_key] for name, row in rows.items() if name.startswith("qwen3:"))
        for row in rows.values():
            row[f"{phase}_vs_hf_best"] = row[rate_key] / best
    return {
        "benchmark": "model_step",
        "dims": DIMS,
        "dtype": args.dtype,
        "phases": list(args.phases),
        "batch": args.batch,
        "seq": args.seq,
        "decode": {"batch": args.decode_batch, "prompt": args.prompt, "new_tokens": args.new_tokens},
        "rounds": args.rounds,
        "params": {"ernie5": sum(p.numel() for p in ernie.parameters()), "qwen3": sum(p.numel() for p in qwen.parameters())},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "results": rows,
    }


def print_table(report: dict) -> None:
    phases = report.get("phases", list(PHASES))
    print(
        f"\n== model_step {report['dtype']} batch={report['batch']}x{report['seq']} decode "
        f"{report['decode']['batch']}x{report['decode']['new_tokens']} new tokens (median of {report['rounds']}; "
        f"load {report['loadavg_before']:.1f}->{report['loadavg_after']:.1f})"
    )
    print(f"{'impl':<22}" + "".join(f"{p + ' ms':>12}{p + ' tok/s':>14}{'xHF':>7}" for p in phases))
    for name, row in report["results"].items():
        cells = []
        for phase in phases:
            _, seconds_key, rate_key = PHASES[phase]
            cells.append(f"{row[seconds_key] * 1e3:>12.1f}{row[rate_key]:>14.1f}{row[f'{phase}_vs_hf_best']:>7.2f}")
        print(f"{name:<22}" + "".join(cells))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    phases = report.get("phases", list(PHASES))
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.8), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        title, _, key = PHASES[phase]
        vals = [report["results"][n][key] for n in names]
        ax.bar(range(len(names)), vals, color=["tab:blue" if n.startswith("ernie5") else "tab:gray" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title} ({report['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2x512, 16 new tokens, 3 rounds, fast back-ends only")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--decode-batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slow", action="store_true", help="also time the reference loop and transformers' eager")
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES),
                        help="what to time (e.g. `--phases decode` for many cheap decoding rounds)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.new_tokens, args.rounds = 2, 512, 16, 3
    torch.set_num_threads(args.threads)
    report = run(args)
    print_table(report)
    # One phase alone gets its own name, so that it does not overwrite a report of both phases.
    phases = "" if set(args.phases) == set(PHASES) else "_".join(args.phases) + "_"
    out = args.out or RESULTS / f"model_step_{phases}{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
