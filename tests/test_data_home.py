"""Where Omniglot lives (`maml.data`): a default that does not depend on the current folder
(MAML_DATA, else the user cache), the old `../shared/data/omniglot` named but never used
silently, and `python -m maml data`, which builds the npz arrays from the upstream folders and
prints where they are with their sha256. Nothing here downloads."""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from maml.__main__ import main
from maml.data import arrays_from_folder, data_home, default_root
from tests.omniglot_data import IMAGES_ZIP, NPZ, OMNIGLOT, synthetic_drawings

N_BACKGROUND = 964


@pytest.fixture
def no_data_env(monkeypatch, tmp_path):
    """No MAML_DATA, and a home and cache of this test's own (never the user's)."""
    monkeypatch.delenv("MAML_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def bad(capsys, *args: str) -> str:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_the_default_is_maml_data_then_the_user_cache(no_data_env, monkeypatch, tmp_path):
    home = no_data_env
    assert default_root() == home / ".cache" / "maml-toolkit" / "omniglot"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "maml-toolkit" / "omniglot"
    monkeypatch.setenv("MAML_DATA", str(tmp_path / "mine"))
    assert default_root() == tmp_path / "mine" / "omniglot"
    monkeypatch.chdir(tmp_path)  # a relative MAML_DATA is made absolute once, where it is read
    monkeypatch.setenv("MAML_DATA", "rel")
    assert data_home() == tmp_path / "rel" and default_root().is_absolute()


def test_train_without_data_root_reads_maml_data_from_any_folder(
        no_data_env, monkeypatch, tmp_path, synthetic_omniglot, capsys):
    """The default is the same wherever the command runs, and the checkpoint keeps it absolute."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "omniglot").symlink_to(synthetic_omniglot)
    monkeypatch.setenv("MAML_DATA", str(tmp_path / "data"))
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    ckpt = tmp_path / "o.pt"
    assert main(["train", "--dataset", "omniglot", "--meta-batch-size", "2", "--model-kwargs",
                 '{"hidden": 8}', "--checkpoint", str(ckpt), "--iterations", "1",
                 "--val-tasks", "2", "--quiet"]) == 0, capsys.readouterr().err
    saved = torch.load(ckpt, weights_only=True)["config"]["data_root"]
    assert saved == str(tmp_path / "data" / "omniglot")


def test_missing_default_data_names_the_default_and_the_old_copy(no_data_env, monkeypatch,
                                                                   tmp_path, capsys):
    """A copy at the old default `../shared/data/omniglot` is named with the two ways to use
    it; it is not read behind the user's back."""
    work = tmp_path / "checkout"
    work.mkdir()
    old = tmp_path / "shared" / "data" / "omniglot"
    old.mkdir(parents=True)
    for name in NPZ:
        (old / name).write_bytes(b"")  # only named, never read
    monkeypatch.chdir(work)
    line = bad(capsys, "train", "--dataset", "omniglot", "--iterations", "1", "--checkpoint",
               str(tmp_path / "o.pt"), "--quiet")
    assert line.startswith(f"error: no Omniglot data under {default_root()} (the default; set "
                           "$MAML_DATA or --data-root for another folder): expected"), line
    assert line.endswith("a copy is at ../shared/data/omniglot: pass --data-root "
                         "../shared/data/omniglot or export MAML_DATA=../shared/data"), line
    monkeypatch.setenv("MAML_DATA", "../shared/data")  # the fix it names works
    assert "no Omniglot data" not in bad(capsys, "train", "--dataset", "omniglot",
                                         "--iterations", "1", "--checkpoint",
                                         str(tmp_path / "o.pt"), "--quiet")
    assert not (tmp_path / "home").exists()  # nothing was created in the cache


def write_full_layout(root: Path, zipped: bool = False) -> np.ndarray:
    """All 1623 characters in the upstream folder layout (30 alphabets of about 32 characters
    in the background set, 20 in the evaluation set), each drawing a hard link to one of 20
    files drawn once; returns the `(1623, 20, 105, 105)` drawings the arrays must hold. With
    `zipped` the evaluation set is its upstream zip archive instead of a folder."""
    from PIL import Image

    drawings = synthetic_drawings([0, 1])
    templates = root / "templates"
    templates.mkdir(parents=True)
    for c in range(2):
        for d in range(20):
            Image.fromarray(drawings[c, d]).save(templates / f"{c}_{d}.png")
    expected = np.empty((1623, 20, 105, 105), dtype=bool)
    for part, ids, alphabets in (("background", range(1, 965), 30),
                                 ("evaluation", range(965, 1624), 20)):
        per = -(-len(ids) // alphabets)
        for i, char in enumerate(ids):
            c = char % 2  # two kinds of character, told apart in the arrays
            folder = root / f"images_{part}" / f"Alphabet_{i // per:02d}" / f"character{i % per + 1:02d}"
            folder.mkdir(parents=True)
            for d in range(20):
                os.link(templates / f"{c}_{d}.png", folder / f"{char:04d}_{d + 1:02d}.png")
            expected[char - 1] = drawings[c]
    shutil.rmtree(templates)
    if zipped:
        with zipfile.ZipFile(root / "images_evaluation.zip", "w") as z:
            for png in sorted((root / "images_evaluation").rglob("*.png")):
                z.write(png, png.relative_to(root))
        shutil.rmtree(root / "images_evaluation")
    return expected


@pytest.mark.slow
def test_data_builds_the_arrays_from_the_upstream_layout(tmp_path, capsys):
    """`maml data` on the upstream folders (one set as its zip archive) writes the npz arrays the
    offline copy has, prints the folder and each file's sha256, and a second call finds them."""
    root = tmp_path / "omniglot"
    expected = write_full_layout(root, zipped=True)
    assert main(["data", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Omniglot in {root} (1623 characters; built from the upstream folders)"
    for line, name in zip(out[1:], NPZ):
        digest, path = line.split("  ")
        assert path == str(root / name)
        assert digest == hashlib.sha256((root / name).read_bytes()).hexdigest()
    background, evaluation = (np.load(root / name) for name in NPZ)
    assert background["images"].dtype == bool and background["images"].shape == (964, 20, 105, 105)
    assert np.array_equal(np.concatenate([background["images"], evaluation["images"]]), expected)
    assert np.array_equal(evaluation["labels"][:, 0], np.arange(659))
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no leftovers
    assert main(["data", "--data-root", str(root)]) == 0
    again = capsys.readouterr().out.splitlines()
    assert again[0].endswith("(1623 characters; arrays found)") and again[1:] == out[1:]


def test_data_without_data_or_with_an_incomplete_set_is_one_line(tmp_path, capsys,
                                                                   synthetic_omniglot_folders):
    empty = tmp_path / "empty"
    line = bad(capsys, "data", "--data-root", str(empty))
    assert line.startswith(f"error: no Omniglot under {empty}: neither images_background.npz")
    assert "add --download" in line and not empty.exists()
    line = bad(capsys, "data", "--data-root", str(synthetic_omniglot_folders))
    assert "images_background lacks 959 of its 964 characters (first file id 0006)" in line
    assert not any(synthetic_omniglot_folders.glob("*.npz"))


def test_data_download_offline_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in the tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "data" / "omniglot"
    line = bad(capsys, "data", "--download", "--data-root", str(root))
    assert line.startswith(f"error: cannot download Omniglot into {root} (")
    assert not (tmp_path / "data").exists()


@pytest.mark.needs_omniglot(*NPZ, "SHA256SUMS")
def test_data_prints_the_published_checksums_of_the_real_copy(tmp_path, capsys):
    root = tmp_path / "omniglot"
    root.mkdir()
    for name in NPZ:
        shutil.copy(OMNIGLOT / name, root / name)
    assert main(["data", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Omniglot in {root} (1623 characters; arrays found)"
    published = dict(line.split()[::-1] for line in (OMNIGLOT / "SHA256SUMS").read_text().splitlines())
    assert {Path(p).name: d for d, p in (line.split("  ") for line in out[1:])} == \
        {name: published[name] for name in NPZ}


@pytest.mark.needs_omniglot(NPZ[0], IMAGES_ZIP)
def test_arrays_from_the_real_upstream_folders_match_the_offline_copy(tmp_path):
    """The builder on real PNG files: Balinese (file ids 108-131) from the upstream archive gives
    the npz rows 107-130, drawing for drawing."""
    with zipfile.ZipFile(OMNIGLOT / IMAGES_ZIP) as z:
        z.extractall(tmp_path)
    folder = tmp_path / "images_background_small1"
    for alphabet in folder.iterdir():
        if alphabet.name != "Balinese":
            shutil.rmtree(alphabet)
    images, labels = arrays_from_folder(folder, 108, 24)
    with np.load(OMNIGLOT / NPZ[0]) as npz:
        assert np.array_equal(images, npz["images"][107:131])
    assert labels.shape == (24, 20) and labels[5, 0] == 5


def test_reproduce_takes_maml_data_then_the_copy_beside_the_checkout(no_data_env, monkeypatch,
                                                                      tmp_path):
    """scripts/reproduce.py, which this project's machines run beside their copy of the data,
    says which copy it takes, in this order."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("reproduce", root / "scripts" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    assert reproduce.CHECKOUT_DATA == root.parent / "shared" / "data" / "omniglot"
    beside = tmp_path / "shared" / "data" / "omniglot"
    monkeypatch.setattr(reproduce, "CHECKOUT_DATA", beside)
    assert reproduce.data_root() == default_root()  # nothing beside: the user cache
    beside.mkdir(parents=True)
    assert reproduce.data_root() == beside
    assert reproduce.parser().parse_args([]).data_root == str(beside)
    monkeypatch.setenv("MAML_DATA", str(tmp_path / "mine"))
    assert reproduce.data_root() == tmp_path / "mine" / "omniglot"
