"""Face detection operator (`face_detection`) on OpenCV's bundled Haar cascade.

MMAT-1M used deepface (§3.2); its rendered result lists pixel boxes (Fig. 4: "There is one face with
a coordinate: [454.0, 301.0, 883.0, 838.0]"). OpenCV's frontal-face cascade ships inside the
`opencv-python-headless` wheel (4.x), so this back-end needs no download.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from PIL import Image

from .base import FACE_DETECTION, Operator

NO_FACE = "No face was detected in the image."


def render_faces(boxes: list[list[float]]) -> str:
    """Render pixel boxes as the released RR data does."""
    if not boxes:
        return NO_FACE
    if len(boxes) == 1:
        return f"There is one face with a coordinate: {boxes[0]}"
    return f"There are {len(boxes)} faces with coordinates: " + ", ".join(str(b) for b in boxes)


class HaarFaceDetector(Operator):
    """Detect frontal faces with a Haar cascade.

    Args:
        cascade (`str`, *optional*, defaults to `"haarcascade_frontalface_default.xml"`): a file name in
            `cv2.data.haarcascades` or a path to a cascade XML file.
        scale_factor (`float`, *optional*, defaults to 1.1): image-pyramid step of the detector.
        min_neighbors (`int`, *optional*, defaults to 4): overlapping hits needed to keep a box (OpenCV's
            examples use 3-5; 4 keeps drawn and small faces without false hits on flat regions).
    """

    name = FACE_DETECTION

    def __init__(
        self,
        cascade: str = "haarcascade_frontalface_default.xml",
        scale_factor: float = 1.1,
        min_neighbors: int = 4,
    ):
        import cv2

        path = cascade if os.path.isfile(cascade) else os.path.join(getattr(cv2, "data").haarcascades, cascade)
        if not os.path.isfile(path):
            raise ValueError(
                f"Haar cascade {cascade!r} not found (looked at {path}); opencv-python-headless 5.x no longer "
                "ships the cascades, install `opencv-python-headless<5` or pass a path to the XML file"
            )
        self._cv2 = cv2
        self._path = path
        # `CascadeClassifier.detectMultiScale` keeps scratch buffers in the object, so one instance shared by the
        # runtime's worker threads mixes boxes of different images; each thread gets its own.
        self._local = threading.local()
        if self._classifier().empty():
            raise ValueError(f"OpenCV could not load the cascade at {path}")
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors

    def _classifier(self):
        classifier = getattr(self._local, "classifier", None)
        if classifier is None:
            classifier = self._local.classifier = self._cv2.CascadeClassifier(self._path)
        return classifier

    def run(self, image: Image.Image, query: str | None = None) -> tuple[str, dict]:
        gray = np.asarray(image.convert("L"))
        found = self._classifier().detectMultiScale(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(12, 12)
        )
        boxes = [[float(x), float(y), float(x + w), float(y + h)] for (x, y, w, h) in np.asarray(found).reshape(-1, 4)]
        boxes.sort()
        return render_faces(boxes), {"boxes": boxes, "image_size": list(image.size)}
