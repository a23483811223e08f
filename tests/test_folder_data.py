"""Your own data: a folder of class images (`--dataset folder`) and `package.module:factory`
task sources, trained, exported and served end to end on real data, offline:
- scikit-learn's bundled UCI digits (1797 8x8 images), written as PNGs into class folders;
- Omniglot's upstream folder layout (`images_background_small1.zip`), against the npz loader;
- the sinusoid as a task source defined only in this file (`make_sine`).
"""

from __future__ import annotations

import base64
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maml.config import Config
from maml.errors import UsageError
from maml.tasks import TaskBatch


@pytest.fixture(autouse=True)
def _one_thread_and_own_cache(monkeypatch, tmp_path_factory):
    """One torch thread (the CI machine's cores are shared: two threads are slower) and a
    per-session cache folder, never the user's."""
    monkeypatch.setenv("MAML_DATA", str(tmp_path_factory.getbasetemp() / "maml-data"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's digits as `digits/digit<k>/<i>.png` (8x8 grayscale, 0-16 scaled to 0-255)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    root = tmp_path_factory.mktemp("digits")
    for i, (image, target) in enumerate(zip(data.images, data.target)):
        folder = root / f"digit{target}"
        folder.mkdir(exist_ok=True)
        pixels = np.round(image * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"{i:04d}.png")
    return root


def _digits_config(root: Path, run: Path, **changes) -> Config:
    settings = dict(dataset="folder", data_root=str(root), image_size=8, split="0.5,0,0.5",
                    n_way=5, k_shot=5, q_query=5, iterations=100, val_every=50, val_tasks=20,
                    log_every=50, checkpoint_every=100, model_kwargs={"hidden": 32},
                    checkpoint=str(run / "digits.pt"))
    settings.update(changes)
    return Config(**settings)


def _task_files(source, split: str, per_class: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Rows of the cached image array (= files in sorted order) for one N-way task of `split`."""
    rng = np.random.default_rng(seed)
    classes = rng.choice(source.splits[split].numpy(), source.n_way, replace=False)
    rows = []
    for c in classes:
        start, count = int(source.offsets[c]), int(source.counts[c])
        rows.append([start + int(i) for i in rng.choice(count, per_class, replace=False)])
    return rows, [int(c) for c in classes]


def test_digits_train_export_and_serve_pngs(digits, tmp_path):
    """5-way 5-shot on digits the run never trained on: well above chance (20%) after a short
    CPU run; the exported adapter, sent the PNG files over HTTP, answers as the training-time
    loop does on the cached tensors."""
    import maml
    from export.build import export_checkpoint
    from maml.checkpoint import load
    from maml.experiment import restore
    from maml.higher_engine import adapt_predict
    from serve.adapter import load as load_adapter

    result = maml.train(_digits_config(digits, tmp_path), progress=False)
    assert result is not None
    scores = maml.evaluate(str(tmp_path / "digits.pt"), tasks=60)
    assert scores["mean"] > 0.6, scores  # chance is 0.2

    meta = export_checkpoint(str(tmp_path / "digits.pt"), str(tmp_path / "adapter"),
                             formats="onnx", log=lambda _: None)
    assert meta["verification"]["passed"]
    assert meta["preprocessing"]["scheme"] == "maml-toolkit/pixels-v1"
    assert meta["input"]["shape"] == [1, 8, 8]

    exp = restore(load(tmp_path / "digits.pt"), "digits.pt")
    source = exp.source
    rows, classes = _task_files(source, "test", 10, seed=3)
    files = [f for group in __import__("maml.tasks.folder", fromlist=["scan"]).scan(digits)[1]
             for f in group]
    support = [r for per in rows for r in per[:5]]
    query = [r for per in rows for r in per[5:]]
    labels = [c for c in range(5) for _ in range(5)]
    images = torch.as_tensor(np.asarray(source.images))
    batch = TaskBatch(images[support][None], torch.tensor(labels)[None],
                      images[query][None], torch.zeros(1, len(query), dtype=torch.long))
    reference = adapt_predict(exp.model, exp.inner_lrs, batch, exp.cfg.inner_loop(
        exp.cfg.eval_inner_steps))[0].numpy()

    adapter = load_adapter(tmp_path / "adapter")
    pngs = [files[r].read_bytes() for r in support], [files[r].read_bytes() for r in query]
    served = adapter.adapt_predict(pngs[0], labels, pngs[1])
    np.testing.assert_allclose(served, reference, atol=1e-4)
    assert (served.argmax(-1) == reference.argmax(-1)).all()

    from fastapi.testclient import TestClient

    from serve.app import create_app

    encoded = [[base64.b64encode(b).decode() for b in group] for group in pngs]
    with TestClient(create_app(adapter)) as client:
        reply = client.post("/v1/predict", json={"support_x": encoded[0], "support_y": labels,
                                                 "query_x": encoded[1]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"] == reference.argmax(-1).tolist()


def test_a_second_run_reads_the_cache(digits, monkeypatch):
    from maml.tasks import folder

    first = folder.load_images(digits, 8, 1, False, quiet=True)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(folder, "decode_all", no_decoding)
    second = folder.load_images(digits, 8, 1, False, quiet=True)
    np.testing.assert_array_equal(first[1], second[1])
    assert first[0] == second[0] and len(first[0]) == 10 and int(first[2].sum()) == 1797


def _write_rgb_classes(root: Path, classes: int = 6, per_class: int = 6) -> None:
    """Coloured squares and stripes, images of two sizes (so they are resized, said once)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        colour = rng.integers(0, 256, 3)
        for i in range(per_class):
            h, w = (20, 24) if i % 2 else (30, 30)
            pixels = rng.integers(0, 60, (h, w, 3)) + colour // 2
            pixels[: h // (c % 3 + 2)] = colour
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(
                folder / f"{i}.{'png' if i % 3 else 'jpg'}")


def test_rgb_images_of_another_size_export_and_serve(tmp_path, capsys):
    import maml
    from export.build import export_checkpoint
    from maml.checkpoint import load
    from maml.experiment import restore
    from maml.higher_engine import adapt_predict
    from serve.adapter import load as load_adapter

    _write_rgb_classes(tmp_path / "rgb")
    cfg = Config(dataset="folder", data_root=str(tmp_path / "rgb"), image_size=12, channels=3,
                 normalize=True, augment="rot90,flip", split="0.5,0,0.5", n_way=3, k_shot=2,
                 q_query=2, iterations=4, val_every=4, val_tasks=4, model="maxpool",
                 model_kwargs={"hidden": 8}, checkpoint=str(tmp_path / "rgb.pt"))
    maml.train(cfg, progress=False)
    assert "2 sizes" in capsys.readouterr().err
    meta = export_checkpoint(str(tmp_path / "rgb.pt"), str(tmp_path / "adapter"),
                             formats="onnx", log=lambda _: None)
    assert meta["verification"]["passed"] and meta["input"]["shape"] == [3, 12, 12]
    prep = meta["preprocessing"]
    assert prep["color"] == "rgb" and prep["std"] != [1.0, 1.0, 1.0]
    state = load(tmp_path / "rgb.pt")
    assert state["config"]["augment"] == "rot90,flip" and state["split"]["classes"][0] == "class0"
    exp = restore(state, "rgb.pt")
    chosen = [0, 3, 5]  # 6 images per class, files in sorted order are the cache's rows
    files = [sorted((tmp_path / "rgb" / f"class{c}").iterdir())[:3] for c in chosen]
    x = torch.stack([torch.as_tensor(np.asarray(exp.source.images[6 * c + i]))
                     for c in chosen for i in range(3)]).view(3, 3, 3, 12, 12)
    labels = [0, 0, 1, 1, 2, 2]
    batch = TaskBatch(x[:, :2].reshape(1, 6, 3, 12, 12), torch.tensor([labels]),
                      x[:, 2].reshape(1, 3, 3, 12, 12), torch.zeros(1, 3, dtype=torch.long))
    reference = adapt_predict(exp.model, exp.inner_lrs, batch, exp.cfg.inner_loop(
        exp.cfg.eval_inner_steps))[0].numpy()
    adapter = load_adapter(tmp_path / "adapter")
    served = adapter.adapt_predict([f.read_bytes() for per in files for f in per[:2]], labels,
                                   [per[2].read_bytes() for per in files])
    np.testing.assert_allclose(served, reference, atol=1e-4)


def make_sine(k_shot: int, q_query: int, device: str = "cpu", amplitude: float = 5.0):
    """A `package.module:factory` task source defined only here: the MAML paper's sinusoid."""

    class Sine:
        kind, loss, input_shape, output_shape = "regression", "mse", (1,), (1,)

        def describe(self) -> dict:
            return {"name": "test-sine", "amplitude": amplitude, "k_shot": k_shot}

        def sample(self, batch_size: int, generator: torch.Generator,
                   split: str = "train") -> TaskBatch:
            n = k_shot + q_query
            amp = 0.1 + (amplitude - 0.1) * torch.rand(batch_size, 1, 1, generator=generator)
            phase = math.pi * torch.rand(batch_size, 1, 1, generator=generator)
            x = -5.0 + 10.0 * torch.rand(batch_size, n, 1, generator=generator)
            y = amp * torch.sin(x - phase)
            return TaskBatch(x[:, :k_shot], y[:, :k_shot], x[:, k_shot:], y[:, k_shot:])

    return Sine()


def test_a_task_source_of_your_own_trains_exports_and_serves(tmp_path):
    import maml
    from export.build import export_checkpoint
    from maml.checkpoint import load
    from maml.experiment import restore
    from maml.higher_engine import adapt_predict
    from serve.adapter import load as load_adapter

    spec = f"{__name__}:make_sine"
    cfg = Config(dataset=spec, dataset_kwargs={"amplitude": 4.0}, iterations=300,
                 log_every=100, val_every=300, val_tasks=20, checkpoint=str(tmp_path / "s.pt"))
    maml.train(cfg, progress=False)
    state = load(tmp_path / "s.pt")
    assert state["config"]["dataset"] == spec and state["config"]["task_loss"] == "mse"
    scores = maml.evaluate(str(tmp_path / "s.pt"), tasks=50)
    assert scores["mean"] < scores["before"]["mean"]  # adaptation helps
    meta = export_checkpoint(str(tmp_path / "s.pt"), str(tmp_path / "adapter"), formats="onnx",
                             log=lambda _: None)
    assert meta["verification"]["passed"] and meta["data"]["amplitude"] == 4.0
    exp = restore(state, "s.pt")
    batch = exp.source.sample(1, torch.Generator().manual_seed(5), "test")
    reference = adapt_predict(exp.model, exp.inner_lrs, batch,
                              exp.cfg.inner_loop(exp.cfg.eval_inner_steps))[0].numpy()
    served = load_adapter(tmp_path / "adapter").adapt_predict(
        batch.support_x[0].numpy(), batch.support_y[0].numpy(), batch.query_x[0].numpy())
    np.testing.assert_allclose(served, reference, atol=1e-4)


def test_a_task_source_that_is_not_one_is_one_line():
    from maml.experiment import build

    with pytest.raises(UsageError, match="without kind"):
        build(Config(dataset="collections:OrderedDict").with_defaults())
    with pytest.raises(UsageError, match="cannot import"):
        build(Config(dataset="no_such_module:f").with_defaults())


@pytest.mark.needs_omniglot("images_background_small1.zip", "images_background.npz")
def test_omniglot_folders_give_the_npz_loaders_tasks(tmp_path):
    """The upstream folder layout of Omniglot, read as a two-level folder dataset (inverted so
    that ink is 1, 28x28, rotations as new classes), samples the very tensors the npz loader
    samples for the same characters, with the same generator."""
    from maml.tasks.folder import FolderTasks, load_images
    from maml.tasks.omniglot import Omniglot, to_model_input
    from tests.omniglot_data import IMAGES_ZIP, OMNIGLOT

    with zipfile.ZipFile(OMNIGLOT / IMAGES_ZIP) as z:
        z.extractall(tmp_path)
    root = tmp_path / "images_background_small1"
    names, images, counts, two_level = load_images(root, 28, 1, True, quiet=True)
    assert two_level and (counts == 20).all()
    rows = []  # the npz row of each class: its files are named <character id>_<drawing>.png
    for name in names:
        first = sorted((root / name).iterdir())[0].name
        rows.append(int(first[:4]) - 1)
    npz = np.load(OMNIGLOT / "images_background.npz")["images"][rows]
    everything = torch.arange(len(names))
    split = {"train": everything[: len(names) // 2], "val": everything[:0],
             "test": everything[len(names) // 2:], "classes": names}
    folder = FolderTasks(images, counts, names, split, 5, 1, 15, augment=("rot90",),
                         invert=True)
    reference = Omniglot(to_model_input(npz), {k: split[k] for k in ("train", "val", "test")},
                         5, 1, 15)
    for part in ("train", "test"):
        a = folder.sample(4, torch.Generator().manual_seed(7), part)
        b = reference.sample(4, torch.Generator().manual_seed(7), part)
        for x, y in zip(a.tensors(), b.tensors()):
            assert torch.equal(x, y), part


@pytest.mark.parametrize("problem, match", [
    ("empty", "class c1 has no images"),
    ("few", r"class c2 has 3 images.*needs 4"),
    ("unreadable", r"c0/broken\.png is not a readable image"),
    ("classes", r"the (val|test) split has 1 classes, fewer than --n-way 2"),
])
def test_bad_data_is_one_line(tmp_path, problem, match):
    from maml.experiment import make_source

    root = tmp_path / "data"
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(3 if (problem == "few" and c == 2) else 6):
            Image.fromarray(np.full((5, 5), 40 * c + i, np.uint8), "L").save(
                root / f"c{c}" / f"{i}.png")
    if problem == "empty":
        for f in (root / "c1").iterdir():
            f.unlink()
    if problem == "unreadable":
        (root / "c0" / "broken.png").write_bytes(b"not a png")
    split = "0.5,0.25,0.25" if problem == "classes" else "0.5,0,0.5"
    cfg = Config(dataset="folder", data_root=str(root), n_way=2, k_shot=1, q_query=3,
                 split=split, image_size=5).with_defaults()
    with pytest.raises(UsageError, match=match) as caught:
        make_source(cfg)
    assert "\n" not in str(caught.value)


def test_a_split_file_names_groups_and_is_kept(tmp_path):
    from maml.tasks.folder import make_split

    names = ["a/x", "a/y", "b/x", "b/z", "c/w"]
    (tmp_path / "split.json").write_text(json.dumps({"train": ["a", "c/w"], "test": ["b"]}))
    split = make_split(names, True, str(tmp_path / "split.json"), 0)
    assert split["train"].tolist() == [0, 1, 4] and split["test"].tolist() == [2, 3]
    (tmp_path / "split.txt").write_text("train:\na\nval:\nc\ntest:\nb/x\n")
    split = make_split(names, True, str(tmp_path / "split.txt"), 0)
    assert split["val"].tolist() == [4] and split["test"].tolist() == [2]
    seeded = make_split(names, True, "0.34,0.33,0.33", 1)
    groups = {part: {names[i].split("/")[0] for i in seeded[part].tolist()}
              for part in ("train", "val", "test")}
    assert sum(len(g) for g in groups.values()) == 3  # whole groups, each in one split
