"""Image processor of ERNIE 5.0: any image -> fixed-size RGB pixels in [-1, 1] (DESIGN.md §3 vision bullets).

Every image is resized to one square size (the visual tokenizer's `image_size`), so each image has a fixed token
count for understanding (`understanding_grid ** 2`) and for generation (sum of the scale grids squared). The same
pixels feed the visual tokenizer and the ViT; normalisation maps [0, 255] to [-1, 1] (mean 0.5, std 0.5).
Accepted inputs: PIL images, numpy arrays ((H, W), (H, W, C) or (C, H, W)), torch tensors ((C, H, W) or (H, W)),
raw bytes, or local file paths. Integer arrays hold values in [0, 255]; float arrays values in [0, 1], or in
[0, 255] when their maximum exceeds 1 (rescaled with a warning, as transformers' image processors infer it).
Unreadable inputs and images smaller than `min_image_size` raise `ValueError`.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import AutoImageProcessor, BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_transforms import convert_to_rgb

try:
    from modeling_ernie5 import Ernie5Config
except ImportError:  # loaded as remote code from a checkpoint, without the ernie5 packages
    Ernie5Config = None


class Ernie5ImageProcessor(BaseImageProcessor):
    r"""
    Resizes images to `size` x `size`, converts them to RGB and normalises them to [-1, 1].

    Args:
        size (`int`, *optional*, defaults to 32): output side; must equal the visual tokenizer's `image_size`.
        min_image_size (`int`, *optional*, defaults to 8): smaller inputs (either side) are rejected as unusable.
        resample (`int`, *optional*, defaults to `PIL.Image.BICUBIC`): resampling filter.
        image_mean (`float`, *optional*, defaults to 0.5), image_std (`float`, *optional*, defaults to 0.5).

    Example:

    ```python
    >>> from PIL import Image
    >>> from processing.image_processing import Ernie5ImageProcessor
    >>> Ernie5ImageProcessor()(Image.new("RGB", (64, 48)), return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 3, 32, 32])
    ```
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = 32,
        min_image_size: int = 8,
        resample: int = Image.BICUBIC,
        image_mean: float = 0.5,
        image_std: float = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(size, dict):  # transformers' generic {"height", "width"} form
            size = int(size.get("height", size.get("shortest_edge", 32)))
        self.size = int(size)
        self.min_image_size = int(min_image_size)
        self.resample = int(resample)
        self.image_mean = float(image_mean)
        self.image_std = float(image_std)

    def load_image(self, image: Any, index: int = 0) -> Image.Image:
        """One input -> an RGB PIL image, with a `ValueError` naming the problem and the image index."""
        try:
            if isinstance(image, Image.Image):
                pil = image
            elif isinstance(image, (str, os.PathLike)):
                if str(image).startswith(("http://", "https://")):
                    raise ValueError(f"image {index}: URLs are not fetched (offline); pass a local path or an image")
                with Image.open(image) as f:
                    pil = ImageOps.exif_transpose(f)  # camera photos store their rotation in EXIF
            elif isinstance(image, (bytes, bytearray)):
                with Image.open(io.BytesIO(image)) as f:
                    pil = ImageOps.exif_transpose(f)
            elif isinstance(image, torch.Tensor):
                image = image.detach().cpu()
                array = (image.float() if image.is_floating_point() else image).numpy()  # integers stay integers
                pil = _array_to_pil(array, channels_first=True)
            elif isinstance(image, np.ndarray):
                pil = _array_to_pil(image, channels_first=False)
            else:
                raise ValueError(f"image {index}: unsupported type {type(image).__name__}")
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"image {index}: unreadable image ({err})") from err
        if min(pil.size) < self.min_image_size:
            raise ValueError(
                f"image {index}: {pil.size[0]}x{pil.size[1]} pixels is smaller than min_image_size={self.min_image_size}"
            )
        # Transparent pixels become white, not the black their RGB values often hold (transformers' convention).
        return Image.fromarray(convert_to_rgb(pil, return_numpy=True))

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Images (one or a list) -> `BatchFeature` with `pixel_values` of shape (N, 3, size, size)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        arrays = []
        for i, image in enumerate(images):
            pil = self.load_image(image, i).resize((self.size, self.size), resample=self.resample)
            array = np.asarray(pil, dtype=np.float32) / 255.0
            arrays.append(((array - self.image_mean) / self.image_std).transpose(2, 0, 1))
        data = np.stack(arrays) if arrays else np.zeros((0, 3, self.size, self.size), dtype=np.float32)
        return BatchFeature({"pixel_values": data}, tensor_type=return_tensors)

    def postprocess(self, pixel_values: torch.Tensor) -> list[Image.Image]:
        """Pixels in [-1, 1], (N, 3, H, W) -> PIL images."""
        arrays = ((pixel_values.detach().float().cpu() * self.image_std + self.image_mean).clamp(0, 1) * 255).round()
        return [Image.fromarray(a.permute(1, 2, 0).numpy().astype(np.uint8)) for a in arrays]


CHANNELS = (1, 3, 4)


def _array_to_pil(array: np.ndarray, channels_first: bool) -> Image.Image:
    """An (H, W), (H, W, C) or (C, H, W) array -> PIL. Channels come first for tensors (torch's layout) and for numpy
    arrays whose first axis alone looks like channels. Integers are values in [0, 255]; floats in [0, 1] unless
    their maximum exceeds 1."""
    if array.ndim == 3 and array.shape[0] in CHANNELS and (channels_first or array.shape[-1] not in CHANNELS):
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in CHANNELS:
        raise ValueError(f"an image array must be (H, W), (H, W, C) or (C, H, W), got shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"integer image values must be in [0, 255], got [{array.min()}, {array.max()}]")
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("image array holds NaN or infinite values")
        if array.max() > 1:
            warnings.warn(
                f"float image with values up to {array.max():g} read as [0, 255] pixels (pass [0, 1] floats or uint8)",
                stacklevel=4,
            )
            array = array / 255.0
        array = np.clip(array, 0.0, 1.0) * 255
    else:
        raise ValueError(f"unsupported image array dtype {array.dtype}")
    return Image.fromarray(array.round().astype(np.uint8) if array.dtype != np.uint8 else array)


if Ernie5Config is not None:
    AutoImageProcessor.register(Ernie5Config, slow_image_processor_class=Ernie5ImageProcessor, exist_ok=True)
# Saved folders carry this code, so `AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)` works anywhere.
Ernie5ImageProcessor.register_for_auto_class()

__all__ = ["Ernie5ImageProcessor"]
