"""`serve.load`: both backends reproduce the training-time inner loop on real exported adapters."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from serve_helpers import NO_TORCH, ROOT, make_task, reference

import serve
from maml.errors import UsageError


def initial_weights(exported) -> dict[str, np.ndarray]:
    from maml import checkpoint

    state = checkpoint.load(exported.checkpoint)
    return {k: v.numpy() for k, v in state["model"]["state_dict"].items()}


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_backends_match_the_reference(exported, backend):
    adapter = serve.load(exported.directory, backend)
    assert adapter.metadata == exported.meta and adapter.backend.name == backend
    for k_shot, q_query, seed in ((1, 3, 0), (3, 7, 1)):  # sizes unlike the export's example
        task = make_task(exported.meta, k_shot, q_query, seed)
        expected = reference(exported, task)
        adapted = adapter.adapt(task["support_x"], task["support_y"])
        got = adapted.predict(task["query_x"])
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        both = adapter.adapt_predict(task["support_x"], task["support_y"], task["query_x"])
        np.testing.assert_allclose(both, expected, atol=1e-4, rtol=0)
        # the task holds fine-tuned weights: the checkpoint's, moved by the support set
        init = initial_weights(exported)
        assert len(adapted.parameters) == len(exported.meta["parameters"])
        for p, spec in zip(adapted.parameters, exported.meta["parameters"], strict=True):
            assert list(p.shape) == spec["shape"]
        assert any(not np.allclose(p, init[spec["name"]])
                   for p, spec in zip(adapted.parameters, exported.meta["parameters"],
                                      strict=True))


def test_inputs_from_lists_and_a_task_predicts_many_query_sets(sine):
    adapter = serve.load(sine.directory)
    task = make_task(sine.meta, 5, 4, seed=3)
    adapted = adapter.adapt(task["support_x"].tolist(), task["support_y"].tolist())
    for seed in (4, 5):
        queries = make_task(sine.meta, 1, 6, seed)["query_x"]
        expected = reference(sine, {**task, "query_x": queries})
        np.testing.assert_allclose(adapted.predict(queries.tolist()), expected, atol=1e-4)


def test_predictions_depend_on_the_query_batch_only_in_the_transductive_mode(
        omniglot, omniglot_transductive, sine):
    """Documented behaviour: a transductive adapter normalises with the query batch's
    statistics; a support-mode one (the default) and a model without batch norm do not."""
    for exp, batch_dependent in ((omniglot_transductive, True), (omniglot, False),
                                 (sine, False)):
        adapter = serve.load(exp.directory)
        task = make_task(exp.meta, 2, 3, seed=6)
        adapted = adapter.adapt(task["support_x"], task["support_y"])
        together = adapted.predict(task["query_x"])
        alone = np.concatenate([adapted.predict(task["query_x"][i : i + 2])
                                for i in range(0, len(task["query_x"]), 2)])
        assert np.allclose(together, alone, atol=1e-5) != batch_dependent


def test_image_adapter_takes_png_bytes(omniglot, tmp_path):
    from PIL import Image

    from maml.images import preprocess_grayscale

    adapter = serve.load(omniglot.directory)
    rng = np.random.default_rng(7)
    drawings = [(rng.random((60, 60)) > 0.2).astype(np.uint8) * 255 for _ in range(10)]
    pngs = []
    for d in drawings:
        buf = io.BytesIO()
        Image.fromarray(d).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    arrays = np.stack([preprocess_grayscale(d, 28)[None] for d in drawings])
    labels = np.arange(5)
    (tmp_path / "q.png").write_bytes(pngs[5])
    from_images = adapter.adapt(pngs[:5], labels).predict([tmp_path / "q.png", *pngs[6:]])
    from_arrays = adapter.adapt(arrays[:5], labels).predict(arrays[5:])
    np.testing.assert_allclose(from_images, from_arrays, atol=1e-5)
    adapter.metadata = {**adapter.metadata, "preprocessing": None}  # as an array adapter
    with pytest.raises(UsageError, match="takes arrays, not images"):
        adapter.adapt(pngs[:5], labels)


def test_one_call_s_images_share_one_pixel_budget(omniglot, monkeypatch):
    """Adapt-and-predict counts support and query images together, before decoding either;
    adapt and predict on their own each fit."""
    from PIL import Image

    from serve import image_input

    def png(seed: int) -> bytes:
        buf = io.BytesIO()
        drawing = (np.random.default_rng(seed).random((20, 20)) > 0.2).astype(np.uint8) * 255
        Image.fromarray(drawing).save(buf, format="PNG")
        return buf.getvalue()

    support, queries = [png(i) for i in range(5)], [png(i) for i in range(5, 8)]
    monkeypatch.setattr(image_input, "MAX_TOTAL_PIXELS", 5 * 400)  # the support set exactly
    adapter = serve.load(omniglot.directory)
    adapter.adapt(support, np.arange(5)).predict(queries)  # one set per call: within budget
    decode = image_input.grayscale_pixels

    def no_decoding(data: bytes, index: int = 0) -> np.ndarray:
        raise AssertionError("decoded before the call's pixel budget was checked")

    monkeypatch.setattr(image_input, "grayscale_pixels", no_decoding)
    with pytest.raises(UsageError, match="the 8 images have 3200 pixels in all, over the limit "
                                         "of 2000"):
        adapter.adapt_predict(support, np.arange(5), queries)
    monkeypatch.setattr(image_input, "grayscale_pixels", decode)
    monkeypatch.setattr(image_input, "MAX_TOTAL_PIXELS", 8 * 400)
    both = adapter.adapt_predict(support, np.arange(5), queries)
    np.testing.assert_allclose(both, adapter.adapt(support, np.arange(5)).predict(queries),
                               atol=1e-5)


def test_image_errors_name_the_set_and_the_image(omniglot):
    """A bad query image is named as such, also when adapt-and-predict reads both sets at once
    (it was numbered after the support images there)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (28, 28), 255).save(buf, format="PNG")
    good = [buf.getvalue()] * 5
    adapter = serve.load(omniglot.directory)
    labels = np.arange(5)
    for call in (lambda q: adapter.adapt_predict(good, labels, q),
                 lambda q: adapter.adapt(good, labels).predict(q)):
        with pytest.raises(UsageError, match="query_x image 2 is not a readable PNG or JPEG"):
            call(good[:2] + [b"not an image"])
    with pytest.raises(UsageError, match="support_x image 1 is not a readable PNG or JPEG"):
        adapter.adapt_predict(good[:1] + [b"not an image"] + good[2:], labels, good)


