"""Task distributions: parameter ranges, shapes, Omniglot sources, splits and rotations."""

import math
import shutil
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from maml.errors import UsageError
from maml.images import box_resize, box_resize_matrix
from maml.tasks.omniglot import (
    N_BACKGROUND,
    N_CHARACTERS,
    Omniglot,
    load_raw,
    make_split,
    read_image_folder,
    to_model_input,
)
from maml.tasks.regression import Harmonic, Sinusoid
from tests.omniglot_data import FOLDER_CHARACTERS, IMAGES_ZIP, NPZ, OMNIGLOT, synthetic_drawings


def test_sinusoid_tasks_follow_the_paper():
    batch = Sinusoid(k_shot=5, q_query=7).sample(400, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (400, 5, 1) and batch.query_y.shape == (400, 7, 1)
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    assert x.min() >= -5 and x.max() <= 5
    amplitude = y.abs().amax(dim=(1, 2))
    assert amplitude.max() <= 5.0 + 1e-6 and amplitude.max() > 4.0
    # y = A sin(x - phase): recover A and phase per task by least squares on sin/cos features
    feats = torch.cat([torch.sin(x), torch.cos(x)], -1)
    coef = torch.linalg.lstsq(feats, y).solution.squeeze(-1)  # A cos(phase), -A sin(phase)
    amp = coef.norm(dim=-1)
    phase = torch.atan2(-coef[:, 1], coef[:, 0])
    assert torch.allclose(torch.sin(feats.new_zeros(1) + x - phase.view(-1, 1, 1)) * amp.view(-1, 1, 1),
                          y, atol=1e-4)
    assert amp.min() >= 0.1 - 1e-4 and amp.max() <= 5 + 1e-4
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4


def test_harmonic_tasks_shape_and_determinism():
    source = Harmonic(k_shot=10, q_query=3)
    a = source.sample(8, torch.Generator().manual_seed(5))
    b = source.sample(8, torch.Generator().manual_seed(5))
    assert all(torch.equal(s, t) for s, t in zip(a.tensors(), b.tensors()))
    assert a.support_x.shape == (8, 10, 1) and a.query_x.shape == (8, 3, 1)
    # x = mu + N(0, 1) with mu in [-4, 4]: each task's inputs cluster around its own centre
    centres = torch.cat([a.support_x, a.query_x], 1).mean(dim=(1, 2))
    assert centres.abs().max() < 4 + 2.5
    assert a.support_y.abs().max() < 10


def test_box_resize_is_an_exact_area_average():
    r = box_resize_matrix(105, 28)
    assert np.allclose(r.sum(axis=1), 1.0)  # each output pixel is an average
    assert np.allclose(r.sum(axis=0), 28 / 105)  # each input pixel is spread in full
    img = np.zeros((105, 105), dtype=np.float32)
    img[:, :] = 1.0
    assert np.allclose(box_resize(img, 28), 1.0)
    two = np.arange(8 * 8, dtype=np.float32).reshape(8, 8)
    assert np.allclose(box_resize(two, 4), two.reshape(4, 2, 4, 2).mean(axis=(1, 3)))


@pytest.mark.needs_omniglot(*NPZ, IMAGES_ZIP)
def test_upstream_archive_matches_the_npz_copy(tmp_path):
    with zipfile.ZipFile(OMNIGLOT / IMAGES_ZIP) as z:
        z.extractall(tmp_path)
    chars = read_image_folder(tmp_path / "images_background_small1")
    assert len(chars) == 136
    npz = np.load(OMNIGLOT / "images_background.npz")["images"]
    ids = sorted(chars)
    raw_folder = np.stack([chars[c] for c in ids])
    raw_npz = npz[[c - 1 for c in ids]]
    assert np.array_equal(raw_folder, raw_npz)
    assert torch.equal(to_model_input(raw_folder), to_model_input(raw_npz))


@pytest.mark.needs_omniglot
def test_the_real_copy_loads_as_ink_on_a_mostly_empty_page():
    raw, source = load_raw(OMNIGLOT)
    assert source == "npz" and raw.shape == (N_CHARACTERS, 20, 105, 105)
    assert 0.03 < to_model_input(raw).mean() < 0.2


def test_folder_layout_reads_every_drawing_of_its_characters(synthetic_omniglot_folders,
                                                             synthetic_omniglot):
    for part, npz in (("background", "images_background.npz"),
                      ("evaluation", "images_evaluation.npz")):
        chars = read_image_folder(synthetic_omniglot_folders / f"images_{part}")
        ids = sorted(i for alphabet in FOLDER_CHARACTERS[part].values() for i in alphabet)
        assert sorted(chars) == ids
        raw = np.stack([chars[c] for c in ids])
        assert np.array_equal(raw, synthetic_drawings([i - 1 for i in ids]))
        offset = 0 if part == "background" else N_BACKGROUND
        rows = np.load(synthetic_omniglot / npz)["images"][[i - 1 - offset for i in ids]]
        assert np.array_equal(raw, rows)  # the two synthetic layouts hold the same drawings


def test_incomplete_folder_layouts_are_named_never_read_as_blank(synthetic_omniglot_folders,
                                                                 tmp_path):
    shutil.copytree(synthetic_omniglot_folders, tmp_path / "omniglot-py")
    present = sum(len(ids) for part in FOLDER_CHARACTERS.values() for ids in part.values())
    with pytest.raises(UsageError, match=f"lack {N_CHARACTERS - present} characters"):
        load_raw(tmp_path)  # torchvision's layout, under omniglot-py/
    background = tmp_path / "omniglot-py" / "images_background"
    # a missing drawing or a damaged file is named, never read as blank paper
    drawings = sorted(background.glob("*/character*/*.png"))
    drawings[1].unlink()
    with pytest.raises(UsageError, match=f"lacks drawings {drawings[1].name}"):
        read_image_folder(background)
    drawings[2].write_bytes(b"not a png")
    with pytest.raises(UsageError, match=f"{drawings[2].name} is not a readable image"):
        read_image_folder(background)
    Image.new("1", (28, 28)).save(drawings[2])
    with pytest.raises(UsageError, match=f"{drawings[2].name} is 28x28"):
        read_image_folder(background)


class _BrokenDownload:
    """What urlopen returns on a connection that drops: a few bytes, then an error."""

    def __init__(self, request, *args, **kwargs):
        self.url, self.length, self.sent = request.full_url, 4096, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, size=-1):
        if self.sent:
            raise ConnectionResetError("connection reset by peer")
        self.sent = True
        return b"PK\x03\x04 the start of a zip"


