"""Turning PNG / JPEG images (files or bytes) into an image adapter's input arrays.

An image adapter records its preprocessing in `adapter.json` (`maml.images.PREPROCESSING`:
grayscale in [0, 1] with ink = 1, an area-average resize to 28x28). A user's picture of a drawn
character is dark ink on light paper, like Omniglot's PNGs, so each image is:

1. decoded with Pillow (PNG or JPEG only; at most `MAX_PIXELS` pixels each and
   `MAX_TOTAL_PIXELS` per call, support and query together, both read from the headers before
   anything is decoded, against decompression bombs), turned upright by its EXIF orientation
   (phone photos), 16-bit grayscale scaled to 8 bits, transparent pixels composited onto white
   paper;
2. converted to grayscale and padded with paper to a centred square, so the resize keeps the
   character's aspect ratio (Omniglot's own images are square, so they are unchanged);
3. mapped to ink values and box-resized with `maml.images` (numpy only), exactly as training
   data was, then given the adapter's channel dimension.

The square is only materialised when it is small (at most `PAD_FACTOR` times the image and
`MAX_PIXELS`): then steps 2-3 are `maml.images` bit for bit. A very wide or tall image (a 1 x 12000
strip) would otherwise cost side^2 pixels (1.25 GB for 77 bytes of PNG), so it is resized without
the square: paper is ink 0 and contributes nothing, so only the columns of the resize matrices
that meet the image are used (equal to the padded result up to float rounding, 1e-7), in time and
memory proportional to the image's own pixels. A side over `MAX_SIDE` is refused from the header.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from maml.errors import UsageError
from maml.images import SCHEME, decode_rgb, preprocess_grayscale, preprocess_pixels

MAX_PIXELS = 4096 * 4096
MAX_SIDE = 16384  # longest side: the resize weights are (28, side) float64
PAD_FACTOR = 4  # pad to a real square only while it has at most 4x the image's pixels
# per call (an adapt-and-predict counts its support and query images together): 2000 Omniglot
# images (105x105, 22M pixels) or five 12-megapixel photos fit; decoding this many pixels takes
# about a second of CPU
MAX_TOTAL_PIXELS = 4 * MAX_PIXELS
WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale PNGs
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
    if preprocessing.get("scheme") == SCHEME:  # a folder of images: any size and colour
        size, channels = int(preprocessing.get("size", 0)), int(preprocessing.get("channels", 0))
        if tuple(input_shape) != (channels, size, size):
            raise UsageError(f"images make ({channels}, {size}, {size}) inputs but the adapter "
                             f"takes {tuple(input_shape)}; send arrays")
        return
    if preprocessing.get("color") != "grayscale" or preprocessing.get("resize") != "box":
        raise UsageError(f"unsupported image preprocessing {preprocessing}; this runtime knows "
                         "grayscale with a box resize")
    size = int(preprocessing.get("size", 0))
    if tuple(input_shape) != (1, size, size):
        raise UsageError(f"images make (1, {size}, {size}) inputs but the adapter takes "
                         f"{tuple(input_shape)}; send arrays")


def labels(name: str, count: int) -> list[str]:
    """How errors name the images of one set: "query_x image 2" (or "image 2" without a name)."""
    return [f"{name} image {i}" if name else f"image {i}" for i in range(count)]


def read_images(sources: Sequence[ImageSource], name: str = "") -> list[bytes]:
    """The bytes of each image (bytes pass through; paths are read), nothing decoded."""
    return [_read(source, label) for source, label in zip(sources, labels(name, len(sources)))]


def _read(source: ImageSource, label: str) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    path = Path(source)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{label} ({path}) cannot be read: {exc.strerror}") from None


def _unreadable(exc: Exception, label: str) -> UsageError:
    reason = (str(exc) or type(exc).__name__).split(" <_io.")[0]  # not the buffer's repr
    return UsageError(f"{label} is not a readable PNG or JPEG ({reason})")


def image_size(data: bytes, label: str = "image 0") -> tuple[int, int]:
    """`(width, height)` from the image's header (nothing is decoded), within `MAX_PIXELS`."""
    from PIL import Image  # Pillow only when images are sent

    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
    except Exception as exc:  # Pillow raises many types (SyntaxError, EOFError, ...) on bad data
        raise _unreadable(exc, label) from None
    if width * height > MAX_PIXELS or min(width, height) < 1:
        raise UsageError(f"{label} is {width}x{height}; send images of at most "
                         f"{MAX_PIXELS} pixels")
    if max(width, height) > MAX_SIDE:
        raise UsageError(f"{label} is {width}x{height}; send images of at most {MAX_SIDE} "
                         "pixels on a side (crop the paper around the drawing)")
    return width, height


def check_pixel_budget(images: Sequence[bytes], names: Sequence[str] | None = None) -> None:
    """Refuse the images of one call whose headers add up to more than `MAX_TOTAL_PIXELS`
    (`names`: how errors name each image, default "image i")."""
    total = 0
    for data, label in zip(images, names or labels("", len(images)), strict=True):
        width, height = image_size(data, label)
        total += width * height
    if total > MAX_TOTAL_PIXELS:
        raise UsageError(f"the {len(images)} images have {total} pixels in all, over the limit "
                         f"of {MAX_TOTAL_PIXELS}; send fewer or smaller images")


