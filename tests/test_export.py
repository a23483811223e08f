"""`python -m export`: every format of every model family reproduces the training-time inner loop.

Checkpoints are tiny (1-2 meta-iterations, narrow conv nets) and every export is shared by the
tests of its module-scoped fixture. Parity is checked here independently of the exporter's own
verification: each file is loaded as a consumer would load it and compared, on 1-shot and 5-shot
test tasks, with `maml.higher_engine.adapt_predict` on the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.build import export_checkpoint
from maml import checkpoint
from maml.__main__ import main as maml_main
from maml.adaptation import InnerLoop, evaluation_mode
from maml.experiment import make_source, restore
from maml.higher_engine import adapt_predict, routing_problem
from maml.strokes import RASTERISATION

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4


def train(folder: Path, name: str, *args: str) -> Path:
    path = folder / f"{name}.pt"
    with warnings.catch_warnings():  # vmap runs attention without a batching rule: expected
        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
        assert maml_main(["train", "--checkpoint", str(path), "--quiet", "--val-tasks", "2",
                          "--meta-batch-size", "2", *args]) == 0
    return path


def export(ckpt: Path, out: Path, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_checkpoint(str(ckpt), str(out), tasks=2, log=lambda line: None, **kwargs)


OMNIGLOT = ["--dataset", "omniglot", "--iterations", "1", "--meta-batch-size", "1"]  # synthetic
# name: (train arguments, export keyword arguments). Conv nets are narrow and 2 blocks deep to
# keep the suite fast (the odd-size max-pool crop of deeper nets is covered by
# test_export_decompositions). The exporter's own verification runs for two cases; the tests
# below check parity of every case independently.
CASES = {
    "mlp-1step": (["--iterations", "2"], {"steps": 1, "check": True}),
    "mlp-5step-learned": (["--iterations", "2", "--learn-inner-lr", "--inner-steps", "2"],
                          {"steps": 5, "check": False}),
    "user-module-5step-learned": (
        ["--iterations", "2", "--learn-inner-lr", "--inner-steps", "5",
         "--model", "tests.export_models:layernorm_gelu_mlp"], {"steps": 5, "check": False}),
    "unused-weight-2step": (  # a layer the forward never calls (a constant output), a buffer
        ["--iterations", "2", "--model", "tests.export_models:mlp_with_spare_layer"],
        {"steps": 2, "check": True}),
    "0-dim-weight-2step": (  # a learned temperature: a parameter of shape ()
        ["--iterations", "2", "--model", "tests.export_models:temperature_mlp"],
        {"steps": 2, "check": True}),
    "functional-dropout-2step": (  # F.dropout(x, p, self.training): off in the adapter
        ["--iterations", "2", "--model", "tests.export_models:functional_dropout_mlp"],
        {"steps": 2, "check": True}),
    "transformer-2step": (  # second order, through attention's math form
        ["--iterations", "2", "--model", "tests.export_models:transformer_regressor"],
        {"steps": 2, "check": True}),
    "lstm-2step": (
        ["--iterations", "2", "--model", "tests.export_models:lstm_regressor"],
        {"steps": 2, "check": True}),
    "cnn-1step-learned": (
        [*OMNIGLOT, "--model", "cnn", "--model-kwargs", '{"hidden": 8, "blocks": 2}',
         "--learn-inner-lr"], {"steps": 1, "check": True}),
    "maxpool-5step": (
        [*OMNIGLOT, "--model", "maxpool", "--model-kwargs", '{"hidden": 4, "blocks": 2}'],
        {"steps": 5, "check": False}),
    "convnet-1step": (
        [*OMNIGLOT, "--model", "convnet", "--model-kwargs", '{"hidden": 4, "blocks": 2}'],
        {"steps": 1, "check": False}),
}


SLOW = {"maxpool-5step"}  # the largest graph (5 unrolled conv + max-pool backward passes)


def marks(name: str) -> list[pytest.MarkDecorator]:
    return ([pytest.mark.slow] if name in SLOW else []) + (
        [pytest.mark.omniglot] if "omniglot" in CASES[name][0] else [])


@pytest.fixture(scope="module", params=[pytest.param(name, marks=marks(name)) for name in CASES])
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    train_args, export_kwargs = CASES[request.param]
    if "omniglot" in train_args:  # the synthetic copy (tests/conftest.py), made only if needed
        train_args = [*train_args, "--data-root", str(request.getfixturevalue("synthetic_omniglot"))]
    ckpt = train(folder, "model", *train_args)
    info = export(ckpt, folder / "adapter", **export_kwargs)
    return ckpt, folder / "adapter", info, export_kwargs["steps"]


def tasks_with_shots(ckpt: Path, shots: int, n: int = 2):
    exp = restore(checkpoint.load(ckpt), str(ckpt), "cpu")
    source, _ = make_source(dataclasses.replace(exp.cfg, k_shot=shots), exp.split)
    batch = source.sample(n, torch.Generator().manual_seed(99 + shots), "test")
    return exp, batch.to("cpu", torch.float32)


def inner_loop(exp, learned, batch, inner: InnerLoop) -> np.ndarray:
    """The training-time inner loop's query outputs: through `higher`, or through
    `functional_call` for a model whose weights higher ignores (attention's out_proj)."""
    with evaluation_mode(exp.model):
        plain = routing_problem(exp.model, batch.support_x[0]) is not None
    return adapt_predict(exp.model, learned, batch, inner, plain=plain).numpy()


def loaders(folder: Path, info: dict):
    """Per format, `(adapt, predict, adapt_predict)` callables on numpy arrays."""
    files = info["files"]

    def onnx_fn(entry):
        session = ort.InferenceSession(str(folder / files["onnx"][entry]),
                                       providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run(*arrays):
            outs = session.run(None, dict(zip(names, arrays, strict=True)))
            return outs if entry == "adapt" else outs[0]

        return run

    def torch_fn(load, entry):
        module = load(str(folder / files[fmt][entry]))

        def run(*arrays):
            with torch.no_grad():
                out = module(*(torch.from_numpy(np.asarray(a)) for a in arrays))
            return [o.numpy() for o in out] if entry == "adapt" else out.numpy()

        return run

    entries = ("adapt", "predict", "adapt_predict")
    made = {"onnx": [onnx_fn(e) for e in entries]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fmt = "torchscript"
        made[fmt] = [torch_fn(torch.jit.load, e) for e in entries]
        fmt = "pt2"
        made[fmt] = [torch_fn(lambda p: torch.export.load(p).module(), e) for e in entries]
    return made


def test_adapter_json_follows_the_contract(exported):
    ckpt, folder, info, steps = exported
    on_disk = json.loads((folder / "adapter.json").read_text())
    assert on_disk == json.loads(json.dumps(info))
    assert info["format"] == "maml-toolkit/adapter-v1"
    exp = restore(checkpoint.load(ckpt), str(ckpt), "cpu")
    params = list(exp.model.named_parameters())
    assert [p["name"] for p in info["parameters"]] == [n for n, _ in params]
    assert [p["shape"] for p in info["parameters"]] == [list(p.shape) for _, p in params]
    assert info["steps"] == steps
    init = np.load(folder / info["init"])
    for i, (_, p) in enumerate(params):
        np.testing.assert_array_equal(init[f"p{i}"], p.detach().numpy())
    assert np.asarray(info["step_sizes"]).shape == (steps, len(params))
    if exp.inner_lrs is not None:  # learned rows, the last one repeated past the learned ones
        learned = exp.inner_lrs.detach().numpy()
        rows = [learned[min(s, len(learned) - 1)] for s in range(steps)]
        np.testing.assert_allclose(info["step_sizes"], rows, rtol=1e-6)
    else:
        np.testing.assert_allclose(info["step_sizes"], exp.cfg.inner_lr, rtol=1e-6)
    if exp.cfg.dataset == "omniglot":
        assert info["task"] == "classification" and info["n_way"] == exp.cfg.n_way
        assert info["input"]["shape"] == [1, 28, 28] and info["target"]["dtype"] == "int64"
        assert info["preprocessing"]["size"] == 28
        assert info["preprocessing"]["strokes"] == RASTERISATION  # what the drawing page draws with
    else:
        assert info["task"] == "regression" and info["n_way"] is None
        assert info["target"] == {"shape": [1], "dtype": "float32"}
    for fmt, names in info["files"].items():
        for name in names.values():
            digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
            assert info["sha256"][name] == digest, (fmt, name)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["adapter.json", *info["sha256"]])
    if info["verification"] is not None:  # the exporter's own check, on its own tasks
        assert info["verification"]["passed"] and info["verification"]["tasks"] == 4
        assert set(info["verification"]["max_abs_diff"]) == set(info["files"])
        assert max(info["verification"]["max_abs_diff"].values()) <= TOLERANCE
    model = onnx.load(str(folder / "adapt.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["steps"]) == steps and json.loads(meta["loss"]) == info["loss"]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18


@pytest.mark.parametrize("shots", [1, 5])
def test_every_format_matches_the_training_inner_loop(exported, shots):
    ckpt, folder, info, steps = exported
    exp, batch = tasks_with_shots(ckpt, shots)
    learned = exp.inner_lrs.detach() if exp.inner_lrs is not None else None
    reference = inner_loop(exp, learned, batch, exp.cfg.inner_loop(steps))
    assert batch.support_x.shape[1] == shots * (exp.cfg.n_way or 1)
    for fmt, (adapt, predict, both) in loaders(folder, info).items():
        for i in range(len(batch)):
            sx, sy, qx = (t[i].numpy() for t in (batch.support_x, batch.support_y, batch.query_x))
            state = adapt(sx, sy)  # the weights, then (support mode) the batch-norm moments
            assert [list(w.shape) for w in state] == [
                p["shape"] for p in info["parameters"] + info["norm"]["moments"]]
            for outputs in (both(sx, sy, qx), predict(*state, qx)):
                assert outputs.shape == reference[i].shape
                diff = np.abs(outputs - reference[i]).max()
                assert diff <= TOLERANCE, (fmt, shots, diff)
                if info["task"] == "classification":
                    assert (outputs.argmax(-1) == reference[i].argmax(-1)).all(), fmt


def test_adaptation_changes_the_outputs(exported):
    """Guards the parity test against a routine that silently skips the SGD steps."""
    ckpt, folder, info, _ = exported
    exp, batch = tasks_with_shots(ckpt, 5, n=1)
    unadapted = inner_loop(exp, None, batch, InnerLoop(exp.cfg.loss, 0, 0.0,
                                                       norm=exp.cfg.norm))[0]
    session = ort.InferenceSession(str(folder / "adapt_predict.onnx"))
    feeds = {"support_x": batch.support_x[0].numpy(), "support_y": batch.support_y[0].numpy(),
             "query_x": batch.query_x[0].numpy()}
    assert np.abs(session.run(None, feeds)[0] - unadapted).max() > 1e-4


NO_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import json, numpy as np, onnxruntime as ort
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("torch is importable")
folder, data = sys.argv[1], np.load(sys.argv[2])
info = json.load(open(folder + "/adapter.json"))
session = ort.InferenceSession(folder + "/" + info["files"]["onnx"]["adapt_predict"])
out = session.run(None, {k: data[k] for k in ("support_x", "support_y", "query_x")})[0]
print(json.dumps({"diff": float(np.abs(out - data["expected"]).max()),
                  "torch_loaded": "torch" in sys.modules and sys.modules["torch"] is not None}))
"""


def test_onnx_adapter_runs_without_torch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("notorch")
    ckpt = train(folder, "model", "--iterations", "1")
    info = export(ckpt, folder / "adapter", steps=2, formats="onnx")
    exp, batch = tasks_with_shots(ckpt, 5, n=1)
    expected = adapt_predict(exp.model, None, batch, exp.cfg.inner_loop(2)).numpy()[0]
    data = folder / "task.npz"
    np.savez(data, support_x=batch.support_x[0].numpy(), support_y=batch.support_y[0].numpy(),
             query_x=batch.query_x[0].numpy(), expected=expected)
    assert info["files"] == {"onnx": {"adapt": "adapt.onnx", "predict": "predict.onnx",
                                      "adapt_predict": "adapt_predict.onnx"}}
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(folder / "adapter"), str(data)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["torch_loaded"]
    assert result["diff"] <= TOLERANCE