def _unreachable(*args, **kwargs):
    raise urllib.error.URLError("no network in the tests")


@pytest.mark.parametrize("urlopen", [_unreachable, _BrokenDownload], ids=["offline", "dropped"])
def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch, urlopen):
    """An empty data folder left by a failed `--download` passed for data later (a test that
    skipped without the data ran, and failed); torchvision may not reach the network here."""
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    root = tmp_path / "new" / "omniglot"
    with pytest.raises(UsageError, match=f"cannot download Omniglot into {root} "):
        load_raw(root, download=True)
    assert not (tmp_path / "new").exists()
    (root / "omniglot-py").mkdir(parents=True)  # already there: only what appeared goes
    (root / "omniglot-py" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="without internet, put the images_background/"):
        load_raw(root, download=True)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        "omniglot-py", "omniglot-py/notes.txt"]


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="no Omniglot data under"):
        load_raw(tmp_path / "nowhere")


def test_npz_arrays_of_the_wrong_shape_are_one_line_not_a_crash_mid_training(tmp_path):
    for name, chars in (("images_background", 30), ("images_evaluation", 20)):
        np.savez(tmp_path / f"{name}.npz", images=np.ones((chars, 20, 105, 105), dtype=bool))
    with pytest.raises(UsageError, match=r"have shapes \(30, 20, 105, 105\) \+ \(20, 20, 105, "
                                         r"105\), expected \(1623, 20, 105, 105\) together"):
        load_raw(tmp_path)