def _eight_bit_gray(image: Any) -> Any:
    """A 16-bit (or 32-bit integer) grayscale image as 8-bit "L", scaled, not clipped."""
    from PIL import Image

    wide = np.asarray(image, dtype=np.int64)
    gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        gray[wide == transparent] = 255  # the transparent value shows the paper
    return Image.fromarray(gray, "L")


def grayscale_pixels(data: bytes, label: str = "image 0") -> np.ndarray:
    """Decode PNG / JPEG bytes to a uint8 grayscale `(height, width)` array, paper = 255
    (`padded_ink` pads it to a square and resizes it).

    An image whose edge is dark on average is refused: it is light ink on dark paper (a
    dark-mode canvas, a negative), which the adapter would read as a page full of ink and
    answer with a confident, wrong prediction."""
    from PIL import Image, ImageOps  # Pillow only when images are sent

    image_size(data, label)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            image.load()
            image = ImageOps.exif_transpose(image)  # upright, as the camera's EXIF says
            if image.mode in WIDE_GRAY_MODES:
                image = _eight_bit_gray(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(paper, rgba)
            gray = np.asarray(image.convert("L"), dtype=np.uint8)
    except Exception as exc:  # Pillow raises many types (SyntaxError, EOFError, ...) on bad data
        raise _unreadable(exc, label) from None
    edge = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if edge.mean() < 128:
        raise UsageError(f"{label} has a dark edge (mean {edge.mean():.0f} of 255): the adapter "
                         "expects dark ink on light paper; invert light-on-dark images before "
                         "sending them")
    return gray


def _box_weights(side: int, size: int, start: int, count: int) -> np.ndarray:
    """Columns `start:start + count` of `maml.images.box_resize_matrix(side, size)`, as float32,
    computed alone (the same formula, so the same values) rather than sliced from the whole."""
    scale = side / size
    edges = np.arange(size + 1) * scale
    lo, hi = edges[:-1, None], edges[1:, None]
    pix = np.arange(start, start + count)[None, :]
    overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0.0, None)
    return (overlap / scale).astype(np.float64).astype(np.float32)


def padded_ink(gray: np.ndarray, size: int) -> np.ndarray:
    """A uint8 grayscale image (paper = 255), padded with paper to a centred square and
    box-resized to `size x size` ink in [0, 1], as `maml.images.preprocess_grayscale` does to the
    square; without building the square when it would be large (see the module docstring)."""
    h, w = gray.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    if side * side <= min(PAD_FACTOR * h * w, MAX_PIXELS):  # every ordinary image: bit for bit
        square = np.full((side, side), 255, dtype=np.uint8)
        square[top : top + h, left : left + w] = gray
        return preprocess_grayscale(square, size, ink_is_dark=True)
    rows, cols = _box_weights(side, size, top, h), _box_weights(side, size, left, w)
    ink = 1.0 - gray.astype(np.float32) / 255.0
    return np.clip(rows @ (ink @ cols.T), 0.0, 1.0)


def images_to_inputs(
    sources: Sequence[ImageSource], preprocessing: dict[str, Any] | None,
    input_shape: Sequence[int], name: str = "",
) -> np.ndarray:
    """Image files or bytes to float32 `(N, 1, size, size)` inputs, as `adapter.json` says
    (`name`, such as "query_x", names the set in errors)."""
    check_preprocessing(preprocessing, input_shape)
    assert preprocessing is not None
    if preprocessing.get("scheme") == SCHEME:
        return pixel_inputs(sources, preprocessing, name)
    size = int(preprocessing["size"])
    ink, paper = float(preprocessing.get("ink", 1.0)), float(preprocessing.get("background", 0.0))
    images = read_images(sources, name)
    names = labels(name, len(images))
    check_pixel_budget(images, names)  # from the headers, before any image is decoded
    out = np.empty((len(images), 1, size, size), dtype=np.float32)
    for i, data in enumerate(images):
        darkness = padded_ink(grayscale_pixels(data, names[i]), size)  # 1 where the ink is
        out[i, 0] = paper + (ink - paper) * darkness
    return out


def pixel_inputs(sources: Sequence[ImageSource], preprocessing: dict[str, Any],
                 name: str = "") -> np.ndarray:
    """Images to float32 `(N, channels, size, size)` inputs with `maml.images`' pixel
    preprocessing: the very functions training decoded its folder with (no padding to a square,
    no ink check: photos of any colour are fine)."""
    images = read_images(sources, name)
    names = labels(name, len(images))
    check_pixel_budget(images, names)  # from the headers, before any image is decoded
    size, channels = int(preprocessing["size"]), int(preprocessing["channels"])
    out = np.empty((len(images), channels, size, size), dtype=np.float32)
    for i, data in enumerate(images):
        try:
            rgb = decode_rgb(data, FORMATS)
        except Exception as exc:  # Pillow raises many types on bad data
            raise _unreadable(exc, names[i]) from None
        out[i] = preprocess_pixels(rgb, preprocessing)
    return out
