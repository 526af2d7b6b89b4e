"""A tiny-scale mirror of ERNIE 5.0's elastic-training ablations (§6.4.2, Tables 9-11), in one command on CPU.

Two models of the same shape (4 layers, 16 experts, top-2, hidden 128) are trained for the same number of steps on
the same data (the standard-library docstring corpus, nothing downloaded): one with elastic depth, width and
sparsity sampling at the paper's probabilities, one without (the baseline). Both are then cut and scored at full
size and at reduced depth (3 and 2 layers), experts (8 of 16, chosen by routing usage) and top-k (1), plus all
three reduced together. The paper's expected shape: the elastic model's full-size loss within a few percent of
the baseline's, and its sub-models far better than the baseline's at the same reduced setting.

    python examples/elastic_study.py                    # ~25 min on 2 free CPU cores (500 steps per model)
    python examples/elastic_study.py --max_steps 100    # shorter run, same report
    python examples/elastic_study.py --max_steps 300 --variants baseline elastic_depth elastic_width elastic_sparsity

The last form mirrors the paper more closely: one elastic model per axis (Tables 9, 10 and 11 each vary one axis),
so each keeps 75-80% full-configuration samples instead of about half.

Writes to `--output_dir` (default `outputs/elastic_study`): the two checkpoints, `study.md` (the comparison
table), `study.json`, and `elastic_grid.{json,md,png}` (per-model tables and the trade-off plot).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = [  # (label, layers, experts, top_k) for the 4-layer / 16-expert / top-2 model
    ("full size", 4, 16, 2),
    ("depth 3/4", 3, 16, 2),
    ("depth 2/4", 2, 16, 2),
    ("experts 8/16", 4, 8, 2),
    ("top-k 1/2", 4, 16, 1),
    ("all three (3 layers, 8 experts, top-1)", 3, 8, 1),
]

# Trained variants: None = the non-elastic baseline; a dict = elastic with these config overrides. The single-axis
# variants mirror the paper's separate ablations (Table 9 depth, Table 10 width, Table 11 sparsity).
VARIANTS = {
    "baseline": None,
    "elastic": {},
    "elastic_depth": {"elastic_width_full_prob": 1.0, "elastic_topk_full_prob": 1.0},
    "elastic_width": {"elastic_depth_full_prob": 1.0, "elastic_topk_full_prob": 1.0},
    "elastic_sparsity": {"elastic_depth_full_prob": 1.0, "elastic_width_full_prob": 1.0},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/elastic_study")
    p.add_argument("--max_steps", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val_blocks", type=int, default=120, help="validation blocks scored per setting")
    p.add_argument(
        "--variants", nargs="+", default=["baseline", "elastic"], choices=list(VARIANTS),
        help="models to train: the baseline and elastic (all three axes) by default; the paper's per-axis ablations "
             "with: baseline elastic_depth elastic_width elastic_sparsity",
    )  # fmt: skip
    args = p.parse_args(argv)
    if "baseline" not in args.variants or len(args.variants) < 2:
        p.error("--variants needs 'baseline' and at least one elastic variant")
    return args


def study_table(series: dict[str, list[dict]]) -> str:
    """Validation loss per inference setting (rows) and trained model (columns); elastic cells show the change
    relative to the baseline at the same setting."""
    names = [n for n in series if n != "baseline"]
    lines = [
        "| inference setting | active / full params | total / full params | baseline | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for i, (label, *_) in enumerate(SETTINGS):
        b = series["baseline"][i]
        cells = [f"{series[n][i]['val_loss']:.3f} ({series[n][i]['val_loss'] / b['val_loss'] - 1:+.1%})" for n in names]
        lines.append(
            f"| {label} | {b['active_fraction']:.0%} | {b['total_fraction']:.0%} | {b['val_loss']:.3f} | "
            + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from eval.elastic_grid import evaluate_grid, write_reports
    from processing.text_data import pack_texts, split_corpus
    from processing.tokenizer import builtin_corpus
    from training.pretrain import PretrainConfig, train

    t0 = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    runs = {}
    tokenizer_dir = None
    for name in sorted(args.variants, key=lambda n: n == "baseline"):  # an elastic run trains the tokenizer
        out = os.path.join(args.output_dir, name)
        model_overrides = dict(hidden_size=128, head_dim=32, moe_intermediate_size=64, num_experts=16,
                               num_experts_per_tok=2, router_bias_update_rate=1e-3)  # fmt: skip
        model_overrides.update(VARIANTS[name] or {})
        cfg = PretrainConfig(
            output_dir=out,
            elastic=VARIANTS[name] is not None,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, args.max_steps // 20),
            weight_decay=0.01,
            logging_steps=max(1, args.max_steps // 15),
            eval_strategy="no",
            save_strategy="no",
            report_to="tensorboard",
            vocab_size=2048,
            block_size=args.block_size,
            seed=args.seed,
            use_cpu=True,
            dataloader_num_workers=0,
            tokenizer_name_or_path=tokenizer_dir,  # later runs reuse the first run's tokenizer
            model_overrides=json.dumps(model_overrides),
        )
        start = time.time()
        runs[name] = {"summary": train(cfg), "train_minutes": round((time.time() - start) / 60, 2)}
        tokenizer_dir = tokenizer_dir or os.path.join(out, "tokenizer")
        print(f"[study] {name}: {args.max_steps} steps in {runs[name]['train_minutes']} min")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    _, val_docs = split_corpus(builtin_corpus(seed=args.seed), 0.05)
    val_ids = torch.tensor(pack_texts(tokenizer, val_docs, args.block_size)["input_ids"])[: 8 + args.val_blocks]
    grid = [(l, e, k) for _, l, e, k in SETTINGS]
    series = {}
    for name in ["baseline"] + [n for n in args.variants if n != "baseline"]:
        model = AutoModelForCausalLM.from_pretrained(os.path.join(args.output_dir, name)).eval()
        series[name] = evaluate_grid(model, val_ids, grid, calibration_blocks=8, decode_new_tokens=48, desc=name)
    write_reports(series, args.output_dir, meta={"steps": args.max_steps, "batch_size": args.batch_size,
                                                  "block_size": args.block_size, "val_blocks": len(val_ids) - 8})  # fmt: skip
    table = study_table(series)
    header = (
        f"Elastic vs non-elastic training, {args.max_steps} steps x {args.batch_size} x {args.block_size} tokens each, "
        f"4 layers / 16 experts / top-2 (hidden 128); validation loss on {len(val_ids) - 8} held-out blocks.\n\n"
    )
    with open(os.path.join(args.output_dir, "study.md"), "w") as f:
        f.write(header + table)
    result = {"settings": [s[0] for s in SETTINGS], "runs": runs, "grid": series,
              "total_minutes": round((time.time() - t0) / 60, 2)}  # fmt: skip
    with open(os.path.join(args.output_dir, "study.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n" + header + table)
    print(f"[study] done in {result['total_minutes']} min; report in {args.output_dir}/study.md")
    return result


if __name__ == "__main__":
    main()