def test_load_resolves_files_and_backends(sine):
    d = sine.directory
    assert serve.load(d / "adapter.json").backend.name == "onnx"
    assert serve.load(d / "adapt.onnx").backend.name == "onnx"
    assert serve.load(d / "predict.ts").backend.name == "torchscript"
    with pytest.raises(UsageError, match="is a onnx file but backend='torchscript'"):
        serve.load(d / "adapt.onnx", "torchscript")
    with pytest.raises(UsageError, match="unknown backend 'tensorflow'"):
        serve.load(d, "tensorflow")
    with pytest.raises(UsageError, match="does not exist"):
        serve.load(d / "missing")


def test_tampered_or_incomplete_exports_are_refused(sine, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sine.directory, copy)
    data = bytearray((copy / "predict.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "predict.onnx").write_bytes(bytes(data))
    with pytest.raises(UsageError, match="predict.onnx does not match its sha256"):
        serve.load(copy)
    serve.load(copy, "torchscript")  # the TorchScript files are intact
    (copy / "adapt.ts").unlink()
    with pytest.raises(UsageError, match="adapt.ts is missing"):
        serve.load(copy, "torchscript")
    meta = json.loads((copy / "adapter.json").read_text())
    (copy / "adapter.json").write_text(json.dumps({**meta, "format": "other/v9"}))
    with pytest.raises(UsageError, match="has format 'other/v9'"):
        serve.load(copy)
    (copy / "adapter.json").write_text("{not json")
    with pytest.raises(UsageError, match="not readable JSON"):
        serve.load(copy)


def test_bad_inputs_are_refused_before_any_computation(omniglot):
    adapter = serve.load(omniglot.directory, limits=serve.Limits(max_support=20, max_query=4))

    class Untouchable:
        name = "untouchable"

        def __getattr__(self, name):
            raise AssertionError(f"the backend ran ({name}) on invalid input")

    task = make_task(omniglot.meta, 1, 1, seed=8)
    good = adapter.adapt(task["support_x"], task["support_y"])
    adapter.backend = Untouchable()
    sx, sy, qx = task["support_x"], task["support_y"], task["query_x"]
    cases = [
        ((sx[:, :, :27], sy), "support_x has shape"),
        ((sx, sy + 1), "label 5 outside"),
        ((sx, np.zeros_like(sy)), "class 1 has no support example"),
        ((np.where(sx > 0.5, np.nan, sx), sy), "non-finite"),
        ((sx[:0], sy[:0]), "support_x is empty"),
        ((np.concatenate([sx] * 5), np.concatenate([sy] * 5)), "more than the limit of 20"),
        ((sx.astype(np.complex64), sy), "real numbers"),
    ]
    for (x, y), message in cases:
        with pytest.raises(UsageError, match=message):
            adapter.adapt(x, y)
        with pytest.raises(UsageError, match=message):
            adapter.adapt_predict(x, y, qx)
    good.adapter = adapter
    with pytest.raises(UsageError, match="more than the limit of 4"):
        good.predict(qx)
    with pytest.raises(UsageError, match="query_x is empty"):
        good.predict(qx[:0])


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_a_diverging_adaptation_is_an_error_not_nan(sine, backend):
    """Finite inputs far outside the training range make the SGD steps overflow: the library
    says so rather than handing back NaN weights or predictions."""
    adapter = serve.load(sine.directory, backend)
    wild_x, wild_y, query = [[1e10]], [[1e10]], [[0.5], [1.0]]
    with pytest.raises(UsageError, match="non-finite weights"):
        adapter.adapt(wild_x, wild_y)
    with pytest.raises(UsageError, match="non-finite outputs"):
        adapter.adapt_predict(wild_x, wild_y, query)
    assert np.isfinite(adapter.adapt([[1.0]], [[0.5]]).predict(query)).all()


def test_serve_runs_without_torch(omniglot, tmp_path):
    """`import serve` and the onnxruntime backend work where torch and higher cannot import."""
    task = make_task(omniglot.meta, 1, 2, seed=9)
    np.savez(tmp_path / "task.npz", **task, expected=reference(omniglot, task))
    code = NO_TORCH + (
        "import numpy as np, serve\n"
        f"t = np.load({str(tmp_path / 'task.npz')!r})\n"
        f"a = serve.load({str(omniglot.directory)!r})\n"
        "out = a.adapt(t['support_x'], t['support_y']).predict(t['query_x'])\n"
        "print(float(np.abs(out - t['expected']).max()))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'higher')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    diff, modules = result.stdout.strip().splitlines()
    assert float(diff) < 1e-4 and modules == "[]"


def test_adapt_onnx_script_matches_the_inner_loop_from_any_folder(sine):
    """scripts/adapt_onnx.py, the README main job's last step, with paths relative to a folder
    other than the project's (its PyTorch comparison runs in the project folder)."""
    script = ROOT / "scripts" / "adapt_onnx.py"
    here = sine.directory.parent
    rel_adapter = sine.directory.name
    rel_ckpt = os.path.relpath(sine.checkpoint, here)
    done = subprocess.run([sys.executable, str(script), rel_adapter, "--shots", "5", "--compare",
                           rel_ckpt], cwd=here, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torch not imported" in done.stdout
    diff = float(done.stdout.split("max |difference| to the PyTorch inner loop: ")[1].split()[0])
    assert diff < 1e-4
    bad = subprocess.run([sys.executable, str(script), rel_adapter, "--shots", "0"], cwd=here,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --shots and --queries must be >= 1"


def test_adapt_onnx_script_compares_with_the_adapters_own_step_sizes(sine, tmp_path):
    """An adapter exported with its own --inner-lr is compared with that step size, not the
    checkpoint's."""
    out = tmp_path / "lr05"
    export = subprocess.run(
        [sys.executable, "-m", "export", "--checkpoint", str(sine.checkpoint), "--out", str(out),
         "--inner-lr", "0.05", "--steps", "2", "--formats", "onnx", "--no-verify"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    own = json.loads((out / "adapter.json").read_text())["step_sizes"][0][0]
    assert own == pytest.approx(0.05) and sine.meta["step_sizes"][0][0] != pytest.approx(0.05)
    script = ROOT / "scripts" / "adapt_onnx.py"
    done = subprocess.run([sys.executable, str(script), str(out), "--shots", "5", "--compare",
                           str(sine.checkpoint)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    diff = float(done.stdout.split("max |difference| to the PyTorch inner loop: ")[1].split()[0])
    assert diff < 1e-4


def test_adapt_onnx_script_refuses_a_missing_or_onnx_less_adapter(sine, tmp_path):
    meta = json.loads((sine.directory / "adapter.json").read_text())
    del meta["files"]["onnx"]
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    script = ROOT / "scripts" / "adapt_onnx.py"
    for folder, message in ((tmp_path / "missing", "has no adapter.json; give the folder "
                                                   "written by `python -m export --out`"),
                            (tmp_path, "has no ONNX files")):
        done = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"error: {folder} ") and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
