"""Turning PNG / JPEG images (files or bytes) into an image adapter's input arrays.

An image adapter records its preprocessing in `adapter.json` (`maml.images.PREPROCESSING`:
grayscale in [0, 1] with ink = 1, an area-average resize to 28x28). A user's picture of a drawn
character is dark ink on light paper, like Omniglot's PNGs, so each image is:

1. decoded with Pillow (PNG or JPEG only; at most `MAX_PIXELS` pixels, against decompression
   bombs), transparent pixels composited onto white paper;
2. converted to grayscale and padded with paper to a centred square, so the resize keeps the
   character's aspect ratio (Omniglot's own images are square, so they are unchanged);
3. mapped to ink values and box-resized with `maml.images` (numpy only), exactly as training
   data was, then given the adapter's channel dimension.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from maml.errors import UsageError
from maml.images import preprocess_grayscale

MAX_PIXELS = 4096 * 4096
FORMATS = ("PNG", "JPEG")
ImageSource = bytes | bytearray | memoryview | str | PathLike


def is_image_list(value: Any) -> bool:
    """True when `value` is a non-empty list of image sources (bytes or file paths)."""
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(isinstance(v, bytes | bytearray | memoryview | str | PathLike) for v in value)
    )


def check_preprocessing(preprocessing: dict[str, Any] | None, input_shape: Sequence[int]) -> None:
    """Refuse images for an adapter without (or with unknown) image preprocessing."""
    if preprocessing is None:
        raise UsageError("this adapter takes arrays, not images (its adapter.json has no "
                         "preprocessing); send numbers")
    if preprocessing.get("color") != "grayscale" or preprocessing.get("resize") != "box":
        raise UsageError(f"unsupported image preprocessing {preprocessing}; this runtime knows "
                         "grayscale with a box resize")
    size = int(preprocessing.get("size", 0))
    if tuple(input_shape) != (1, size, size):
        raise UsageError(f"images make (1, {size}, {size}) inputs but the adapter takes "
                         f"{tuple(input_shape)}; send arrays")


def _read(source: ImageSource, index: int) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    path = Path(source)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"image {index} ({path}) cannot be read: {exc.strerror}") from None


def grayscale_pixels(data: bytes, index: int = 0) -> np.ndarray:
    """Decode PNG / JPEG bytes to a square uint8 grayscale array, paper = 255."""
    from PIL import Image  # Pillow only when images are sent

    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            if image.width * image.height > MAX_PIXELS or min(image.size) < 1:
                raise UsageError(f"image {index} is {image.width}x{image.height}; send images "
                                 f"of at most {MAX_PIXELS} pixels")
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(paper, rgba)
            gray = np.asarray(image.convert("L"), dtype=np.uint8)
    except UsageError:
        raise
    except Exception as exc:  # Pillow raises many types (SyntaxError, EOFError, ...) on bad data
        reason = (str(exc) or type(exc).__name__).split(" <_io.")[0]  # not the buffer's repr
        raise UsageError(f"image {index} is not a readable PNG or JPEG ({reason})") from None
    h, w = gray.shape
    side = max(h, w)
    square = np.full((side, side), 255, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = gray
    return square


def images_to_inputs(
    sources: Sequence[ImageSource], preprocessing: dict[str, Any] | None,
    input_shape: Sequence[int],
) -> np.ndarray:
    """Image files or bytes to float32 `(N, 1, size, size)` inputs, as `adapter.json` says."""
    check_preprocessing(preprocessing, input_shape)
    assert preprocessing is not None
    size = int(preprocessing["size"])
    ink, paper = float(preprocessing.get("ink", 1.0)), float(preprocessing.get("background", 0.0))
    out = np.empty((len(sources), 1, size, size), dtype=np.float32)
    for i, source in enumerate(sources):
        darkness = preprocess_grayscale(grayscale_pixels(_read(source, i), i), size,
                                        ink_is_dark=True)  # in [0, 1], 1 where the ink is
        out[i, 0] = paper + (ink - paper) * darkness
    return out
