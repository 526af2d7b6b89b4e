"""End-to-end RL on the toy world, on CPU: SFT a tiny ERNIE 5.0 model, then GRPO with and without MISC + routing replay
(issue 8, item 5; ERNIE 5.0 §4; training/rl.py).

1. Builds toy-world questions (text only: the scene description plus a question, answer = a word or number), trains a
   512-token BPE tokenizer on them and a tiny ERNIE 5.0 model (8 experts, top-2) supervised on the answers for a short
   while (50 steps), so that it answers in the right form but is often wrong and RL has room.
2. Runs RL twice from that checkpoint, same seed, same data, same bf16 rollout engine (the train/rollout mismatch
   is real: rollouts are sampled by a bf16 copy, training runs in fp32, and `num_iterations=2` moves the policy
   between rollout and the second update):
   - `baseline`: TRL's GRPO loss (token-level ratio), routing recomputed in training;
   - `misc_replay`: MISC (GSPO sequence ratio + per-token IcePop mask) and rollout routing replay.
3. Scores held-out scenes before and after each run (greedy accuracy, per question kind, and the mean reward of sampled
   answers), and writes `rl_toy_curves.png` (reward, entropy, mismatch, clipped/masked fractions per step, both runs)
   and `rl_toy_results.json`.

Run (about 12 minutes on two shared CPU cores; one thread):

    python examples/rl_toy.py                      # writes runs/rl_toy/
    python examples/rl_toy.py --quick              # smaller, ~3 minutes, for a smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the MoE dispatch loops are much slower with 2 threads on 2 cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="runs/rl_toy")
    p.add_argument("--quick", action="store_true", help="fewer SFT and RL steps (smoke check)")
    p.add_argument("--sft_steps", type=int, default=None)
    p.add_argument("--rl_steps", type=int, default=None)
    p.add_argument("--rl_lr", type=float, default=1e-3)
    p.add_argument("--sft_dir", default=None, help="reuse an SFT checkpoint (skips step 1)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def supervised_pass(model, tokenizer, rows, steps, batch_size, lr, seed):
    """Next-token SFT on the answer tokens only (prompt tokens masked with -100)."""
    import torch
    from tqdm import tqdm

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="SFT"):
        batch = rng.sample(rows, batch_size)
        seqs, labels = [], []
        for row in batch:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(f" {row['answer']}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            seqs.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(len(s) for s in seqs)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        lab = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labels)):  # left padding, as in generation
            ids[i, width - len(s) :] = torch.tensor(s)
            lab[i, width - len(l) :] = torch.tensor(l)
            mask[i, width - len(s) :] = 1
        out = model(input_ids=ids, attention_mask=mask, labels=lab)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(out.lm_loss.item())
    model.eval()
    return losses


def evaluate(model, tokenizer, rows, samples=4, batch_size=64, seed=0):
    """Held-out scores with the toy world's strict checker: greedy accuracy (overall and per question kind) and the
    mean reward of `samples` sampled answers per question at temperature 1 (what RL optimises, measured on fixed
    questions so that batch composition does not move it)."""
    import torch

    from training.rewards import toy_world_reward

    model.eval()
    torch.manual_seed(seed)
    greedy, sampled, per_kind = [], [], {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        columns = {k: [r[k] for r in chunk] for k in ("question", "answer", "kind")}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            rewards = toy_world_reward(texts, **columns)
            greedy += rewards
            for row, reward in zip(chunk, rewards):
                per_kind.setdefault(row["kind"], []).append(reward)
            out = model.generate(
                **enc, max_new_tokens=4, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            repeated = {k: [v for v in vs for _ in range(samples)] for k, vs in columns.items()}
            sampled += toy_world_reward(texts, **repeated)
    return {
        "greedy_accuracy": sum(greedy) / len(greedy),
        "sampled_reward": sum(sampled) / len(sampled),
        "greedy_accuracy_by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(per_kind.items())},
    }


def run_rl(name, sft_dir, tokenizer, train_ds, eval_rows, args, steps, stabilised):
    import torch

    from modeling_ernie5 import Ernie5ForCausalLM
    from training.rewards import toy_world_reward
    from training.rl import RLConfig, RLTrainer

    torch.manual_seed(args.seed)
    model = Ernie5ForCausalLM.from_pretrained(sft_dir)
    config = RLConfig(
        output_dir=os.path.join(args.output_dir, name),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=args.seed,
        max_steps=steps,
        learning_rate=args.rl_lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=96,  # 12 prompts x 8 completions per step
        num_generations=8,
        num_iterations=2,
        max_completion_length=5,
        temperature=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="grpo",
        rollout_dtype="bfloat16",
        measure_mismatch=True,
        misc=stabilised,
        routing_replay=stabilised,
        importance_sampling_level="sequence" if stabilised else "token",
        plot=True,
    )
    trainer = RLTrainer(
        model=model, reward_funcs=[toy_world_reward], args=config, train_dataset=train_ds, processing_class=tokenizer
    )
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    policy = trainer.accelerator.unwrap_model(trainer.model)
    trainer.save_model(os.path.join(args.output_dir, name, "final"))
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {
        "seconds": round(seconds, 1),
        "eval": evaluate(policy, tokenizer, eval_rows),
        "history": history,
    }


def summarise(history, key):
    """Mean of the first and last third of a logged series (and of all of it)."""
    values = [h[key] for h in history if key in h and h[key] == h[key]]
    if not values:
        return None
    n = max(1, len(values) // 3)
    head, tail = values[:n], values[-n:]
    return {"first": sum(head) / len(head), "last": sum(tail) / len(tail), "mean": sum(values) / len(values)}


def main():
    args = parse_args()
    import torch

    torch.set_num_threads(1)
    from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM
    from processing.tokenizer import train_text_tokenizer
    from training.rl import plot_rl_curves, toy_world_dataset

    sft_steps = args.sft_steps or (30 if args.quick else 50)
    rl_steps = args.rl_steps or (8 if args.quick else 40)
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    kinds = ("count", "color", "shape", "exists", "position")
    sft_rows = toy_world_dataset(400, seed=0, kinds=kinds).to_list()
    rl_ds = toy_world_dataset(200, seed=1000, kinds=kinds)
    eval_rows = toy_world_dataset(60 if args.quick else 120, seed=5000, kinds=kinds).to_list()

    t0 = time.time()
    if args.sft_dir:
        from transformers import AutoTokenizer

        sft_dir = args.sft_dir
        tokenizer = AutoTokenizer.from_pretrained(sft_dir)
        model = Ernie5ForCausalLM.from_pretrained(sft_dir)
        sft_steps, sft_losses = 0, [float("nan")]
    else:
        tokenizer = train_text_tokenizer(
            [r["prompt"] for r in sft_rows] + [f" {r['answer']}" for r in sft_rows], vocab_size=512
        )
        config = Ernie5Config.from_preset(
            "tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, max_position_embeddings=512,
        )  # fmt: skip
        model = Ernie5ForCausalLM(config)
        sft_losses = supervised_pass(model, tokenizer, sft_rows, sft_steps, 32, 3e-3, args.seed)
        sft_dir = os.path.join(args.output_dir, "sft")
        model.save_pretrained(sft_dir)
        tokenizer.save_pretrained(sft_dir)
    sft_eval = evaluate(model, tokenizer, eval_rows)
    print(f"SFT: {sft_steps} steps, {time.time() - t0:.0f}s, final loss {sft_losses[-1]:.3f}, held-out {sft_eval}")

    results = {"sft": {"steps": sft_steps, "final_loss": sft_losses[-1], "eval": sft_eval}}
    for name, stabilised in (("baseline", False), ("misc_replay", True)):
        results[name] = run_rl(name, sft_dir, tokenizer, rl_ds, eval_rows, args, rl_steps, stabilised)
        r = results[name]
        print(
            f"{name}: {r['seconds']}s, reward {summarise(r['history'], 'reward')}, held-out {r['eval']}"
        )

    summary = {}
    for name in ("baseline", "misc_replay"):
        h = results[name]["history"]
        summary[name] = {
            key: summarise(h, key)
            for key in (
                "reward", "entropy", "mismatch/logp_absdiff_mean", "mismatch/replay_logp_absdiff_mean",
                "mismatch/logp_absdiff_max", "mismatch/replay_logp_absdiff_max", "mismatch/routing_disagreement",
                "misc/token_masked_frac", "clip_ratio/region_mean", "moe/load_max_over_uniform",
                "mismatch/update_logp_absdiff_mean", "mismatch/update_routing_disagreement",
            )  # fmt: skip
        }
        summary[name]["eval"] = results[name]["eval"]
    summary["sft_eval"] = results["sft"]["eval"]
    results["summary"] = summary
    with open(os.path.join(args.output_dir, "rl_toy_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot_rl_curves(
        {"GRPO (baseline)": results["baseline"]["history"], "MISC + replay": results["misc_replay"]["history"]},
        os.path.join(args.output_dir, "rl_toy_curves.png"),
    )
    print(json.dumps(summary, indent=1))
    print(f"total {time.time() - t0:.0f}s; wrote {args.output_dir}/rl_toy_results.json and rl_toy_curves.png")


if __name__ == "__main__":
    main()
