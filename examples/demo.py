"""The main job on built-in defaults (`make demo`): a tiny ERNIE 5.0 text model, end to end, on CPU.

1. builds a text corpus from the Python standard library's docstrings (nothing is downloaded);
2. trains a byte-level BPE tokenizer on it;
3. trains a tiny ultra-sparse MoE model **elastically** with the HF Trainer for a few minutes (each sample also
   trains a random sub-model: fewer layers, a subset of experts, smaller top-k; ERNIE 5.0 §3.3), evaluating as
   it goes;
4. saves the model and tokenizer, reloads them with `from_pretrained`, and prints a generated sample;
5. cuts a standalone sub-model out of it (3 of 4 layers, 8 of 16 experts chosen by measured routing usage,
   top-1), saves it, reloads it with `trust_remote_code=True` and reports its loss and parameter fractions.

    python examples/demo.py                      # defaults, about 3-4 minutes on 2 CPU cores
    python examples/demo.py --max_steps 50       # quicker smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--max_steps", type=int, default=400)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

    import modeling_ernie5  # noqa: F401  (registers the Auto classes)
    from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM
    from modeling_ernie5.elastic import parameter_counts
    from processing.text_data import pack_texts, split_corpus
    from processing.tokenizer import builtin_corpus, train_text_tokenizer
    from modeling_ernie5.elastic import extract_submodel
    from training.elastic_sampler import ElasticSampler
    from training.pretrain import ElasticTrainer

    set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.time()
    docs = builtin_corpus(seed=args.seed)
    train_docs, val_docs = split_corpus(docs, 0.05)
    tokenizer = train_text_tokenizer(train_docs, vocab_size=args.vocab_size)
    train_ds = pack_texts(tokenizer, train_docs, args.block_size)
    val_ds = pack_texts(tokenizer, val_docs, args.block_size)
    print(f"corpus: {len(docs)} stdlib docstrings -> {len(train_ds)} train / {len(val_ds)} val blocks of "
          f"{args.block_size} tokens ({time.time() - t0:.1f}s)")

    config = Ernie5Config.from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        hidden_size=128,
        head_dim=32,
        moe_intermediate_size=64,
        num_experts=16,
        num_experts_per_tok=2,
        max_position_embeddings=args.block_size * 4,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        router_bias_update_rate=1e-3,
    )
    model = Ernie5ForCausalLM(config)
    counts = parameter_counts(config)
    print(f"model: {config.num_hidden_layers} layers, {config.num_experts} experts, top-{config.num_experts_per_tok}; "
          f"{counts['active'] / 1e6:.2f}M active / {counts['total'] / 1e6:.2f}M total non-embedding parameters")

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        weight_decay=0.01,
        logging_steps=max(1, args.max_steps // 20),
        eval_strategy="steps",
        eval_steps=max(1, args.max_steps // 5),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    trainer = ElasticTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        sampler=ElasticSampler(config, seed=args.seed),
    )
    start_eval = trainer.evaluate()["eval_loss"]
    trainer.train()
    history = [(0, start_eval)] + [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]
    print("\nvalidation loss (perplexity):")
    for step, loss in history:
        print(f"  step {step:>5}: {loss:.3f} ({math.exp(loss):.1f})")

    final_dir = os.path.join(args.output_dir, "model")
    trainer.save_model(final_dir)
    tokenizer.save_pretrained(final_dir)
    plot_losses(trainer.state.log_history, history, os.path.join(args.output_dir, "loss.png"))

    reloaded = AutoModelForCausalLM.from_pretrained(final_dir).eval()
    tok = AutoTokenizer.from_pretrained(final_dir)
    prompt = "Return the"
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = reloaded.generate(**inputs, max_new_tokens=40, do_sample=True, top_k=20, temperature=0.8)
    sample = tok.decode(out[0], skip_special_tokens=True)
    print(f"\nreloaded from {final_dir}; sample:\n  {sample!r}")

    calibration = torch.tensor(val_ds["input_ids"][:16])
    child = extract_submodel(reloaded, layers=3, num_experts=8, top_k=1, calibration_data=calibration)
    sub_dir = os.path.join(args.output_dir, "submodel")
    child.save_pretrained(sub_dir)
    tok.save_pretrained(sub_dir)
    sub = AutoModelForCausalLM.from_pretrained(sub_dir, trust_remote_code=True).eval()
    probe = torch.tensor(val_ds["input_ids"][16:48])
    with torch.no_grad():
        full_loss = reloaded(probe, labels=probe).loss.item()
        sub_loss = sub(probe, labels=probe).loss.item()
    source = sub.config.elastic_source
    print(
        f"\nsub-model {sub_dir}: 3 layers, 8 experts, top-1 -> {source['active_fraction']:.0%} of active and "
        f"{source['total_fraction']:.0%} of total parameters; validation loss {sub_loss:.3f} vs full {full_loss:.3f}"
    )
    summary = {
        "val_loss_start": start_eval,
        "val_loss_end": history[-1][1],
        "steps": args.max_steps,
        "seconds": round(time.time() - t0, 1),
        "active_params": counts["active"],
        "total_params": counts["total"],
        "sample": sample,
        "submodel_val_loss": sub_loss,
        "full_val_loss_same_blocks": full_loss,
        "submodel_active_fraction": source["active_fraction"],
        "submodel_total_fraction": source["total_fraction"],
    }
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if not summary["val_loss_end"] < summary["val_loss_start"]:
        raise SystemExit("validation loss did not fall")
    return summary


def plot_losses(log_history, eval_history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "eval_loss" not in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    ax.plot(*zip(*eval_history), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("ernie5 tiny demo")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
