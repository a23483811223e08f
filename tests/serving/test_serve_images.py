"""Image inputs of the runtime: PNG / JPEG files or bytes become exactly the training inputs."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from maml.errors import UsageError
from maml.images import PREPROCESSING, box_resize, ink_from_omniglot
from serve import image_input
from serve.image_input import images_to_inputs
from tests.omniglot_data import IMAGES_ZIP, OMNIGLOT, synthetic_drawings

SHAPE = (1, 28, 28)


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def omniglot_pngs(n: int) -> list[bytes]:
    """The first `n` upstream PNGs (a test that calls this needs `IMAGES_ZIP`)."""
    with zipfile.ZipFile(OMNIGLOT / IMAGES_ZIP) as z:
        names = sorted(name for name in z.namelist() if name.endswith(".png"))[:n]
        return [z.read(name) for name in names]


@pytest.mark.needs_omniglot(IMAGES_ZIP)
def test_omniglot_pngs_match_the_training_preprocessing():
    """An upstream Omniglot PNG gives the same 28x28 input the training data holds."""
    raw = omniglot_pngs(3)
    got = images_to_inputs(raw, PREPROCESSING, SHAPE)
    for i, data in enumerate(raw):
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("1"), dtype=bool)
        expected = box_resize(ink_from_omniglot(pixels), 28)
        np.testing.assert_allclose(got[i, 0], expected, atol=1e-6)
    assert got.shape == (3, 1, 28, 28) and got.dtype == np.float32
    assert 0 < got.mean() < 0.5  # mostly paper, some ink


def test_files_bytes_rgba_jpeg_and_padding(tmp_path):
    gray = np.full((56, 56), 255, np.uint8)
    gray[10:40, 20:30] = 0  # a dark stroke on white paper
    expected = box_resize(1.0 - gray / 255.0, 28)
    path = tmp_path / "stroke.png"
    Image.fromarray(gray).save(path)
    rgba = np.zeros((56, 56, 4), np.uint8)  # transparent canvas, opaque black ink
    rgba[10:40, 20:30, 3] = 255
    wide = np.full((56, 112), 255, np.uint8)  # non-square: padded to a centred square
    wide[:, 28:84] = gray
    got = images_to_inputs(
        [path, str(path), png(Image.fromarray(gray)), png(Image.fromarray(rgba, "RGBA")),
         png(Image.fromarray(wide))],
        PREPROCESSING, SHAPE,
    )
    for i in range(4):
        np.testing.assert_allclose(got[i, 0], expected, atol=1e-6)
    padded = np.pad(1.0 - wide / 255.0, ((28, 28), (0, 0)))  # 28 paper rows above and below
    np.testing.assert_allclose(got[4, 0], box_resize(padded, 28), atol=1e-6)
    jpeg = images_to_inputs([png(Image.fromarray(gray), "JPEG")], PREPROCESSING, SHAPE)
    np.testing.assert_allclose(jpeg[0, 0], expected, atol=0.05)  # lossy, but the same drawing


def test_bad_images_are_refused_clearly(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="image 1 is not a readable PNG or JPEG"):
        images_to_inputs([png(Image.new("L", (8, 8))), b"not an image"], PREPROCESSING, SHAPE)
    broken = png(Image.new("L", (64, 64), 128))
    with pytest.raises(UsageError, match="image 0 is not a readable PNG or JPEG"):
        images_to_inputs([broken[:60]], PREPROCESSING, SHAPE)  # truncated
    with pytest.raises(UsageError, match="image 0 is not a readable PNG or JPEG"):
        images_to_inputs([broken[:8] + b"\0" * 50], PREPROCESSING, SHAPE)  # a bad chunk
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, format="GIF")
    with pytest.raises(UsageError, match="not a readable PNG or JPEG"):
        images_to_inputs([gif.getvalue()], PREPROCESSING, SHAPE)
    with pytest.raises(UsageError, match="cannot be read"):
        images_to_inputs([tmp_path / "missing.png"], PREPROCESSING, SHAPE)
    monkeypatch.setattr(image_input, "MAX_PIXELS", 100)
    with pytest.raises(UsageError, match="image 0 is 20x20; send images of at most 100 pixels"):
        images_to_inputs([png(Image.new("L", (20, 20)))], PREPROCESSING, SHAPE)
    with pytest.raises(UsageError, match="takes arrays, not images"):
        images_to_inputs([b""], None, (1,))
    with pytest.raises(UsageError, match=r"adapter takes \(3, 28, 28\)"):
        images_to_inputs([b""], PREPROCESSING, (3, 28, 28))


def test_light_ink_on_dark_paper_is_refused():
    """A dark-mode canvas or a negative would read as a page full of ink and get a confident,
    wrong answer (an audit measured 7% accuracy, below chance, for inverted queries)."""
    from PIL import ImageOps

    raw = [png(Image.fromarray(d)) for d in synthetic_drawings([0])[0, :2]]  # Omniglot-like
    inverted = png(ImageOps.invert(Image.open(io.BytesIO(raw[1])).convert("L")))
    with pytest.raises(UsageError, match=r"image 1 has a dark edge \(mean 0 of 255\): the "
                                         "adapter expects dark ink on light paper"):
        images_to_inputs([raw[0], inverted], PREPROCESSING, SHAPE)


def stroke() -> np.ndarray:
    """A grey L-shaped stroke on white paper, asymmetric so rotations show."""
    gray = np.full((56, 56), 255, np.uint8)
    gray[8:44, 10:18] = 40
    gray[36:44, 10:40] = 90
    return gray


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    """A 16-bit PNG gives the same input as its 8-bit version (Pillow's "L" would clip it)."""
    gray = stroke()
    wide = Image.fromarray(gray.astype(np.uint16) * 257)  # mode I;16, 65535 = white
    assert wide.mode == "I;16"
    got = images_to_inputs([png(wide), png(Image.fromarray(gray))], PREPROCESSING, SHAPE)
    assert got[1, 0].max() > 0.5  # the 8-bit version has ink
    np.testing.assert_allclose(got[0, 0], got[1, 0], atol=1 / 255)


@pytest.mark.parametrize("fmt, atol", [("PNG", 1e-6), ("JPEG", 0.05)])
def test_exif_orientation_is_applied(fmt, atol):
    """A phone photo stored sideways with EXIF Orientation 6 is read upright."""
    upright = Image.fromarray(stroke())
    expected = images_to_inputs([png(upright)], PREPROCESSING, SHAPE)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, format=fmt, exif=exif)
    got = images_to_inputs([buf.getvalue()], PREPROCESSING, SHAPE)
    np.testing.assert_allclose(got, expected, atol=atol)


