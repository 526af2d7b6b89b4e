"""Train the multi-scale bitwise visual tokenizer (ERNIE 5.0 §2.2.1; issue 5 item 1).

Losses that run on CPU without pretrained networks: L1 + MSE reconstruction and the two-sided commitment term of
`Ernie5VisualTokenizer.forward`. An optional hinge-GAN loss from a small patch discriminator (`--adversarial_weight`)
stands in for the report's adversarial loss; the report's semantic regularisation is `--semantic_teacher DIR`: any
transformers vision model saved locally (SigLIP, CLIP vision, DINOv2, ...) whose patch features the tokenizer's
encoder features are aligned to through a linear head (cosine loss, `--semantic_weight`).

Data: procedural toy-world scenes by default (`processing.toy_world`), or every image under `--image_dir`.

    python training/train_visual_tokenizer.py --output_dir outputs/visual_tokenizer --max_steps 300
    python training/train_visual_tokenizer.py --image_dir /data/images --image_size 64 --max_steps 20000

Writes the tokenizer (`save_pretrained`), `metrics.json` (held-out PSNR) and `recon.png` (inputs over reconstructions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VisualTokenizerTrainingArguments:
    output_dir: str = field(default="outputs/visual_tokenizer", metadata={"help": "where the tokenizer is saved"})
    image_dir: str | None = field(default=None, metadata={"help": "train on images under this folder (else toy world)"})
    image_size: int = field(default=32, metadata={"help": "square image side"})
    codebook_bits: int = field(default=8, metadata={"help": "bits per token (vocabulary 2^bits)"})
    base_channels: int = field(default=16, metadata={"help": "channels of the first convolution"})
    channel_multipliers: str = field(
        default="1,2,2", metadata={"help": "comma-separated multiplier per level; each level after the first halves the grid"}
    )
    scale_schedule: str | None = field(
        default=None,
        metadata={"help": "comma-separated token-grid side per scale, coarse to fine, ending at the latent grid "
                  "(e.g. 1,2,3,4,6,8); default: powers of two"},
    )  # fmt: skip
    max_steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "images per step"})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW peak learning rate (cosine decay)"})
    adversarial_weight: float = field(default=0.0, metadata={"help": "hinge-GAN generator loss weight; 0 disables"})
    prefix_loss_weight: float = field(
        default=0.0, metadata={"help": "weight of the loss on images decoded from a random prefix of the scales"}
    )
    semantic_teacher: str | None = field(
        default=None, metadata={"help": "local directory of a transformers vision model for semantic regularisation"}
    )
    semantic_weight: float = field(default=0.1, metadata={"help": "weight of the semantic (cosine) alignment loss"})
    eval_images: int = field(default=64, metadata={"help": "held-out images for the PSNR report"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    log_every: int = field(default=25, metadata={"help": "log interval in steps"})

    def __post_init__(self):
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("max_steps and batch_size must be >= 1")
        if self.adversarial_weight < 0:
            raise ValueError(f"adversarial_weight must be >= 0, got {self.adversarial_weight}")
        if self.semantic_weight < 0:
            raise ValueError(f"semantic_weight must be >= 0, got {self.semantic_weight}")
        if self.semantic_teacher is not None and not os.path.isdir(self.semantic_teacher):
            raise ValueError(f"semantic_teacher must be a local model directory, got {self.semantic_teacher!r}")


class PatchDiscriminator(nn.Module):
    """A small convolutional patch discriminator for the optional adversarial loss."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels * 2, 4, 2, 1), nn.GroupNorm(8, channels * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(channels * 2, 1, 3, 1, 1),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)


