"""Batched generation from a local Hugging Face checkpoint, image-text or text-only (DESIGN.md §6).

The runner never needs to know which model family it is talking to:

- an image-text-to-text checkpoint (anything `AutoModelForImageTextToText` + `AutoProcessor` load:
  Llava, Qwen2-VL, InternVL, ERNIE 5 with `trust_remote_code`) gets chat messages with an image
  part when the item has an image;
- a causal LM (`AutoModelForCausalLM` + `AutoTokenizer`) gets the text only, so text-only baselines
  (and the golden-query upper bound for text models) run through the same code.

`import modeling_ernie5` is attempted first so that ERNIE 5 registers its Auto classes when the
package is installed; a checkpoint saved with `auto_map` also loads without it.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging

import torch
from PIL import Image

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Prompt:
    """One generation request: user text plus at most one image (None for text-only)."""

    text: str
    image: Image.Image | None = None
    system: str | None = None


def _register_ernie5() -> None:
    try:
        importlib.import_module("modeling_ernie5")
    except ImportError:
        pass


def _resolve_dtype(dtype: str | None):
    if dtype in (None, "auto"):
        return "auto" if dtype == "auto" else None
    if not hasattr(torch, dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return getattr(torch, dtype)


class GenerationModel:
    """A local checkpoint behind `generate(list[Prompt]) -> list[str]`.

    Args:
        path (`str`): local model folder.
        device (`str`, *optional*, defaults to `"cpu"`): torch device.
        dtype (`str`, *optional*): torch dtype name (`"bfloat16"`, ...) or `"auto"`.
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow code shipped in the folder.
        max_new_tokens (`int`, *optional*, defaults to 64): generation budget per answer.
        kind (`str`, *optional*): force `"image-text-to-text"` or `"causal-lm"`; by default the
            first that loads wins.
    """

    KINDS = ("image-text-to-text", "causal-lm")

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        dtype: str | None = None,
        trust_remote_code: bool = False,
        max_new_tokens: int = 64,
        kind: str | None = None,
    ):
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        if kind is not None and kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        _register_ernie5()
        self.path = path
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens
        kwargs = {"trust_remote_code": trust_remote_code}
        torch_dtype = _resolve_dtype(dtype)
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        errors = []
        self.model = None
        if kind in (None, "image-text-to-text"):
            try:
                self.model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
                self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
                self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
                self.kind = "image-text-to-text"
            except (ValueError, KeyError, OSError) as err:
                errors.append(f"image-text-to-text: {err}")
                self.model = None
        if self.model is None and kind in (None, "causal-lm"):
            try:
                self.model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
                self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
                self.processor = None
                self.kind = "causal-lm"
            except (ValueError, KeyError, OSError) as err:
                errors.append(f"causal-lm: {err}")
        if self.model is None:
            raise ValueError(f"could not load {path} as a generation model: " + " | ".join(errors))
        self.model.to(self.device).eval()
        # Decoder-only generation continues from the last position, so prompts are padded on the left.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def accepts_images(self) -> bool:
        return self.kind == "image-text-to-text"

    def _chat_text(self, prompt: Prompt, with_image: bool) -> str:
        template_owner = self.processor if self.processor is not None else self.tokenizer
        has_template = getattr(template_owner, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not has_template:
            # Base checkpoints without a chat template get a plain question/answer frame.
            image_token = getattr(self.processor, "image_token", "") if with_image else ""
            head = f"{prompt.system}\n" if prompt.system else ""
            return f"{head}{image_token}{prompt.text}\nAnswer:"
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt.text}]
        if self.processor is None:
            content = prompt.text
        messages = ([{"role": "system", "content": prompt.system}] if prompt.system else []) + [
            {"role": "user", "content": content}
        ]
        return template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def generate(self, prompts: list[Prompt]) -> list[str]:
        """Greedy answers for a batch of prompts (images are dropped for text-only models)."""
        if not prompts:
            return []
        use_images = [self.accepts_images and p.image is not None for p in prompts]
        texts = [self._chat_text(p, img) for p, img in zip(prompts, use_images)]
        if self.processor is not None:
            images = [p.image for p, img in zip(prompts, use_images) if img]
            inputs = self.processor(
                text=texts, images=images or None, padding=True, return_tensors="pt"
            )
        else:
            inputs = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        inputs = inputs.to(self.device)
        output = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
