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


# ---------------------------------------------------------------------------------------------
# Images of any size and colour (`--dataset folder`): the preprocessing `adapter.json` records.
#
# 1. decode (Pillow): upright by EXIF orientation, transparent pixels composited onto white,
#    16-bit grayscale scaled to 8 bits, as 8-bit RGB `(H, W, 3)` (`decode_rgb`);
# 2. colour: `channels` 3 keeps R, G, B / 255; `channels` 1 takes the luma
#    (299 R + 587 G + 114 B) / (1000 * 255) (ITU-R 601, as Pillow's "L" before its rounding);
# 3. `invert`: v -> 1 - v (dark ink on light paper becomes ink = 1, as Omniglot's loader does);
# 4. box (area-average) resize of each axis to `size` (`box_resize_matrix`; an image that is not
#    square is stretched, not cropped), clipped to [0, 1];
# 5. per-channel normalisation (v - mean[c]) / std[c] (mean 0, std 1 unless `--normalize`).
# ---------------------------------------------------------------------------------------------

SCHEME = "maml-toolkit/pixels-v1"
LUMA = (299.0, 587.0, 114.0)


def pixel_preprocessing(size: int, channels: int, invert: bool = False,
                        mean: list[float] | None = None,
                        std: list[float] | None = None) -> dict:
    """The `preprocessing` entry of an adapter trained on a folder of images."""
    mean = [0.0] * channels if mean is None else [float(m) for m in mean]
    std = [1.0] * channels if std is None else [float(s) for s in std]
    colour = "rgb" if channels == 3 else "gray"
    return {
        "scheme": SCHEME, "color": colour, "channels": channels, "size": size, "resize": "box",
        "invert": bool(invert), "mean": mean, "std": std,
        "description": (
            "decode to 8-bit RGB (EXIF-upright, transparency on white); "
            + ("R,G,B / 255" if channels == 3 else "luma (299R+587G+114B)/(1000*255)")
            + ("; v -> 1 - v" if invert else "")
            + f"; area-average (box) resize of each axis to {size}, clip to [0,1]; "
            "(v - mean[c]) / std[c]"
        ),
    }


def decode_rgb(source, formats: tuple[str, ...] | None = None) -> np.ndarray:
    """An image file (path or bytes) as uint8 `(H, W, 3)` RGB (step 1 above). Pillow errors
    propagate: callers name the file."""
    import io

    from PIL import Image, ImageOps  # only image users pay the import

    opened = Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source,
                        formats=formats)
    with opened as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            wide = np.asarray(image, dtype=np.int64)
            image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def preprocess_pixels(rgb: np.ndarray, prep: dict) -> np.ndarray:
    """uint8 `(H, W, 3)` to the model's float32 `(channels, size, size)` input (steps 2-5)."""
    size, channels = int(prep["size"]), int(prep["channels"])
    if channels == 3:
        values = np.moveaxis(rgb, -1, 0).astype(np.float32) / np.float32(255.0)
    else:
        r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
        values = ((LUMA[0] * r + LUMA[1] * g + LUMA[2] * b) / np.float32(255000.0))[None]
    if prep.get("invert"):
        values = np.float32(1.0) - values
    rows = box_resize_matrix(values.shape[-2], size).astype(np.float32)
    cols = box_resize_matrix(values.shape[-1], size).astype(np.float32)
    out = np.clip(rows @ (values @ cols.T), 0.0, 1.0)
    mean = np.asarray(prep["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(prep["std"], dtype=np.float32).reshape(-1, 1, 1)
    return ((out - mean) / std).astype(np.float32)
