"""Image preprocessing for Omniglot-style inputs, in numpy only (no torch).

One definition serves training data, the exported adapter's `adapter.json`, the runtime in
`serve` (which must not import torch) and the browser page:

1. grayscale in [0, 1] with ink = 1 (Omniglot PNGs store ink as black / `False`);
2. a box-filter (exact area-average) resize to `size x size`: output pixel `i` averages the input
   interval `[i * n / size, (i + 1) * n / size)`, partial pixels weighted by their overlap.

The resize is a matrix product `R @ image @ R.T`, easy to reproduce in any language.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

PREPROCESSING = {
    "color": "grayscale",
    "ink": 1.0,
    "background": 0.0,
    "resize": "box",
    "size": 28,
    "description": "grayscale in [0,1] with ink = 1, then an area-average (box) resize to 28x28",
}


@lru_cache(maxsize=16)
def box_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`(n_out, n_in)` weights: row `i` averages the input span of output pixel `i`."""
    scale = n_in / n_out
    edges = np.arange(n_out + 1) * scale
    lo, hi = edges[:-1, None], edges[1:, None]
    pix = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0.0, None)
    return (overlap / scale).astype(np.float64)


def box_resize(images: np.ndarray, size: int) -> np.ndarray:
    """Area-average resize of `(..., H, W)` images to `(..., size, size)`, float32."""
    rows = box_resize_matrix(images.shape[-2], size).astype(np.float32)
    cols = box_resize_matrix(images.shape[-1], size).astype(np.float32)
    return rows @ (images.astype(np.float32) @ cols.T)


def ink_from_omniglot(pixels: np.ndarray) -> np.ndarray:
    """Omniglot's boolean / 0-255 pixels (white paper) to float ink in [0, 1]."""
    if pixels.dtype == np.bool_:
        return (~pixels).astype(np.float32)
    return 1.0 - pixels.astype(np.float32) / 255.0


def preprocess_grayscale(gray: np.ndarray, size: int = 28, ink_is_dark: bool = True) -> np.ndarray:
    """A grayscale image in [0, 255] (e.g. a photo or a PNG) to a `size x size` ink image."""
    ink = 1.0 - gray.astype(np.float32) / 255.0 if ink_is_dark else gray.astype(np.float32) / 255.0
    return ink_image(ink, size)


def ink_image(ink: np.ndarray, size: int = 28) -> np.ndarray:
    """Ink in [0, 1] at any resolution to the model's `size x size` input (clipped to [0, 1])."""
    return np.clip(box_resize(ink, size), 0.0, 1.0)