def test_total_pixels_per_set_are_bounded_before_decoding(monkeypatch):
    """Many large images in one call are refused from their headers, before any decoding."""
    assert 1000 * 105 * 105 < image_input.MAX_TOTAL_PIXELS  # a full set of Omniglot PNGs fits
    monkeypatch.setattr(image_input, "MAX_TOTAL_PIXELS", 1000)
    images = [png(Image.new("L", (20, 20), 255))] * 3  # 1200 pixels in all
    assert images_to_inputs(images[:2], PREPROCESSING, SHAPE).shape == (2, 1, 28, 28)

    def no_decoding(data: bytes, index: int = 0) -> np.ndarray:
        raise AssertionError("decoded before the pixel budget was checked")

    monkeypatch.setattr(image_input, "grayscale_pixels", no_decoding)
    with pytest.raises(UsageError, match="the 3 images have 1200 pixels in all, over the limit "
                                         "of 1000; send fewer or smaller images"):
        images_to_inputs(images, PREPROCESSING, SHAPE)


def test_wide_and_tall_images_cost_their_own_pixels_not_a_square():
    """A 1 x W strip used to be padded to a W x W square before the resize (a 77-byte 1 x 12000
    PNG took 1.25 GB); its cost is now its own pixels, and the answer is still the padded one."""
    import tracemalloc

    strip = np.full((1, 3000), 255, np.uint8)
    strip[0, 1000:1500] = 0
    data = [png(Image.fromarray(strip)), png(Image.fromarray(strip.T.copy()))]
    tracemalloc.start()
    try:
        got = images_to_inputs(data, PREPROCESSING, SHAPE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, f"a 1 x 3000 image took {peak / 1e6:.0f} MB"  # padded to a square: 83 MB
    padded = np.zeros((3000, 3000), np.float32)
    padded[1499] = 1.0 - strip[0] / 255.0  # the centred row of a paper square
    np.testing.assert_allclose(got[0, 0], box_resize(padded, 28), atol=1e-6)
    np.testing.assert_allclose(got[1, 0], box_resize(padded.T, 28), atol=1e-6)


def test_ordinary_shapes_are_still_padded_bit_for_bit():
    """Up to `PAD_FACTOR` times its own pixels the image is padded as before (exactly)."""
    from maml.images import preprocess_grayscale

    wide = np.full((30, 100), 255, np.uint8)  # 100^2 <= 4 * 3000: padded
    wide[5:25, 40:60] = 0
    square = np.full((100, 100), 255, np.uint8)
    square[35:65] = wide
    got = images_to_inputs([png(Image.fromarray(wide))], PREPROCESSING, SHAPE)
    assert np.array_equal(got[0, 0], preprocess_grayscale(square, 28))


def test_a_side_over_the_limit_is_refused_from_the_header():
    """A 1 x 16777216 PNG (16 KB) ended in a MemoryError (a 500 over HTTP)."""
    data = png(Image.new("L", (16_777_216, 1), 255))
    assert len(data) < 100_000
    with pytest.raises(UsageError, match=r"image 0 is 16777216x1; send images of at most 16384 "
                                         "pixels on a side"):
        images_to_inputs([data], PREPROCESSING, SHAPE)
