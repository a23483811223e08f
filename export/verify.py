"""Parity: every exported file reproduces the training-time inner loop on sample tasks.

The reference is `maml.higher_engine.adapt_predict` (the engine meta-training and `maml eval`
use) on the same checkpoint and tasks. Each format is loaded back from disk, as a consumer would
load it, and run both as `adapt_predict` and as `predict(adapt(...))`. Passing means, on every
task, a max abs difference of at most `TOLERANCE` or, where the task is ill-conditioned, at most
twice the reference's own float32 error (its distance to the same inner loop in float64), and,
for classification, identical argmax on every query. Why the second clause: both sides compute
the same float64 quantity in float32, and on some tasks 5 SGD steps amplify rounding (a 20-way
Omniglot run's reference was 2.8e-3 away from float64 on one task, while the ONNX adapter was
1.25e-4 from the reference); a fixed absolute bound would refuse a correct export there.
The tasks come from the run's test split with two support sizes (the run's shot count and
another), which also checks that the files accept a varying number of examples.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maml.adaptation import InnerLoop
from maml.errors import UsageError
from maml.experiment import Experiment, make_source
from maml.tasks import TaskBatch

TOLERANCE = 1e-4

Runner = Callable[[np.ndarray, np.ndarray, np.ndarray], list[np.ndarray]]
"""`(support_x, support_y, query_x) -> [adapt_predict outputs, predict(adapt) outputs]`."""


def sample_tasks(exp: Experiment, per_shot: int, seed: int) -> list[TaskBatch]:
    """`per_shot` test tasks at the run's shot count and as many at another shot count."""
    cfg = exp.cfg
    other = 5 if cfg.k_shot != 5 else 1
    tasks = []
    for k, offset in ((cfg.k_shot, 0), (other, 1)):
        source = exp.source if k == cfg.k_shot else _source_with_shots(exp, k)
        batch = source.sample(per_shot, torch.Generator().manual_seed(seed + offset), "test")
        batch = batch.to("cpu", torch.float32)
        tasks += [batch.task(i) for i in range(len(batch))]
    return tasks


def _source_with_shots(exp: Experiment, k: int):
    """The run's task source at `k` shots (fewer queries if the data set has too few examples)."""
    try:
        return make_source(dataclasses.replace(exp.cfg, k_shot=k), exp.split)[0]
    except UsageError:  # e.g. Omniglot's 20 drawings per character
        return make_source(dataclasses.replace(exp.cfg, k_shot=k, q_query=1), exp.split)[0]


def reference(exp: Experiment, learned: torch.Tensor | None, inner: InnerLoop,
              task: TaskBatch) -> np.ndarray:
    """The training-time inner loop's query outputs for one task."""
    from maml.higher_engine import adapt_predict

    return adapt_predict(exp.model, learned, task, inner)[0].numpy()


def float32_error(exp: Experiment, learned: torch.Tensor | None, inner: InnerLoop,
                  task: TaskBatch, ref: np.ndarray) -> float:
    """How far the float32 reference `ref` is from the same inner loop run in float64."""
    exp64 = dataclasses.replace(exp, model=copy.deepcopy(exp.model).double())
    learned64 = None if learned is None else learned.detach().double()
    exact = reference(exp64, learned64, inner, task.to("cpu", torch.float64))
    return float(np.abs(ref.astype(np.float64) - exact).max())


def onnx_runner(folder: Path, files: dict[str, str]) -> Runner:
    import onnxruntime as ort

    def session(name: str):
        return ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])

    adapt, predict, both = (session(files[e]) for e in ("adapt", "predict", "adapt_predict"))

    def run(sx, sy, qx):
        weights = adapt.run(None, {"support_x": sx, "support_y": sy})
        feeds = {f"p{i}": w for i, w in enumerate(weights)} | {"query_x": qx}
        return [both.run(None, {"support_x": sx, "support_y": sy, "query_x": qx})[0],
                predict.run(None, feeds)[0]]

    return run


def torch_runner(load: Callable[[Path], Any], folder: Path, files: dict[str, str]) -> Runner:
    adapt, predict, both = (load(folder / files[e]) for e in ("adapt", "predict", "adapt_predict"))

    def run(sx, sy, qx):
        sx, sy, qx = (torch.from_numpy(a) for a in (sx, sy, qx))
        with torch.no_grad():
            weights = adapt(sx, sy)
            return [both(sx, sy, qx).numpy(), predict(*weights, qx).numpy()]

    return run


def runners(folder: Path, files: dict[str, dict[str, str]]) -> dict[str, Runner]:
    """A runner per written format, loading the files from `folder`."""
    from export import pt2_format, torchscript_format

    made: dict[str, Runner] = {}
    for fmt, names in files.items():
        if fmt == "onnx":
            made[fmt] = onnx_runner(folder, names)
        elif fmt == "torchscript":
            made[fmt] = torch_runner(torchscript_format.load, folder, names)
        elif fmt == "pt2":
            made[fmt] = torch_runner(pt2_format.load, folder, names)
    return made


def verify(exp: Experiment, learned: torch.Tensor | None, inner: InnerLoop, folder: Path,
           files: dict[str, dict[str, str]], tasks: list[TaskBatch]) -> dict[str, Any]:
    """Measured differences per format; `passed` says whether all are within the contract."""
    run = runners(folder, files)
    worst = {fmt: 0.0 for fmt in run}
    argmax_ok = {fmt: True for fmt in run}
    within = True
    ill_conditioned: list[float] = []  # the reference's float32 error where it set the bound
    classification = inner.loss == "cross_entropy"
    for task in tasks:
        ref = reference(exp, learned, inner, task)
        task_worst = 0.0
        sx, sy, qx = (t[0].numpy() for t in (task.support_x, task.support_y, task.query_x))
        for fmt, runner in run.items():
            for out in runner(sx, sy, qx):
                diff = float(np.abs(out - ref).max())
                worst[fmt] = max(worst[fmt], diff)
                task_worst = max(task_worst, diff)
                if classification and not (out.argmax(-1) == ref.argmax(-1)).all():
                    argmax_ok[fmt] = False
        if task_worst > TOLERANCE:  # the float64 reference only where the bound is in question
            noise = float32_error(exp, learned, inner, task, ref)
            if 2 * noise > TOLERANCE:
                ill_conditioned.append(noise)
            within = within and task_worst <= max(TOLERANCE, 2 * noise)
    passed = within and all(argmax_ok.values())
    return {"max_abs_diff": worst, "argmax_equal": argmax_ok if classification else None,
            "tolerance": TOLERANCE, "reference_float32_error": ill_conditioned,
            "tasks": len(tasks),
            "support_sizes": sorted({int(t.support_x.shape[1]) for t in tasks}),
            "reference": "maml.higher_engine.adapt_predict", "passed": passed}
