"""Local image store for benchmarks whose records point at remote image URLs (Dyn-VQA; DESIGN.md §6, §7).

Nothing is fetched at run time. Images are looked up in a local folder, either under the URL's
hash (``<root>/<sha256(url)>.<ext>``, what :meth:`ImageStore.add` writes when a user fills the
cache from a download made elsewhere) or mirrored by URL path (``<root>/<host path>``, what a
``wget -x``-style mirror produces). A mirrored path is resolved under the root and rejected if it
escapes it, since the path comes from a data record. A missing or unreadable image is reported to
the caller as ``None`` with a reason; it never stops a run.
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.parse
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp", ".gif", ".bmp")


def url_key(url: str) -> str:
    """Cache key of an image URL: the SHA-256 hex digest of the URL text (UTF-8)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


class ImageStore:
    """Find and open cached images by URL.

    Args:
        root (`str` or `os.PathLike`): the folder holding the images.

    Example:

    ```python
    >>> store = ImageStore("images/")
    >>> path, reason = store.locate("https://example.org/a/image_1.jpeg")
    ```
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a directory")

    def _mirrored(self, url: str) -> Path | None:
        parsed = urllib.parse.urlparse(url)
        rel = urllib.parse.unquote(parsed.path).lstrip("/")
        if not rel:
            return None
        for candidate in (self.root / parsed.netloc / rel, self.root / rel):
            resolved = candidate.resolve()
            # Record-supplied paths must stay inside the image root ("../" or absolute tricks).
            if resolved.is_relative_to(self.root) and resolved.is_file():
                return resolved
        return None

    def locate(self, url: str | None) -> tuple[Path | None, str | None]:
        """Return `(path, None)` for a cached image, or `(None, reason)` when there is none."""
        if not url:
            return None, "no image url"
        key = url_key(url)
        for ext in ("", *IMAGE_EXTENSIONS):
            path = self.root / f"{key}{ext}"
            if path.is_file():
                return path, None
        mirrored = self._mirrored(url)
        if mirrored is not None:
            return mirrored, None
        return None, f"not cached under {self.root} (key {key[:16]}...)"

    def open(self, url: str | None) -> tuple[Image.Image | None, str | None]:
        """Open a cached image as RGB; `(None, reason)` when missing or unreadable."""
        path, reason = self.locate(url)
        if path is None:
            return None, reason
        return open_image(path)

    def add(self, url: str, data: bytes) -> Path:
        """Store downloaded bytes for `url` under its hash key (the extension is taken from the URL)."""
        ext = os.path.splitext(urllib.parse.urlparse(url).path)[1].lower()
        path = self.root / f"{url_key(url)}{ext if ext in IMAGE_EXTENSIONS else ''}"
        path.write_bytes(data)
        return path


def open_image(source: str | os.PathLike | bytes) -> tuple[Image.Image | None, str | None]:
    """Decode an image file or bytes to RGB; `(None, reason)` for a corrupt one."""
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        with stream, Image.open(stream) as img:
            return img.convert("RGB"), None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return None, f"unreadable image: {type(err).__name__}: {err}"
