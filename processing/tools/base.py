"""The operator interface shared by the MMAT data engine, evaluation and RL (DESIGN.md §3, §5).

An operator turns an image (and, for some, a text query) into a result whose ``text`` is the textual
form MMAT-1M feeds back to the model (MMAT-1M §3.2, Fig. 4, Fig. 14): normalised boxes for open
vocabulary detection, the recognised text for OCR, pixel boxes for faces, a caption, numbered
snippets for retrieval. Callers never see which back-end answered; they see a :class:`ToolResult`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from PIL import Image

# Operator names exactly as the MMAT-1M data-generation prompt spells them (§3.2, Fig. 6).
IMAGE_CAPTION = "image_caption"
LABEL_BBOX = "label_bbox"
OCR = "ocr"
FACE_DETECTION = "face_detection"
RAG = "rag"
OPERATOR_NAMES = (IMAGE_CAPTION, LABEL_BBOX, OCR, FACE_DETECTION)

# The released RR data writes some names differently (Fig. 4 shows "face detection" with a space).
_ALIASES = {
    "face detection": FACE_DETECTION,
    "face-detection": FACE_DETECTION,
    "caption": IMAGE_CAPTION,
    "image caption": IMAGE_CAPTION,
    "ovd": LABEL_BBOX,
    "label bbox": LABEL_BBOX,
    "detection": LABEL_BBOX,
}


def canonical_operator_name(name: str) -> str:
    """Map a raw operator name (as a teacher or the released data writes it) to the canonical one.

    Unknown names are returned stripped and lower-cased so a caller can still record them.
    """
    key = " ".join(str(name).strip().lower().split())
    return _ALIASES.get(key, key.replace(" ", "_"))


@dataclasses.dataclass
class ToolResult:
    """What one operator or retrieval call produced.

    Args:
        name (`str`): canonical operator name (`"ocr"`, `"label_bbox"`, ..., or `"rag"`).
        ok (`bool`): whether the call succeeded. A failed call never raises; it sets `error`.
        text (`str`): the result in the paper's textual form (empty when `ok` is False).
        data (`dict`): structured result (boxes, words, results list) for programs.
        error (`str`, *optional*): why the call failed (timeout, crash, missing input).
        elapsed_s (`float`): wall time of the call in seconds.
    """

    name: str
    ok: bool
    text: str = ""
    data: dict = dataclasses.field(default_factory=dict)
    error: str | None = None
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Operator:
    """Base class of an image operator.

    Subclasses set `name`, say whether they need a text query (`needs_query`) and implement
    :meth:`run`, returning the rendered text and a structured payload. Errors are raised freely:
    the runtime turns them into a failed :class:`ToolResult`.
    """

    name: str = ""
    needs_query: bool = False

    def run(self, image: Image.Image, query: str | None = None) -> tuple[str, dict]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def fmt_box(box) -> list[float]:
    """Round a box to two decimals, the precision of the released label_bbox results (Fig. 14)."""
    return [round(float(v), 2) for v in box]