class SemanticTeacher(nn.Module):
    """Semantic regularisation: a frozen vision foundation model's patch features, resampled to the tokenizer's
    latent grid, and a linear head from the tokenizer's encoder features to them; the loss is 1 - cosine similarity.

    Args:
        path (`str`): local directory of a transformers vision model taking `pixel_values` and returning
            `last_hidden_state` patch features (a leading CLS token is dropped).
        feature_channels (`int`): channels of the tokenizer's encoder features.
    """

    def __init__(self, path: str, feature_channels: int):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        config = getattr(config, "vision_config", None) or config
        self.teacher = AutoModel.from_pretrained(path)
        if hasattr(self.teacher, "vision_model") and not hasattr(self.teacher, "embeddings"):
            self.teacher = self.teacher.vision_model  # a two-tower checkpoint (CLIP, SigLIP): keep the image tower
        self.teacher.requires_grad_(False).eval()
        self.image_size = config.image_size
        self.grid = config.image_size // config.patch_size
        self.head = nn.Linear(feature_channels, config.hidden_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: no dropout, no statistics updates
        return self

    def loss(self, pixel_values: torch.Tensor, features_BChw: torch.Tensor) -> torch.Tensor:
        from modeling_ernie5.vision import patch_grid

        with torch.no_grad():
            # Pixels are in [-1, 1], i.e. normalised with mean = std = 0.5 (the SigLIP convention).
            x = F.interpolate(pixel_values, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
            target = patch_grid(self.teacher(pixel_values=x).last_hidden_state, self.grid).permute(0, 3, 1, 2)
            target = F.interpolate(target, size=features_BChw.shape[-2:], mode="bilinear", align_corners=False)
        pred = self.head(features_BChw.permute(0, 2, 3, 1))
        return 1 - F.cosine_similarity(pred, target.permute(0, 2, 3, 1), dim=-1).mean()


# Training scenes are drawn from seeds below this; the held-out evaluation scenes start here.
HELD_OUT_SEED = 10_000_000


def held_out_psnr(model, eval_x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """`(reconstruction, PSNR in dB)` of a tokenizer on held-out images (the model is put in eval mode)."""
    from modeling_ernie5.visual_tokenizer import psnr

    model.eval()
    with torch.no_grad():
        recon = model.decode(model.encode(eval_x))
    return recon, psnr(eval_x, recon)


def held_out_toy_images(n: int, image_size: int) -> torch.Tensor:
    return toy_batch(list(range(HELD_OUT_SEED, HELD_OUT_SEED + n)), image_size)


def toy_batch(seeds: list[int], image_size: int) -> torch.Tensor:
    """Toy-world scenes (1-4 shapes) as pixels in [-1, 1]."""
    import numpy as np

    from processing.toy_world import draw_scene

    arrays = [np.asarray(draw_scene(s, size=image_size)[0], dtype=np.float32) / 127.5 - 1 for s in seeds]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def folder_images(image_dir: str, image_size: int) -> torch.Tensor:
    """Every readable image under `image_dir`, resized; unreadable files are skipped and counted."""
    from processing.image_processing import Ernie5ImageProcessor

    proc = Ernie5ImageProcessor(size=image_size)
    paths = sorted(p for p in Path(image_dir).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
    tensors, skipped = [], 0
    for p in paths:
        try:
            tensors.append(proc(p, return_tensors="pt")["pixel_values"][0])
        except ValueError as err:
            skipped += 1
            print(f"skipping {p}: {err}")
    if not tensors:
        raise ValueError(f"no readable images under {image_dir} ({skipped} skipped)")
    print(f"{len(tensors)} images loaded, {skipped} skipped")
    return torch.stack(tensors)


def train(args: VisualTokenizerTrainingArguments, progress: bool = True):
    """Train and save the tokenizer; returns `(tokenizer, metrics)`."""
    from tqdm.auto import tqdm

    from modeling_ernie5.configuration_ernie5_vision import Ernie5VisualTokenizerConfig
    from modeling_ernie5.visual_tokenizer import Ernie5VisualTokenizer

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    config = Ernie5VisualTokenizerConfig(
        image_size=args.image_size,
        codebook_bits=args.codebook_bits,
        base_channels=args.base_channels,
        channel_multipliers=[int(m) for m in args.channel_multipliers.split(",")],
        prefix_loss_weight=args.prefix_loss_weight,
        scale_schedule=[int(s) for s in args.scale_schedule.split(",")] if args.scale_schedule else None,
    )
    model = Ernie5VisualTokenizer(config)
    semantic = SemanticTeacher(args.semantic_teacher, model.feature_channels) if args.semantic_teacher else None
    params = list(model.parameters()) + (list(semantic.head.parameters()) if semantic is not None else [])
    opt = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s / args.max_steps, 1.0)))
    )
    disc = disc_opt = None
    if args.adversarial_weight > 0:
        disc = PatchDiscriminator()
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=args.learning_rate, betas=(0.5, 0.9))

    pool = folder_images(args.image_dir, args.image_size) if args.image_dir else None
    # Held-out evaluation images: seeds far from the training range (or the last images of the folder).
    if pool is not None:
        n_eval = min(args.eval_images, max(1, len(pool) // 10))
        eval_x, pool = pool[-n_eval:], pool[:-n_eval] if len(pool) > n_eval else pool
    else:
        eval_x = held_out_toy_images(args.eval_images, args.image_size)

    history = []
    bar = tqdm(range(args.max_steps), desc="visual tokenizer", disable=not progress)
    model.train()
    for step in bar:
        if pool is not None:
            x = pool[torch.randint(len(pool), (args.batch_size,))]
        else:
            x = toy_batch([rng.randrange(HELD_OUT_SEED) for _ in range(args.batch_size)], args.image_size)
        out = model(x)
        loss = out.loss
        semantic_loss = semantic.loss(x, out.features) if semantic is not None else None
        if semantic_loss is not None:
            loss = loss + args.semantic_weight * semantic_loss
        if disc is not None:
            loss = loss - args.adversarial_weight * disc(out.reconstruction).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if disc is not None:
            real, fake = disc(x), disc(out.reconstruction.detach())
            d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
        if step % args.log_every == 0 or step == args.max_steps - 1:
            record = {"step": step, "loss": out.loss.item(), "reconstruction": out.reconstruction_loss.item()}
            if semantic_loss is not None:
                record["semantic"] = semantic_loss.item()
            history.append(record)
            bar.set_postfix(loss=f"{out.loss.item():.4f}")

    recon, psnr_db = held_out_psnr(model, eval_x)
    metrics = {"psnr_db": psnr_db, "eval_images": len(eval_x), "steps": args.max_steps, "history": history}
    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    save_reconstruction_grid(eval_x[:8], recon[:8], os.path.join(args.output_dir, "recon.png"))
    return model, metrics


def save_reconstruction_grid(x: torch.Tensor, recon: torch.Tensor, path: str) -> None:
    """Inputs on the top row, reconstructions below, upscaled 4x."""
    from PIL import Image

    both = torch.cat([torch.cat(list(x), dim=2), torch.cat(list(recon), dim=2)], dim=1)
    array = ((both.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    image = Image.fromarray(array)
    image.resize((image.width * 4, image.height * 4), Image.NEAREST).save(path)


def make_parser(subparsers=None) -> argparse.ArgumentParser:
    description = "Train the ERNIE 5.0 multi-scale bitwise visual tokenizer."
    parser = subparsers.add_parser("visual-tokenizer", help=description) if subparsers else argparse.ArgumentParser(description=description)
    for f in fields(VisualTokenizerTrainingArguments):
        kind = {"int": int, "float": float, "str": str, "str | None": str}[str(f.type)]
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata.get("help"))
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = VisualTokenizerTrainingArguments(**vars(make_parser().parse_args(argv)))
    _, metrics = train(args)
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"} | {"args": asdict(args)}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
