"""Multimodal processor of ERNIE 5.0: text + images -> model inputs (ERNIE 5.0 §2.2, Fig. 2; DESIGN.md §3).

`Ernie5Processor` combines the text tokenizer and `Ernie5ImageProcessor` and lays images out as the model expects:

- understanding: every `<image>` tag becomes `<|boi|>` + `<image>` x (understanding_grid^2) + `<|eoi|>`, and the
  images are processed into `pixel_values`;
- generation (training): every `<|image_gen|>` tag, with a target image in `gen_images`, becomes `<|boi|>` +
  `<|image_gen|>` x (tokens of all scales) + `<|eoi|>` and the targets go to `gen_pixel_values`;
- generation (inference): a final `<|image_gen|>` tag without a target becomes `<|boi|>`, the prompt that
  `Ernie5ForConditionalGeneration.generate_image` continues.

On request it also returns the scale-wise block-causal 4D attention mask, built by the function the model uses
(`modeling_ernie5.multimodal_layout`). It returns no `position_ids`: the model derives the Uni-RoPE (t, h, w)
positions from the token ids at every entry point, as Qwen2-VL does. They are fractional (coarse scales are
centre-aligned), so as a float tensor in the batch they would be rounded by the usual `batch.to(torch.bfloat16)`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoProcessor, BatchFeature, ProcessorMixin

from .image_processing import Ernie5ImageProcessor  # noqa: F401  (registers it with AutoImageProcessor)

from .tokenizer import BOI as BOI_TOKEN
from .tokenizer import EOI as EOI_TOKEN
from .tokenizer import IMAGE_GEN_TOKEN, IMAGE_TOKEN

try:
    from modeling_ernie5 import Ernie5Config
    from modeling_ernie5.masks import build_block_causal_mask
    from modeling_ernie5.multimodal_layout import ImageLayout, layout_positions_and_blocks
except ImportError:
    # Loaded as remote code from a checkpoint (`trust_remote_code=True`) without the ernie5 packages: this file and
    # its relative imports are all that was saved. Everything works but the 4D mask, which needs the model's layout.
    Ernie5Config = None


def add_vision_tokens(tokenizer) -> Any:
    """Add the image placeholder and BOI/EOI tokens to a text tokenizer if missing (idempotent); returns it.

    The model's `vocab_size` must cover `len(tokenizer)` afterwards.
    """
    missing = [t for t in (IMAGE_TOKEN, IMAGE_GEN_TOKEN, BOI_TOKEN, EOI_TOKEN) if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer


class Ernie5Processor(ProcessorMixin):
    r"""
    Processor for ERNIE 5.0 text + image inputs.

    Args:
        image_processor (`Ernie5ImageProcessor`): resizes and normalises images.
        tokenizer (`PreTrainedTokenizerFast`): the text tokenizer; image tokens are added to it if missing.
        chat_template (`str`, *optional*): defaults to the tokenizer's.
        understanding_tokens_per_image (`int`, *optional*, defaults to 16): `vision_config.understanding_tokens_per_image`.
        scale_schedule (`list[int]`, *optional*, defaults to `[1, 2, 4, 8]`): the visual tokenizer's scale schedule.
        max_length (`int`, *optional*): longest allowed sequence after expansion; defaults to the tokenizer's
            `model_max_length`.

    Example:

    ```python
    >>> processor = Ernie5Processor.from_config(image_processor, tokenizer, model.config)
    >>> batch = processor(text=["<image> How many circles?"], images=[image])
    >>> sorted(batch.keys())
    ['attention_mask', 'input_ids', 'pixel_values']
    ```
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        understanding_tokens_per_image: int = 16,
        scale_schedule: list[int] | None = None,
        max_length: int | None = None,
        **kwargs,
    ):
        if tokenizer is not None:
            add_vision_tokens(tokenizer)
        self.image_token = IMAGE_TOKEN
        self.image_gen_token = IMAGE_GEN_TOKEN
        self.boi_token = BOI_TOKEN
        self.eoi_token = EOI_TOKEN
        self.understanding_tokens_per_image = int(understanding_tokens_per_image)
        self.scale_schedule = list(scale_schedule) if scale_schedule is not None else [1, 2, 4, 8]
        self.max_length = max_length
        if chat_template is None and tokenizer is not None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_config(cls, image_processor, tokenizer, config: Ernie5Config, **kwargs) -> "Ernie5Processor":
        """A processor matching a model config's vision settings."""
        vc = config.vision_config
        if vc is None:
            raise ValueError("config.vision_config is None: a text-only model needs no image processor")
        if image_processor.size != vc.image_size:
            raise ValueError(f"image processor size {image_processor.size} != tokenizer image_size {vc.image_size}")
        return cls(
            image_processor,
            tokenizer,
            understanding_tokens_per_image=vc.understanding_tokens_per_image,
            scale_schedule=list(vc.tokenizer_config.scale_schedule),
            max_length=config.max_position_embeddings,
            **kwargs,
        )

    # --- ids -----------------------------------------------------------------------------------------------------

    def vision_token_ids(self) -> dict[str, int]:
        """The ids to put in `Ernie5Config` (`image_token_id`, `image_gen_token_id`, `boi_token_id`, `eoi_token_id`)."""
        conv = self.tokenizer.convert_tokens_to_ids
        return {
            "image_token_id": conv(IMAGE_TOKEN),
            "image_gen_token_id": conv(IMAGE_GEN_TOKEN),
            "boi_token_id": conv(BOI_TOKEN),
            "eoi_token_id": conv(EOI_TOKEN),
        }

    @property
    def generation_tokens_per_image(self) -> int:
        return sum(s * s for s in self.scale_schedule)

    @property
    def layout(self) -> ImageLayout:
        if Ernie5Config is None:
            raise ImportError("the image layout (and return_4d_attention_mask) needs the modeling_ernie5 package")
        ids = self.vision_token_ids()
        grid = int(round(self.understanding_tokens_per_image**0.5))
        return ImageLayout(ids["image_token_id"], ids["image_gen_token_id"], grid, tuple(self.scale_schedule))

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "gen_pixel_values"]

    # --- expansion -----------------------------------------------------------------------------------------------

    def expand_text(self, text: str, n_gen_targets: int, index: int = 0) -> str:
        """Replace image tags by their token layout (see the module docstring)."""
        image_block = BOI_TOKEN + IMAGE_TOKEN * self.understanding_tokens_per_image + EOI_TOKEN
        n_gen_tags = text.count(IMAGE_GEN_TOKEN)
        pieces = text.split(IMAGE_GEN_TOKEN)
        out = pieces[0].replace(IMAGE_TOKEN, image_block)
        for j, piece in enumerate(pieces[1:]):
            if j < n_gen_targets:
                out += BOI_TOKEN + IMAGE_GEN_TOKEN * self.generation_tokens_per_image + EOI_TOKEN
            elif j == n_gen_tags - 1 and not piece.strip():
                # Generation prompt: the model continues with the scales, so `<boi>` must end it (trailing
                # whitespace is dropped).
                out += BOI_TOKEN
                continue
            else:
                raise ValueError(
                    f"sample {index}: {n_gen_tags} {IMAGE_GEN_TOKEN} tags but {n_gen_targets} target images; only a "
                    "final tag may go without a target (it marks where generation starts)"
                )
            out += piece.replace(IMAGE_TOKEN, image_block)
        return out

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        gen_images: Any = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        return_4d_attention_mask: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """Build model inputs.

        Args:
            text (`str` or `list[str]`): prompts with `<image>` / `<|image_gen|>` tags.
            images (list, or list of lists per sample, *optional*): images for the `<image>` tags, in order.
            gen_images (list, or list of lists per sample, *optional*): target images for `<|image_gen|>` tags.
            return_tensors (`str`, *optional*, defaults to `"pt"`).
            padding (`bool` or `str`, *optional*, defaults to `True`): pad (on the tokenizer's side, left by default).
            return_4d_attention_mask (`bool`, *optional*): return the (B, 1, L, L) boolean block-causal mask as
                `attention_mask` instead of the (B, L) padding mask (with `return_tensors="pt"` only).
            kwargs: passed to the tokenizer (`truncation`, `max_length`, `add_special_tokens`, which defaults to
                False here, `return_attention_mask`, ...).

        Raises:
            `ValueError`: tag and image counts differ, an image is unreadable or too small, a sequence exceeds
            `max_length`, truncation cut through an image, or options that cannot go together.
        """
        if text is None:
            raise ValueError("Ernie5Processor needs text (use an <image> tag for each image)")
        return_attention_mask = kwargs.pop("return_attention_mask", True)
        if return_4d_attention_mask and (return_tensors != "pt" or not return_attention_mask):
            raise ValueError(
                "return_4d_attention_mask needs return_tensors='pt' and an attention mask to return, got "
                f"return_tensors={return_tensors!r}, return_attention_mask={return_attention_mask}"
            )
        texts = [text] if isinstance(text, str) else list(text)
        per_sample_images = _split_per_sample(images, texts, IMAGE_TOKEN, "images")
        per_sample_gen = _split_per_sample(gen_images, texts, IMAGE_GEN_TOKEN, "gen_images", allow_fewer=True)
        expanded = [self.expand_text(t, len(per_sample_gen[i]), i) for i, t in enumerate(texts)]
        kwargs.setdefault("add_special_tokens", False)
        # The padding mask is needed here (length check) whatever the caller wants returned.
        encoded = self.tokenizer(expanded, padding=padding, return_tensors=None, return_attention_mask=True, **kwargs)
        limit = self.max_length or getattr(self.tokenizer, "model_max_length", None)
        ids = self.vision_token_ids()
        for i, row in enumerate(encoded["input_ids"]):
            n_real = sum(encoded["attention_mask"][i])
            if limit is not None and n_real > limit:
                raise ValueError(f"sample {i}: {n_real} tokens after image expansion exceed max_length={limit}")
            kept = row.count(ids["image_token_id"]) + row.count(ids["image_gen_token_id"])
            expected = (
                len(per_sample_images[i]) * self.understanding_tokens_per_image
                + len(per_sample_gen[i]) * self.generation_tokens_per_image
            )
            if kept != expected:
                raise ValueError(
                    f"sample {i}: truncation (truncation={kwargs.get('truncation')!r}, max_length="
                    f"{kwargs.get('max_length')}) cut through its images: {kept} of {expected} image placeholder "
                    "tokens left; shorten the text instead or raise max_length"
                )
        data: dict[str, Any] = {"input_ids": encoded["input_ids"]}
        if return_attention_mask:
            data["attention_mask"] = encoded["attention_mask"]
        flat_images = [im for sample in per_sample_images for im in sample]
        flat_gen = [im for sample in per_sample_gen for im in sample]
        pixel_tensors = "pt" if return_tensors == "pt" else "np"
        if flat_images:
            data["pixel_values"] = self.image_processor(flat_images, return_tensors=pixel_tensors)["pixel_values"]
        if flat_gen:
            data["gen_pixel_values"] = self.image_processor(flat_gen, return_tensors=pixel_tensors)["pixel_values"]
        batch = BatchFeature(data, tensor_type=return_tensors)
        if return_4d_attention_mask:
            _, blocks, _ = layout_positions_and_blocks(batch["input_ids"], batch["attention_mask"], self.layout)
            batch["attention_mask"] = build_block_causal_mask(blocks, batch["attention_mask"], torch.float32) == 0
        return batch

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _split_per_sample(images, texts: list[str], tag: str, name: str, allow_fewer: bool = False) -> list[list]:
    """Assign images to samples: a flat list is dealt out by each sample's tag count; a list of lists is used as is."""
    counts = [t.count(tag) for t in texts]
    if images is None:
        images = []
    if not isinstance(images, (list, tuple)):
        images = [images]
    if images and all(isinstance(x, (list, tuple)) for x in images):
        if len(images) != len(texts):
            raise ValueError(f"{name}: {len(images)} per-sample lists for {len(texts)} texts")
        per_sample = [list(x) for x in images]
    else:
        per_sample, start = [], 0
        total = sum(counts)
        if len(images) != total and not (allow_fewer and len(images) <= total):
            raise ValueError(f"{total} {tag} tags in the text but {len(images)} {name}")
        for c in counts:
            take = min(c, max(len(images) - start, 0))
            per_sample.append(list(images[start : start + take]))
            start += take
    for i, (c, sample) in enumerate(zip(counts, per_sample)):
        if len(sample) > c or (not allow_fewer and len(sample) != c):
            raise ValueError(f"sample {i}: {c} {tag} tags but {len(sample)} {name}")
    return per_sample


if Ernie5Config is not None:
    AutoProcessor.register(Ernie5Config, Ernie5Processor, exist_ok=True)
# Saved folders carry this code, so `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` works anywhere.
Ernie5Processor.register_for_auto_class()

__all__ = ["Ernie5Processor", "add_vision_tokens", "BOI_TOKEN", "EOI_TOKEN", "IMAGE_GEN_TOKEN", "IMAGE_TOKEN"]
