"""Toy-world vision demo: train briefly on CPU, then measure understanding and generation (issue 5, item 5).

    python examples/vision_toy.py                      # full demo, ~30 minutes on one core
    python examples/vision_toy.py --tokenizer_steps 200 --model_steps 200    # reduced, ~5 minutes
    python examples/vision_toy.py --visual_tokenizer outputs/vision_toy/visual_tokenizer --bit_flip_prob 0.1
        # a variant that reuses the tokenizer of an earlier run (saves its ~4.5 minutes)

Steps:
1. train the multi-scale bitwise visual tokenizer on toy scenes (held-out reconstruction PSNR);
2. train a byte-level BPE text tokenizer on toy captions and questions;
3. train a small `Ernie5ForConditionalGeneration` (tiny preset, width `--hidden_size`, + vision) on two tasks per
   step: answering toy questions about an image, plus a caption naming every shape and its quadrant
   (understanding), and drawing one coloured shape from an instruction
   such as "draw a red square at the top left" (next-scale generation; prompts dropped with `cfg_dropout_prob` so
   classifier-free guidance works);
4. measure with the strict checkers of `processing.toy_world`: question accuracy per kind against the uniform-guess
   chance rate and the best answer-prior baseline (always the most frequent training answer of that kind), and
   generated images' dominant colour / shape / quadrant against their prompt (chance 1/6, 1/3 and 1/4), next to
   the same checkers on tokenizer reconstructions of real images (the ceiling reachable through this tokenizer).

Writes to `--output_dir`: `results.json`, `generated.png` (prompt grid), `losses.png` (per-modality raw and
rescaled losses), `routing_heatmap.png`, `tokenizer_recon.png` and the saved model + processor.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import Counter, defaultdict

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default="outputs/vision_toy")
    p.add_argument("--tokenizer_steps", type=int, default=2000)
    p.add_argument(
        "--visual_tokenizer", default=None, metavar="DIR",
        help="a saved visual tokenizer to use instead of training one (the tokenizer options are then ignored)",
    )  # fmt: skip
    p.add_argument(
        "--prefix_loss_weight", type=float, default=0.3,
        help="visual tokenizer: weight of the loss on images decoded from coarse scales only",
    )  # fmt: skip
    p.add_argument("--model_steps", type=int, default=1200)
    p.add_argument(
        "--scale_schedule", type=int, nargs="+", default=(1, 2, 3, 4, 6, 8),
        help="visual tokenizer: token-grid side of each scale, coarse to fine, ending at the 8x8 latent grid. Tokens "
        "of one scale are sampled independently given the coarser ones, so smaller steps between scales leave less "
        "to decide at once (1 2 4 8: squares came out with rounded corners)",
    )  # fmt: skip
    p.add_argument(
        "--scale_loss_weights", type=float, nargs="+", default=None,
        help="weight of each scale's mean bit loss, coarse to fine (default: the scale's grid side, so the fine "
        "scales, which carry the shape, weigh most)",
    )  # fmt: skip
    p.add_argument(
        "--bit_flip_prob", type=float, default=0.0,
        help="history bit-flip rate of next-scale training (ERNIE 5.0's self-correction; the model config's default "
        "is 0.1). Off here: at this budget every rate tried lowered the generated-shape match (README)",
    )  # fmt: skip
    p.add_argument(
        "--caption_positions", action=argparse.BooleanOptionalAction, default=True,
        help="the caption turn names every shape with its quadrant (toy_world.caption(positions=True))",
    )  # fmt: skip
    p.add_argument("--batch_size", type=int, default=16, help="understanding and generation samples per step")
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--eval_scenes", type=int, default=150)
    p.add_argument("--gen_per_prompt", type=int, default=2, help="images per (colour, shape, position) prompt")
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0, help="bit sampling temperature of image generation")
    p.add_argument("--hidden_size", type=int, default=192, help="backbone width (the tiny preset has 64)")
    p.add_argument("--num_layers", type=int, default=4, help="backbone depth")
    p.add_argument("--image_size", type=int, default=16, help="side of the images the model sees and draws")
    p.add_argument(
        "--gen_side_range", type=float, nargs=2, default=(0.3, 0.42), metavar=("LOW", "HIGH"),
        help="side of the shape in generation targets, as a fraction of the image (the toy world's default "
        "0.22-0.36 draws 4-6 px shapes at 16 px, where circle and square differ by a few corner pixels)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads; these tiny kernels run several times faster on one thread than on two shared cores",
    )  # fmt: skip
    return p.parse_args(argv)


CAPTION_QUESTION = "What is in the picture?"


def understanding_sample(seed: int, rng: random.Random):
    from processing.toy_world import draw_scene, make_questions

    image, scene = draw_scene(seed, size=64)
    return image, scene, make_questions(scene, rng)


def build_understanding_batch(processor, items, eos_token: str):
    """items: (image, [(question, answer), ...]). One image, then its question-answer turns one after another
    ("Q: ... A: ...<eos>"); the first turn is exactly the evaluation prompt. Labels cover only the answers and their
    end-of-sequence tokens."""
    tok = processor.tokenizer
    ids, labels = [], []
    for _, turns in items:
        row, row_labels = [], []
        for i, (question, answer) in enumerate(turns):
            text = f"{'<image>' if i == 0 else ''}Q: {question} A:"
            prompt = tok(processor.expand_text(text, 0) if i == 0 else text, add_special_tokens=False)["input_ids"]
            target = tok(f" {answer}{eos_token}", add_special_tokens=False)["input_ids"]
            row += prompt + target
            row_labels += [-100] * len(prompt) + target
        ids.append(row)
        labels.append(row_labels)
    width = max(len(x) for x in ids)
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    label_ids = torch.tensor([[-100] * (width - len(x)) + x for x in labels])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    pixels = processor.image_processor([im for im, _ in items], return_tensors="pt")["pixel_values"]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids, "pixel_values": pixels}


def build_generation_batch(processor, seeds, rng: random.Random, cfg_dropout: float, side_range):
    from processing.toy_world import draw_scene, drawing_prompt

    texts, targets = [], []
    for s in seeds:
        image, scene = draw_scene(s, size=processor.image_processor.size, max_shapes=1, side_range=side_range)
        shape = scene.shapes[0]
        prompt = "" if rng.random() < cfg_dropout else drawing_prompt(shape.color, shape.kind, shape.position)
        texts.append(f"{prompt}<|image_gen|>")
        targets.append(image)
    batch = processor(text=texts, gen_images=targets)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "gen_pixel_values")}


@torch.no_grad()
def answer_questions(model, processor, items, batch_size=32, max_new_tokens=8):
    tok = processor.tokenizer
    answers = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        batch = processor(text=[f"<image>Q: {q} A:" for _, q, _ in chunk], images=[im for im, _, _ in chunk])
        out = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        answers += tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()

    from tqdm.auto import tqdm

    from eval.routing_heatmap import plot_heatmaps, routing_usage, toy_batches
    from modeling_ernie5 import Ernie5Config
    from modeling_ernie5.configuration_ernie5_vision import Ernie5VisionConfig
    from modeling_ernie5.modeling_ernie5_vl import Ernie5ForConditionalGeneration
    from processing.image_processing import Ernie5ImageProcessor
    from processing.processing_ernie5 import Ernie5Processor, add_vision_tokens
    from processing.tokenizer import train_text_tokenizer
    from processing.toy_world import (
        COLORS, POSITIONS, SHAPES, QA_KINDS, caption, chance_rate, check_answer, draw_scene, drawing_prompt,
        make_questions,
    )  # fmt: skip
    from training.train_visual_tokenizer import VisualTokenizerTrainingArguments, train as train_tokenizer

    # 1. Visual tokenizer: trained here, or a saved one (e.g. `<earlier output_dir>/visual_tokenizer`).
    if args.visual_tokenizer:
        visual_tokenizer, vt_metrics = load_tokenizer(args.visual_tokenizer, args.image_size, args.output_dir)
    else:
        vt_args = VisualTokenizerTrainingArguments(
            output_dir=os.path.join(args.output_dir, "visual_tokenizer"), max_steps=args.tokenizer_steps,
            seed=args.seed, image_size=args.image_size, learning_rate=3e-3, prefix_loss_weight=args.prefix_loss_weight,
            # One halving per level after the first: an 8x8 token grid at 16 (and, with two halvings, 32) pixels.
            channel_multipliers="1,2" if args.image_size == 16 else "1,2,2",
            scale_schedule=",".join(map(str, args.scale_schedule)) if args.scale_schedule else None,
        )  # fmt: skip
        visual_tokenizer, vt_metrics = train_tokenizer(vt_args)
        os.replace(os.path.join(vt_args.output_dir, "recon.png"), os.path.join(args.output_dir, "tokenizer_recon.png"))
    print(f"visual tokenizer: held-out PSNR {vt_metrics['psnr_db']:.2f} dB")

    # 2. Text tokenizer over the toy world's language.
    corpus = []
    for s in range(2000):
        _, scene = draw_scene(1_000_000 + s)
        corpus.append(caption(scene))
        first = scene.shapes[0]
        corpus.append(drawing_prompt(first.color, first.kind, first.position))
        corpus += [f"Q: {qa.question} A: {qa.answer}" for qa in make_questions(scene, rng)]
        corpus.append(f"Q: {CAPTION_QUESTION} A: {caption(scene, positions=args.caption_positions)}")
    text_tokenizer = add_vision_tokens(train_text_tokenizer(corpus, vocab_size=512))
    processor = Ernie5Processor(Ernie5ImageProcessor(size=args.image_size), text_tokenizer)

    # 3. Model.
    scale_weights = args.scale_loss_weights or [float(side) for side in visual_tokenizer.config.scale_schedule]
    vision = Ernie5VisionConfig(
        tokenizer_config=visual_tokenizer.config.to_dict(), scale_loss_weights=scale_weights,
        bit_flip_prob=args.bit_flip_prob,
    )  # fmt: skip
    heads = max(1, args.hidden_size // 16)
    config = Ernie5Config.from_preset(
        "tiny", hidden_size=args.hidden_size, num_hidden_layers=args.num_layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), intermediate_size=2 * args.hidden_size,
        moe_intermediate_size=args.hidden_size // 2,
        vocab_size=len(text_tokenizer), vision_config=vision, pad_token_id=text_tokenizer.pad_token_id,
        bos_token_id=text_tokenizer.bos_token_id, eos_token_id=text_tokenizer.eos_token_id, **processor.vision_token_ids(),
    )  # fmt: skip
    processor = Ernie5Processor.from_config(processor.image_processor, text_tokenizer, config)
    model = Ernie5ForConditionalGeneration(config)
    model.load_visual_tokenizer(visual_tokenizer)
    for p in model.model.vision.tokenizer.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.01)
    warmup = max(1, args.model_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / max(1, args.model_steps))
    )
    train_answers = defaultdict(Counter)
    log = []
    model.train()
    bar = tqdm(range(args.model_steps), desc="ernie5 vision")
    for step in bar:
        items = []
        while len(items) < args.batch_size:
            # Every question of the scene plus its caption: several grounded answers per image, where one answer
            # per image mostly teaches answer priors.
            image, scene, qas = understanding_sample(rng.randrange(1_000_000), rng)
            turns = [(qa.question, qa.answer) for qa in qas]
            described = caption(scene, positions=args.caption_positions)
            turns.insert(rng.randrange(len(turns) + 1), (CAPTION_QUESTION, described))
            items.append((image, turns))
            for qa in qas:
                train_answers[qa.kind][qa.answer] += 1
        und = model(**build_understanding_batch(processor, items, text_tokenizer.eos_token))
        gen = model(**build_generation_batch(
            processor, [rng.randrange(1_000_000) for _ in range(args.batch_size)], rng, vision.cfg_dropout_prob,
            args.gen_side_range,
        ))  # fmt: skip
        loss = und.loss + gen.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        scales = gen.loss_scales.tolist()
        log.append({
            "step": step, "text_loss": und.text_loss.item(), "vision_loss": gen.vision_loss.item(),
            "text_rescaled": und.loss.item(), "vision_rescaled": gen.loss.item(), "text_scale": scales[0],
            "vision_scale": scales[1],
        })  # fmt: skip
        bar.set_postfix(text=f"{log[-1]['text_loss']:.3f}", vision=f"{log[-1]['vision_loss']:.3f}")
    model.eval()
    train_seconds = time.time() - t0

    # 4a. Understanding accuracy on held-out scenes.
    eval_rng = random.Random(12345)
    items, qas = [], []
    for s in range(args.eval_scenes):
        image, _, scene_qas = understanding_sample(5_000_000 + s, eval_rng)
        for qa in scene_qas:
            items.append((image, qa.question, qa.answer))
            qas.append(qa)
    predictions = answer_questions(model, processor, items)
    per_kind = defaultdict(lambda: [0, 0])
    for qa, pred in zip(qas, predictions):
        per_kind[qa.kind][0] += check_answer(qa, pred)
        per_kind[qa.kind][1] += 1
    understanding = {}
    for kind in QA_KINDS:
        if kind not in per_kind:
            continue
        hits, total = per_kind[kind]
        prior = train_answers[kind].most_common(1)[0][0] if train_answers[kind] else None
        prior_hits = sum(check_answer(qa, prior) for qa in qas if qa.kind == kind) if prior is not None else 0
        understanding[kind] = {
            "accuracy": hits / total, "n": total, "chance": chance_rate(kind),
            "answer_prior_baseline": prior_hits / total,
        }  # fmt: skip
    overall_hits = sum(v[0] for v in per_kind.values())
    understanding["overall"] = {
        "accuracy": overall_hits / len(qas), "n": len(qas),
        "chance": sum(chance_rate(qa.kind) for qa in qas) / len(qas),
        "answer_prior_baseline": sum(understanding[k]["answer_prior_baseline"] * understanding[k]["n"] for k in understanding) / len(qas),
    }  # fmt: skip

    # 4b. Generation: every (colour, shape, position) prompt, checked for dominant colour, shape and position.
    prompts = [(c, k, q) for c in COLORS for k in SHAPES for q in POSITIONS for _ in range(args.gen_per_prompt)]
    gen_batch = processor(text=[f"{drawing_prompt(*p)}<|image_gen|>" for p in prompts])
    uncond = processor(text=["<|image_gen|>"] * len(prompts))
    images = model.generate_image(
        gen_batch["input_ids"], gen_batch["attention_mask"], guidance_scale=args.guidance_scale,
        uncond_input_ids=uncond["input_ids"], uncond_attention_mask=uncond["attention_mask"],
        temperature=args.temperature, generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    # Ceiling: the same checkers on tokenizer reconstructions of real single-shape images.
    real = [
        draw_scene(9_000_000 + i, size=args.image_size, max_shapes=1, side_range=args.gen_side_range)
        for i in range(len(prompts))
    ]
    with torch.no_grad():
        px = processor.image_processor([im for im, _ in real], return_tensors="pt")["pixel_values"]
        recon = processor.image_processor.postprocess(visual_tokenizer.decode(visual_tokenizer.encode(px)))
    real_prompts = [(sc.shapes[0].color, sc.shapes[0].kind, sc.shapes[0].position) for _, sc in real]
    generation = {"n": len(prompts), "guidance_scale": args.guidance_scale, "temperature": args.temperature}
    generation |= match_rates(images, prompts)
    generation["shape_confusion"] = shape_confusion(images, prompts)
    generation |= {
        "color_chance": 1 / len(COLORS), "shape_chance": 1 / len(SHAPES), "position_chance": 1 / len(POSITIONS),
        "all_chance": 1 / (len(COLORS) * len(SHAPES) * len(POSITIONS)),
    }  # fmt: skip
    ceiling = match_rates(recon, real_prompts)
    generation |= {f"tokenizer_ceiling_{k.removesuffix('_match')}": v for k, v in ceiling.items()}
    # The checkers themselves on the real images: what a perfect tokenizer and model could score.
    checker = match_rates([im for im, _ in real], real_prompts)
    generation |= {f"checker_on_real_{k.removesuffix('_match')}": v for k, v in checker.items()}
    save_generation_grid(images, prompts, os.path.join(args.output_dir, "generated.png"))
    save_loss_plot(log, os.path.join(args.output_dir, "losses.png"))

    counts = routing_usage(model, toy_batches(processor, n_scenes=16, seed=7_000_000))
    divergences = plot_heatmaps(counts, os.path.join(args.output_dir, "routing_heatmap.png"))

    model.save_pretrained(os.path.join(args.output_dir, "model"))
    processor.save_pretrained(os.path.join(args.output_dir, "model"))
    results = {
        "settings": vars(args), "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t0, 1),
        "tokenizer_psnr_db": vt_metrics["psnr_db"], "understanding": understanding, "generation": generation,
        "routing_js_divergence": divergences, "final_losses": log[-1] if log else None,
    }  # fmt: skip
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps({k: results[k] for k in ("tokenizer_psnr_db", "understanding", "generation", "total_seconds")}, indent=2))
    return results


def load_tokenizer(path: str, image_size: int, output_dir: str):
    """A saved visual tokenizer and its held-out PSNR on the toy scenes the training script evaluates on."""
    from modeling_ernie5.visual_tokenizer import Ernie5VisualTokenizer
    from training.train_visual_tokenizer import (
        VisualTokenizerTrainingArguments, held_out_psnr, held_out_toy_images, save_reconstruction_grid,
    )  # fmt: skip

    tokenizer = Ernie5VisualTokenizer.from_pretrained(path)
    if tokenizer.config.image_size != image_size:
        raise ValueError(
            f"the visual tokenizer in {path} takes {tokenizer.config.image_size}-pixel images, not --image_size {image_size}"
        )
    eval_x = held_out_toy_images(VisualTokenizerTrainingArguments.eval_images, image_size)
    recon, psnr_db = held_out_psnr(tokenizer, eval_x)
    save_reconstruction_grid(eval_x[:8], recon[:8], os.path.join(output_dir, "tokenizer_recon.png"))
    return tokenizer, {"psnr_db": psnr_db, "loaded_from": path}


def match_rates(images, prompts) -> dict:
    """Fraction of images whose dominant colour, shape and quadrant equal the (colour, shape, position) prompt's,
    per attribute and all three at once."""
    from processing.toy_world import classify_shape, dominant_color, foreground_position

    names = ("color", "shape", "position")
    found = [(dominant_color(im), classify_shape(im), foreground_position(im)) for im in images]
    rates = {
        f"{name}_match": sum(f[i] == p[i] for f, p in zip(found, prompts)) / len(prompts) for i, name in enumerate(names)
    }
    rates["all_match"] = sum(all(a == b for a, b in zip(f, p)) for f, p in zip(found, prompts)) / len(prompts)
    return rates


def shape_confusion(images, prompts) -> dict:
    """{prompted shape: {shape the checker sees: count}}, to tell which shapes the model draws as which."""
    from processing.toy_world import SHAPES, classify_shape

    table = {kind: Counter() for kind in SHAPES}
    for image, (_, kind, _) in zip(images, prompts):
        table[kind][str(classify_shape(image))] += 1
    return {kind: dict(seen) for kind, seen in table.items()}


def save_generation_grid(images, prompts, path, cols: int = 12):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i], interpolation="nearest")
            ax.set_title(" ".join(prompts[i]), fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_loss_plot(log, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, (raw, rescaled) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key, label in (("text_loss", "text (answer tokens)"), ("vision_loss", "vision (bits)")):
        raw.plot(steps, [r[key] for r in log], label=label)
    raw.set_title("raw per-modality losses")
    raw.set_yscale("log")
    for key, label in (("text_rescaled", "text / running scale"), ("vision_rescaled", "vision / running scale")):
        rescaled.plot(steps, [r[key] for r in log], label=label)
    rescaled.set_title("rescaled (what is optimised)")
    for ax in (raw, rescaled):
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
