"""Open-vocabulary detection operator (`label_bbox`) on a transformers pipeline.

MMAT-1M ran Grounding DINO with object names taken from the teacher's scene graph (§3.2). Here any
checkpoint the `zero-shot-object-detection` pipeline loads (OWL-ViT, OWLv2, Grounding DINO) is read
from a local folder. The rendered result is the released form (Fig. 14): a Python-dict string from
label to a list of normalised `[x1, y1, x2, y2]` boxes with two decimals, label words joined by
`" _ "` as in `{'closest _ car': [[0.0, 0.46, 0.2, 0.72]]}`.
"""

from __future__ import annotations

import os
import re

from PIL import Image

from .base import LABEL_BBOX, Operator, fmt_box

NO_OBJECT = "No queried object was detected in the image."


def render_label(label: str) -> str:
    """`"closest car"` and `"closest_car"` both become `"closest _ car"` (the released spelling)."""
    return " _ ".join(w for w in re.split(r"[\s_]+", label.strip()) if w)


def parse_labels(query: str | None) -> list[str]:
    """Split a query such as `"red circle, blue square"` (or one label per line) into labels."""
    if not query:
        return []
    return [part.strip() for part in re.split(r"[,;\n]", query) if part.strip()]


def render_boxes(boxes: dict[str, list[list[float]]]) -> str:
    return repr(boxes) if boxes else NO_OBJECT


class OpenVocabDetector(Operator):
    """Detect the objects named in the query.

    Args:
        model_path (`str`): local folder of a zero-shot object detection checkpoint.
        threshold (`float`, *optional*, defaults to 0.1): minimum detection score.
        max_per_label (`int`, *optional*, defaults to 3): boxes kept per label, best first.
        device (`str`, *optional*, defaults to `"cpu"`): torch device of the pipeline.
    """

    name = LABEL_BBOX
    needs_query = True

    def __init__(self, model_path: str, threshold: float = 0.1, max_per_label: int = 3, device: str = "cpu"):
        if not os.path.isdir(model_path):
            raise ValueError(f"detector weights must be a local folder, got {model_path!r}")
        from transformers import pipeline

        self.pipe = pipeline("zero-shot-object-detection", model=model_path, device=device)
        self.threshold = threshold
        self.max_per_label = max_per_label

    def run(self, image: Image.Image, query: str | None = None) -> tuple[str, dict]:
        labels = parse_labels(query)
        if not labels:
            raise ValueError("label_bbox needs the object names to look for, e.g. query='red circle, blue square'")
        image = image.convert("RGB")
        width, height = image.size
        hits = self.pipe(image, candidate_labels=labels, threshold=self.threshold)
        boxes: dict[str, list[list[float]]] = {}
        for hit in sorted(hits, key=lambda h: -h["score"]):
            key = render_label(hit["label"])
            if len(boxes.get(key, [])) >= self.max_per_label:
                continue
            b = hit["box"]
            # Detector heads can place boxes partly outside the frame; the paper's boxes lie in [0, 1].
            norm = [
                min(max(b["xmin"] / width, 0.0), 1.0),
                min(max(b["ymin"] / height, 0.0), 1.0),
                min(max(b["xmax"] / width, 0.0), 1.0),
                min(max(b["ymax"] / height, 0.0), 1.0),
            ]
            box = fmt_box(norm)
            if box[2] <= box[0] or box[3] <= box[1]:
                continue  # nothing of it lies inside the image
            boxes.setdefault(key, []).append(box)
        return render_boxes(boxes), {"boxes": boxes, "labels": labels}
