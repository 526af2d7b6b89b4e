"""Expert usage by modality, per layer, as heat maps (ERNIE 5.0 §6 routing analysis; issue 5 item 7).

ERNIE 5.0's router never sees modality ids; the report's analysis shows which experts text and visual tokens end up
using. This script runs a model over a mixed batch, counts for every MoE layer how often tokens of each modality
(text, image understanding, image generation) pick each expert, and draws one heat map per layer (rows: modality,
columns: experts, colour: share of that modality's routed slots). It also reports, per layer, the Jensen-Shannon
divergence between the text and image usage distributions (0 = identical use, 1 = disjoint experts).

    python -m eval.routing_heatmap --model_dir outputs/vision_toy/model --output routing.png

With `--model_dir` pointing at a folder holding an `Ernie5ForConditionalGeneration` and its `Ernie5Processor`, the
batch is built from toy-world scenes (questions about images, and image-generation prompts).
"""

from __future__ import annotations

import argparse
import json
import math
import random

import torch

MODALITIES = ("text", "image", "image_gen")


def token_modalities(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config) -> torch.Tensor:
    """(B, L) modality index per token (0 text, 1 image understanding, 2 image generation, -1 padding)."""
    kinds = torch.zeros_like(input_ids)
    kinds[input_ids == config.image_token_id] = 1
    kinds[input_ids == config.image_gen_token_id] = 2
    if attention_mask is not None and attention_mask.dim() == 2:
        kinds[attention_mask == 0] = -1
    return kinds


@torch.no_grad()
def routing_usage(model, batches: list[dict]) -> torch.Tensor:
    """Counts (layers, modalities, experts) of routed slots over `batches` of model inputs."""
    config = model.config
    counts = None
    model.eval()
    for batch in batches:
        out = model(**batch, output_routing_indices=True, use_cache=False)
        kinds = token_modalities(batch["input_ids"], batch.get("attention_mask"), config).reshape(-1)
        layers = out.routing_indices
        if counts is None:
            counts = torch.zeros(len(layers), len(MODALITIES), config.num_experts)
        for li, idx_TK in enumerate(layers):
            idx_TK = idx_TK.cpu()
            for m in range(len(MODALITIES)):
                chosen = idx_TK[kinds == m]
                chosen = chosen[chosen < config.num_experts]  # slot index E = "empty" under elastic top-k
                counts[li, m] += torch.bincount(chosen, minlength=config.num_experts).float()
    return counts


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits between two count vectors (normalised here)."""
    p, q = p / p.sum().clamp(min=1e-12), q / q.sum().clamp(min=1e-12)
    m = (p + q) / 2

    def kl(a, b):
        mask = a > 0
        return float((a[mask] * (a[mask] / b[mask]).log2()).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def plot_heatmaps(counts: torch.Tensor, path: str, title: str = "Expert usage by modality") -> dict:
    """Write the per-layer heat maps to `path` (PNG); returns per-layer JS divergences (text vs image kinds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = counts.shape[0]
    present = [m for m in range(len(MODALITIES)) if counts[:, m].sum() > 0]
    share = counts[:, present] / counts[:, present].sum(-1, keepdim=True).clamp(min=1)
    cols = min(n_layers, 4)
    rows = math.ceil(n_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 1.1 + 0.45 * len(present) * rows + 0.8 * rows), squeeze=False)
    divergences = {}
    vmax = float(share.max())
    for li in range(n_layers):
        ax = axes[li // cols][li % cols]
        im = ax.imshow(share[li].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_yticks(range(len(present)), [MODALITIES[m] for m in present] if li % cols == 0 else [])
        ax.set_xticks(range(counts.shape[2]))
        ax.set_xlabel("expert")
        jsd = {}
        for m in present:
            if m != 0 and 0 in present:
                jsd[f"text_vs_{MODALITIES[m]}"] = round(js_divergence(counts[li, 0], counts[li, m]), 4)
        divergences[f"layer_{li}"] = jsd
        ax.set_title(f"layer {li}" + (f"  JS={next(iter(jsd.values())):.3f}" if jsd else ""), fontsize=9)
    for k in range(n_layers, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="share of routed slots")
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return divergences


def toy_batches(processor, n_scenes: int = 16, seed: int = 0, batch_size: int = 8) -> list[dict]:
    """Mixed inputs from the toy world: questions about scenes and generation samples with their targets."""
    from processing.toy_world import caption, draw_scene, make_questions

    rng = random.Random(seed)
    batches = []
    for start in range(0, n_scenes, batch_size):
        seeds = range(seed + start, seed + min(start + batch_size, n_scenes))
        images, texts, gen_texts, gen_images = [], [], [], []
        for s in seeds:
            image, scene = draw_scene(s, size=64)
            qa = make_questions(scene, rng)[0]
            images.append(image)
            texts.append(f"<image> Q: {qa.question} A: {qa.answer}")
            one, one_scene = draw_scene(s, size=64, max_shapes=1)
            gen_texts.append(f"draw {caption(one_scene)} <|image_gen|>")
            gen_images.append(one)
        for batch in (processor(text=texts, images=images), processor(text=gen_texts, gen_images=gen_images)):
            batches.append(dict(batch))
    return batches


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Per-layer heat maps of expert usage by modality.")
    parser.add_argument("--model_dir", required=True, help="saved Ernie5ForConditionalGeneration + Ernie5Processor")
    parser.add_argument("--output", default="routing_heatmap.png", help="PNG path")
    parser.add_argument("--scenes", type=int, default=32, help="toy-world scenes to route")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import modeling_ernie5.modeling_ernie5_vl  # noqa: F401  (registers the vision classes)
    import processing.processing_ernie5  # noqa: F401  (registers the processor)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.model_dir)
    processor = AutoProcessor.from_pretrained(args.model_dir)
    counts = routing_usage(model, toy_batches(processor, args.scenes, args.seed))
    divergences = plot_heatmaps(counts, args.output)
    print(json.dumps({"output": args.output, "js_divergence": divergences}, indent=2))
    return divergences


if __name__ == "__main__":
    main()
