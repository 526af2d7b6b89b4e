"""Benchmark samples in one schema, whatever file they came from (DESIGN.md §6).

VLMEvalKit TSV files and Hugging Face datasets saved to disk both become
:class:`BenchmarkSample` records; images stay encoded until a batch needs them, so a benchmark of
thousands of images does not sit decoded in memory.
"""

from __future__ import annotations

import ast
import base64
import binascii
import dataclasses
import io
import math
import os

from PIL import Image

from ..images import open_image

LETTERS = "ABCDEFGHIJKLMNOP"


@dataclasses.dataclass
class BenchmarkSample:
    """One benchmark item.

    Args:
        id (`str`): item id (the TSV `index` or the dataset's id column).
        question (`str`): question text, with any hint prepended.
        answers (`list[str]`): reference answers (for multiple choice: the option text(s) and letter).
        choices (`list[str]`, *optional*): option texts in letter order.
        answer_letter (`str`, *optional*): the correct option letter.
        images (`list`): encoded images: `bytes`, a local path, or an already decoded `PIL.Image`.
        category (`str`, *optional*): the item's category (OCRBench question type, MMStar skill...).
        extra (`dict`): any other columns, kept for reports.
    """

    id: str
    question: str
    answers: list[str]
    choices: list[str] | None = None
    answer_letter: str | None = None
    images: list = dataclasses.field(default_factory=list)
    category: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def load_images(self) -> tuple[list[Image.Image], list[str]]:
        """Decode this item's images; returns `(images, problems)` and never raises."""
        out, problems = [], []
        for i, item in enumerate(self.images):
            if isinstance(item, Image.Image):
                out.append(item.convert("RGB"))
                continue
            img, reason = open_image(item)
            if img is None:
                problems.append(f"image {i}: {reason}")
            else:
                out.append(img)
        return out, problems


def is_missing(value) -> bool:
    """None, NaN or a blank string: pandas writes all three for an empty TSV cell."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def parse_list_cell(value) -> list:
    """A cell holding a Python/JSON list literal ("['a', 'b']") as a list; anything else as [value].

    `ast.literal_eval` only builds literals, so a hostile cell cannot run code.
    """
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return [value]
        if isinstance(parsed, (list, tuple)):
            return list(parsed)
    return [value]


def decode_base64_image(text: str) -> bytes | None:
    """Bytes of a base64 image cell, or None when the text is not valid base64."""
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        return None


def image_to_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def resolve_under(root: str, rel: str) -> str | None:
    """`root/rel` if it stays inside `root` and exists, else None (paths come from data records)."""
    root_abs = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root_abs, rel))
    if os.path.commonpath([root_abs, path]) != root_abs or not os.path.isfile(path):
        return None
    return path
