"""Trade-off report of an elastic checkpoint: a grid of sub-models, each cut and measured (ERNIE 5.0 §6.4.2, Tables
9-11; DESIGN.md §4).

For every (layers, experts, top-k) point the sub-model is extracted with `modeling_ernie5.elastic.extract_submodel`
(experts chosen by routing usage on a calibration slice of the validation data, disjoint from the part that is
scored), then measured: next-token validation loss, active and total non-embedding parameters (absolute and as
a fraction of the full model), and greedy decode speed (tokens/s, batch 1, KV cache). Results are written as
`elastic_grid.json`, `elastic_grid.md` and `elastic_grid.png` (loss vs active parameters, loss vs latency).

    python eval/elastic_grid.py --checkpoint outputs/tiny_elastic --grid 4:16:2 3:16:2 4:8:2 4:16:1 3:8:1

A grid point is `LAYERS:EXPERTS:TOPK`: a layer count (the first and last layer plus evenly spaced interior ones),
the experts kept per MoE layer, and the default top-k; `full` stands for the checkpoint's own sizes. Validation
text: `--val_files` (.txt/.jsonl/.json, as in `training/pretrain.py`), or by default the held-out split of the
standard-library docstring corpus that `training/pretrain.py` trains on (same seed and fraction).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm.auto import tqdm


def parse_grid_point(text: str, config) -> tuple[int, int, int]:
    """`"L:E:K"` (or `"full"`) -> (layers, experts, top_k), validated against `config`."""
    if text == "full":
        return config.num_hidden_layers, config.num_experts, config.num_experts_per_tok
    parts = text.split(":")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"grid point {text!r} must look like LAYERS:EXPERTS:TOPK, e.g. 3:8:1, or 'full'")
    layers, experts, top_k = (int(p) for p in parts)
    if not 1 <= layers <= config.num_hidden_layers:
        raise ValueError(f"grid point {text!r}: layers must lie in [1, {config.num_hidden_layers}]")
    if not 1 <= experts <= config.num_experts:
        raise ValueError(f"grid point {text!r}: experts must lie in [1, {config.num_experts}]")
    if not 1 <= top_k <= experts:
        raise ValueError(f"grid point {text!r}: top-k must lie in [1, experts={experts}]")
    return layers, experts, top_k


@torch.no_grad()
def validation_loss(model, ids_NL: torch.Tensor, batch_size: int = 16) -> float:
    """Token-weighted next-token loss over (N, L) blocks."""
    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    for i in range(0, len(ids_NL), batch_size):
        ids = ids_NL[i : i + batch_size].to(device)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        n = ids[:, 1:].numel()
        total += float(out.lm_loss) * n
        count += n
    return total / max(count, 1.0)


@torch.no_grad()
def decode_tokens_per_second(model, prompt_1L: torch.Tensor, new_tokens: int = 32, repeats: int = 2) -> float:
    """Greedy decoding speed at batch 1 with the KV cache: new tokens / wall seconds (best of `repeats`)."""
    model.eval()
    device = next(model.parameters()).device
    prompt_1L = prompt_1L.to(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0)  # fmt: skip
    model.generate(prompt_1L, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(prompt_1L, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()  # sync point: time the kernels, not their launch
        best = min(best, time.perf_counter() - t0)
    return new_tokens / best


def evaluate_grid(
    model,
    val_ids: torch.Tensor,
    grid: list[tuple[int, int, int]],
    calibration_blocks: int = 8,
    decode_new_tokens: int = 32,
    batch_size: int = 16,
    desc: str = "elastic grid",
) -> list[dict]:
    """Measure every grid point of `model` (an `Ernie5ForCausalLM`) on (N, L) validation blocks.

    The first `calibration_blocks` blocks choose the experts; the rest are scored. Returns one dict per point:
    layers, experts, top_k, kept_layers, val_loss, active_params, total_params, active_fraction, total_fraction,
    decode_tokens_per_s, ms_per_token.
    """
    from modeling_ernie5.elastic import extract_submodel, parameter_counts

    if val_ids.dim() != 2 or len(val_ids) <= calibration_blocks:
        raise ValueError(
            f"need more than calibration_blocks={calibration_blocks} validation blocks, got {tuple(val_ids.shape)}"
        )
    calib, scored = val_ids[:calibration_blocks], val_ids[calibration_blocks:]
    prompt = scored[:1, :16]
    full = parameter_counts(model.config)
    rows = []
    for layers, experts, top_k in tqdm(grid, desc=desc):
        sub = extract_submodel(model, layers=layers, num_experts=experts, top_k=top_k, calibration_data=calib)
        counts = parameter_counts(sub.config)
        tps = decode_tokens_per_second(sub, prompt, decode_new_tokens)
        rows.append(
            {
                "layers": layers,
                "experts": experts,
                "top_k": top_k,
                "kept_layers": sub.config.elastic_source["layers"],
                "val_loss": round(validation_loss(sub, scored, batch_size), 5),
                "active_params": counts["active"],
                "total_params": counts["total"],
                "active_fraction": round(counts["active"] / full["active"], 4),
                "total_fraction": round(counts["total"] / full["total"], 4),
                "decode_tokens_per_s": round(tps, 2),
                "ms_per_token": round(1000.0 / tps, 3),
            }
        )
        del sub
    return rows


def markdown_table(rows: list[dict], title: str | None = None) -> str:
    head = "| layers | experts | top-k | val loss | active params | total params | active / full | total / full | decode tok/s |"
    lines = ([f"### {title}", ""] if title else []) + [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['experts']} | {r['top_k']} | {r['val_loss']:.4f} | {r['active_params'] / 1e6:.3f}M | "
            f"{r['total_params'] / 1e6:.3f}M | {r['active_fraction']:.1%} | {r['total_fraction']:.1%} | "
            f"{r['decode_tokens_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_tradeoff(series: dict[str, list[dict]], path: str) -> None:
    """Loss vs active parameters and loss vs latency, one marker series per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in series.items():
        for ax, key, scale in ((axes[0], "active_params", 1e6), (axes[1], "ms_per_token", 1.0)):
            xs = [r[key] / scale for r in rows]
            ys = [r["val_loss"] for r in rows]
            ax.scatter(xs, ys, label=name)
            for x, y, r in zip(xs, ys, rows):
                ax.annotate(f"L{r['layers']} E{r['experts']} k{r['top_k']}", (x, y), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))  # fmt: skip
    axes[0].set_xlabel("active non-embedding parameters (M)")
    axes[1].set_xlabel("decode latency (ms / token, batch 1)")
    for ax in axes:
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("elastic sub-models: quality vs cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(series: dict[str, list[dict]], output_dir: str, meta: dict | None = None) -> dict[str, str]:
    """Write elastic_grid.{json,md,png} for one or more checkpoints; returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {ext: os.path.join(output_dir, f"elastic_grid.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta or {}, "results": series}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write("\n".join(markdown_table(rows, name) for name, rows in series.items()))
    plot_tradeoff(series, paths["png"])
    return paths


def training_data_settings(checkpoint: str) -> dict | None:
    """The data settings `training/pretrain.py` recorded beside a checkpoint (`pretrain_summary.json`), if any."""
    path = os.path.join(checkpoint, "pretrain_summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("data")


def load_validation_ids(tokenizer, val_files: list[str] | None, block_size: int, seed: int, val_fraction: float,
                        max_blocks: int | None, training_data: dict | None = None) -> torch.Tensor:  # fmt: skip
    """Validation blocks: `val_files` when given; else the held-out split of the run's own training settings
    (`training_data`, so that no validation document was trained on); else the built-in corpus split with `seed`
    and `val_fraction`, which is held out only if training used the same (default) settings."""
    from processing.text_data import pack_texts, split_corpus
    from training.pretrain import corpus_documents, read_documents

    if val_files:
        docs = read_documents(val_files)
    elif training_data:
        docs = corpus_documents(training_data["train_files"], training_data["text_field"], training_data["seed"],
                                training_data["max_docs"])  # fmt: skip
        _, docs = split_corpus(docs, training_data["val_fraction"])
    else:
        _, docs = split_corpus(corpus_documents(None, None, seed, None), val_fraction)
    ids = torch.tensor(pack_texts(tokenizer, docs, block_size)["input_ids"])
    return ids[:max_blocks] if max_blocks else ids


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="saved Ernie5ForCausalLM folder (with its tokenizer)")
    p.add_argument("--grid", nargs="+", default=None, help="points LAYERS:EXPERTS:TOPK or 'full' (default: a small grid)")
    p.add_argument("--output_dir", default=None, help="defaults to <checkpoint>/elastic_grid")
    p.add_argument("--val_files", nargs="*", default=None)
    p.add_argument("--block_size", type=int, default=None, help="default: the run's own (pretrain_summary.json), else 128")
    p.add_argument("--val_fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_blocks", type=int, default=None)
    p.add_argument("--calibration_blocks", type=int, default=8)
    p.add_argument("--decode_new_tokens", type=int, default=32)
    return p


def default_grid(config) -> list[str]:
    """Full size, then each axis reduced alone, then all three together."""
    l, e, k = config.num_hidden_layers, config.num_experts, config.num_experts_per_tok
    points = ["full", f"{max(1, l - 1)}:{e}:{k}", f"{l}:{max(k, e // 2)}:{k}", f"{l}:{e}:{max(1, k // 2)}",
              f"{max(1, l - 1)}:{max(k, e // 2)}:{max(1, k // 2)}"]  # fmt: skip
    return list(dict.fromkeys(points))


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_ernie5  # noqa: F401  (registers the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    grid = [parse_grid_point(g, model.config) for g in (args.grid or default_grid(model.config))]
    training_data = None if args.val_files else training_data_settings(args.checkpoint)
    if not args.val_files and training_data is None:
        print(f"note: {args.checkpoint} has no pretrain_summary.json; validating on the built-in corpus split with "
              f"--seed {args.seed} --val_fraction {args.val_fraction}, held out only if training used the same")
    block_size = args.block_size or (training_data or {}).get("block_size") or 128
    val_ids = load_validation_ids(tokenizer, args.val_files, block_size, args.seed, args.val_fraction,
                                  args.max_blocks, training_data)  # fmt: skip
    rows = evaluate_grid(model, val_ids, grid, args.calibration_blocks, args.decode_new_tokens)
    out = args.output_dir or os.path.join(args.checkpoint, "elastic_grid")
    name = os.path.basename(os.path.normpath(args.checkpoint))
    validation = "val_files" if args.val_files else "training split" if training_data else "built-in corpus split"
    paths = write_reports({name: rows}, out, meta={"checkpoint": args.checkpoint, "val_blocks": len(val_ids),
                                                   "validation": validation})  # fmt: skip
    print(markdown_table(rows, name))
    print(f"wrote {', '.join(paths.values())}")
    return {"rows": rows, "paths": paths}


__all__ = ["decode_tokens_per_second", "evaluate_grid", "markdown_table", "parse_grid_point", "plot_tradeoff",
           "validation_loss", "write_reports"]  # fmt: skip


if __name__ == "__main__":
    main()