@pytest.mark.parametrize("split", ["maml", "background"])
def test_splits_are_disjoint_and_cover_everything(split):
    parts = make_split(split, seed=3, val_chars=50)
    sets = {k: set(v.tolist()) for k, v in parts.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert set().union(*sets.values()) == set(range(N_CHARACTERS))
    assert len(sets["val"]) == 50
    if split == "maml":
        assert len(sets["train"]) + len(sets["val"]) == 1200 and len(sets["test"]) == 423
        assert make_split(split, 3, 50)["test"].tolist() == parts["test"].tolist()
        assert make_split(split, 4, 50)["test"].tolist() != parts["test"].tolist()
    else:  # no evaluation-set alphabet is ever seen in training
        assert sets["test"] == set(range(N_BACKGROUND, N_CHARACTERS))


@pytest.fixture(scope="module")
def omniglot_images(synthetic_omniglot):
    raw, source = load_raw(synthetic_omniglot)
    assert source == "npz" and raw.shape == (N_CHARACTERS, 20, 105, 105)
    return to_model_input(raw)


class _Index:
    """Finds (character, drawing, quarter turns) of an image among `chars`, all rotations."""

    def __init__(self, images, chars):
        self.chars, self.images = chars, images[chars]  # (C, 20, 28, 28)
        self.probe = torch.rand(28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.keys = torch.stack(  # (4, C, 20) fingerprints of every rotated drawing
            [(torch.rot90(self.images, t, dims=(-2, -1)).double() * self.probe).sum((-2, -1))
             for t in range(4)]
        )

    def locate(self, image):
        key = (image.double() * self.probe).sum()
        for turns, c, d in (self.keys - key).abs().lt(1e-6).nonzero().tolist():
            if torch.equal(torch.rot90(self.images[c, d], turns, dims=(-2, -1)), image):
                return self.chars[c].item(), d, turns
        raise AssertionError("image not found in its split")


def test_omniglot_tasks_shapes_labels_and_rotation_classes(omniglot_images):
    assert omniglot_images.shape == (N_CHARACTERS, 20, 28, 28)
    assert omniglot_images.min() >= 0 and omniglot_images.max() <= 1
    assert 0.03 < omniglot_images.mean() < 0.2  # ink = 1 on a mostly empty page
    splits = make_split("maml", 0, 50)
    source = Omniglot(omniglot_images, splits, n_way=5, k_shot=2, q_query=3)
    gen = torch.Generator().manual_seed(0)
    batch = source.sample(6, gen, "train")
    assert batch.support_x.shape == (6, 10, 1, 28, 28) and batch.query_x.shape == (6, 15, 1, 28, 28)
    assert batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert batch.query_y[0].tolist() == [c for c in range(5) for _ in range(3)]
    turns_seen = set()
    train_index = _Index(omniglot_images, splits["train"])
    for t in range(len(batch)):
        classes = set()
        for label in range(5):
            imgs = torch.cat([batch.support_x[t, batch.support_y[t] == label],
                              batch.query_x[t, batch.query_y[t] == label]])[:, 0]
            found = [train_index.locate(img) for img in imgs]
            assert len({(c, r) for c, _, r in found}) == 1  # one class = one character, one rotation
            assert len({d for _, d, _ in found}) == 5  # K + Q different drawings
            classes.add(found[0][0::2])
            turns_seen.add(found[0][2])
        assert len(classes) == 5  # five distinct (character, rotation) classes
    assert turns_seen - {0}  # rotated classes do occur
    test = source.sample(3, gen, "test")
    test_index = _Index(omniglot_images, splits["test"])
    for img in test.query_x[:, :, 0].reshape(-1, 28, 28)[:10]:
        char, _, turns = test_index.locate(img)
        assert turns == 0 and char in set(splits["test"].tolist())


def test_omniglot_rejects_impossible_task_shapes(omniglot_images):
    splits = make_split("maml", 0, 50)
    with pytest.raises(UsageError, match="only 20 drawings"):
        Omniglot(omniglot_images, splits, n_way=5, k_shot=10, q_query=11)
    with pytest.raises(UsageError, match="exceeds the 50 classes of the val split"):
        Omniglot(omniglot_images, splits, n_way=60, k_shot=1, q_query=1)
