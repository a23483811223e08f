"""Parity: every exported file reproduces the training-time inner loop on sample tasks.

The reference is `maml.higher_engine.adapt_predict` (the engine meta-training and `maml eval`
use) on the same checkpoint and tasks, through `functional_call` for a model whose weights
`higher` ignores (`routes_through_higher`). Each format is loaded back from disk, as a consumer would
load it, and run both as `adapt_predict` and as `predict(adapt(...))`. Passing means, on every
task, a max abs difference of at most `TOLERANCE` times the task's largest |output| (at least
1: float32 rounding is relative, and 20-way logits reach 10), and, for classification, the reference's
argmax on every query; or, where the task is ill-conditioned, a difference of at most twice the
task's float32 noise and, on each query, a prediction the inner loop itself makes on the task
within that noise.

Why the second clause: both sides compute in float32 a function that is only piecewise smooth
(max-pool and ReLU route gradients by comparisons), and on some tasks a near-tie sits within
rounding distance. There, equally correct float32 programs differ by far more than `TOLERANCE`.
The noise of a task is measured, not assumed (`task_noise`): the larger of the reference's
distance to the same inner loop in float64, and how far the float64 loop moves when the support
images, or the meta-learned weights, move by `PERTURBATION` (relative; a few float32 rounding
steps). A 20-way 5-step run's reference was 2.8e-3 from float64 on one task; on a full-width
max-pool net the float64 loop moved by up to 0.14 under a 1e-6 perturbation, and an
onnxruntime adapter 5.5e-4 from the reference (which was 7e-6 from float64) was within that.
On a later 20-way checkpoint the float64 loop hardly moved with the images (9e-6) but moved by
1.8e-3 with the weights, as far as its onnxruntime adapter was from the reference (which was
6e-6 from float64). A wrong export (a wrong step size, loss or batch-norm mode) differs on the
well-conditioned tasks too, where the noise is 1e-6 to 5e-6. A noise bound only means something if the
reference is a function of its inputs, so a forward that is still random in evaluation mode (it
gives a task two different reference outputs) is refused instead.
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

from maml.adaptation import InnerLoop, evaluation_mode
from maml.errors import UsageError
from maml.experiment import Experiment, make_source
from maml.tasks import TaskBatch

TOLERANCE = 1e-4
PERTURBATION = 1e-6
"""Relative size of the support-image perturbations that measure a task's conditioning."""
PERTURBED_RUNS = 4
REFERENCE = {True: "maml.higher_engine.adapt_predict",  # keyed by `routes_through_higher`
             False: "maml.higher_engine.adapt_predict(plain=True)"}

ALONE_TOLERANCE = 1e-5
"""For an adapter that normalises with the support set: how far (relative to the task's largest
|output|, at least 1) predicting the queries one at a time may differ from all together."""

Runner = Callable[[np.ndarray, np.ndarray, np.ndarray], list[np.ndarray]]
"""`(support_x, support_y, query_x) -> [adapt_predict outputs, predict(adapt) outputs,
predict(adapt) with each query alone]`."""


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

    plain = not routes_through_higher(exp.model, task)
    return adapt_predict(exp.model, learned, task, inner, plain=plain)[0].numpy()


def routes_through_higher(model: torch.nn.Module, task: TaskBatch) -> bool:
    """Whether the reference runs through `higher`: yes, unless higher ignores some of the
    model's weights (nn.MultiheadAttention's out_proj). Such a model trained with the batched
    engine, which the same loop through `functional_call` reproduces exactly."""
    from maml.higher_engine import routing_problem

    with evaluation_mode(model):
        return routing_problem(model, task.support_x[0]) is None


@dataclasses.dataclass
class Noise:
    """A task's float32 noise: `scale` bounds how far correct float32 programs may differ, and
    `predictions` (classification) holds, per query, the classes the inner loop predicts on the
    task within that noise (float32, float64 and perturbed float64 runs)."""

    float32_error: float
    perturbation_spread: float
    predictions: np.ndarray | None

    @property
    def scale(self) -> float:
        return max(self.float32_error, self.perturbation_spread)


def task_noise(exp: Experiment, learned: torch.Tensor | None, inner: InnerLoop,
               task: TaskBatch, ref: np.ndarray) -> Noise:
    """Measure a task's noise: the reference's float32 error and the float64 inner loop's
    spread under `PERTURBED_RUNS` perturbations of relative size `PERTURBATION` of the support
    images, and as many of the meta-learned weights (a float32 program rounds the weights at
    every step, a direction that jittering the images alone can miss)."""
    exact = _exact(exp, learned, inner, task)
    outputs = [ref.astype(np.float64), exact]
    spread = 0.0
    for seed in range(PERTURBED_RUNS):
        jitter = torch.randn(task.support_x.shape, generator=torch.Generator().manual_seed(seed))
        moved = dataclasses.replace(task, support_x=task.support_x * (1 + PERTURBATION * jitter))
        for out in (_exact(exp, learned, inner, moved),
                    _exact(exp, learned, inner, task, weight_jitter=seed)):
            spread = max(spread, float(np.abs(out - exact).max()))
            outputs.append(out)
    predictions = None
    if inner.loss == "cross_entropy":
        predictions = np.stack([o.argmax(-1) for o in outputs])  # (runs, Q)
    return Noise(float(np.abs(outputs[0] - exact).max()), spread, predictions)


def _exact(exp: Experiment, learned: torch.Tensor | None, inner: InnerLoop,
           task: TaskBatch, weight_jitter: int | None = None) -> np.ndarray:
    """The reference inner loop in float64; with `weight_jitter` (a seed), from weights scaled
    elementwise by `1 + PERTURBATION * N(0, 1)`."""
    model = copy.deepcopy(exp.model)
    if weight_jitter is not None:  # on the run's own weights, then to float64 with the rest
        generator = torch.Generator().manual_seed(1000 + weight_jitter)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + PERTURBATION * torch.randn(p.shape, generator=generator).to(p.dtype))
    model = model.double()
    learned64 = None if learned is None else learned.detach().double()
    return reference(dataclasses.replace(exp, model=model), learned64, inner,
                     task.to("cpu", torch.float64))


def onnx_runner(folder: Path, files: dict[str, str]) -> Runner:
    import onnxruntime as ort

    def session(name: str):
        return ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])

    adapt, predict, both = (session(files[e]) for e in ("adapt", "predict", "adapt_predict"))
    names = [o.name for o in adapt.get_outputs()]

    def run(sx, sy, qx):
        state = dict(zip(names, adapt.run(None, {"support_x": sx, "support_y": sy})))
        alone = [predict.run(None, state | {"query_x": q})[0] for q in np.split(qx, len(qx))]
        return [both.run(None, {"support_x": sx, "support_y": sy, "query_x": qx})[0],
                predict.run(None, state | {"query_x": qx})[0], np.concatenate(alone)]

    return run


def torch_runner(load: Callable[[Path], Any], folder: Path, files: dict[str, str]) -> Runner:
    adapt, predict, both = (load(folder / files[e]) for e in ("adapt", "predict", "adapt_predict"))

    def run(sx, sy, qx):
        sx, sy, qx = (torch.from_numpy(a) for a in (sx, sy, qx))
        with torch.no_grad():
            state = adapt(sx, sy)
            alone = torch.cat([predict(*state, q) for q in qx.split(1)])
            return [both(sx, sy, qx).numpy(), predict(*state, qx).numpy(), alone.numpy()]

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
    passed = True
    ill_conditioned: list[dict[str, float]] = []  # the noise of tasks where it set the bound
    classification = inner.loss == "cross_entropy"
    transductive = inner.norm == "transductive"
    alone_gap = {fmt: 0.0 for fmt in run}
    for task in tasks:
        ref = reference(exp, learned, inner, task)
        tolerance = TOLERANCE * max(1.0, float(np.abs(ref).max()))
        if not np.isfinite(ref).all():
            raise UsageError(
                "the checkpoint's own inner loop gives non-finite outputs on a test task (its "
                "weights or step sizes have diverged, or the step size is too large); export a "
                "checkpoint from before the divergence, or pass a smaller --inner-lr")
        sx, sy, qx = (t[0].numpy() for t in (task.support_x, task.support_y, task.query_x))
        outputs = {fmt: runner(sx, sy, qx) for fmt, runner in run.items()}
        for fmt, (_, together, alone) in outputs.items():  # the mode's promise, in each format
            gap = float(np.nan_to_num(np.abs(alone - together), nan=np.inf).max())
            alone_gap[fmt] = max(alone_gap[fmt], gap)
            if transductive:  # a query alone is another input: only the other two are compared
                outputs[fmt] = outputs[fmt][:2]
            elif gap > ALONE_TOLERANCE * max(1.0, float(np.abs(ref).max())):
                passed = False
        # nan_to_num: a non-finite export output is an infinite difference, never max()'s
        # silently dropped NaN
        diffs = {fmt: max(float(np.nan_to_num(np.abs(o - ref), nan=np.inf).max()) for o in outs)
                 for fmt, outs in outputs.items()}
        same_argmax = {fmt: all((o.argmax(-1) == ref.argmax(-1)).all() for o in outs)
                       for fmt, outs in outputs.items()} if classification else {}
        for fmt, d in diffs.items():
            worst[fmt] = max(worst[fmt], d)
        if max(diffs.values()) <= tolerance and all(same_argmax.values()):
            continue
        # the float64 loops only where the bound is in question, once the reference is a function
        again = reference(exp, learned, inner, task)
        if np.abs(again - ref).max() > tolerance:
            raise UsageError(
                "the model's forward is random even in evaluation mode, with dropout off (the same "
                f"task gave outputs {float(np.abs(again - ref).max()):.2e} apart): an adapter "
                "must be a function of its inputs, so remove the other random operations from "
                "the forward")
        noise = task_noise(exp, learned, inner, task, ref)
        if 2 * noise.scale > tolerance:
            ill_conditioned.append({"float32_error": noise.float32_error,
                                    "perturbation_spread": noise.perturbation_spread})
        bound = max(tolerance, 2 * noise.scale)
        passed = passed and max(diffs.values()) <= bound
        for fmt, outs in outputs.items():
            if classification and not same_argmax[fmt]:
                # each query's prediction must be one the inner loop makes within the noise
                ok = all((noise.predictions == o.argmax(-1)).any(0).all() for o in outs)
                argmax_ok[fmt] = argmax_ok[fmt] and ok
    passed = passed and all(argmax_ok.values())
    return {"max_abs_diff": worst, "argmax_equal": argmax_ok if classification else None,
            "tolerance": TOLERANCE, "perturbation": PERTURBATION,
            "one_at_a_time_max_abs_diff": None if transductive else alone_gap,
            "one_at_a_time_tolerance": None if transductive else ALONE_TOLERANCE,
            "ill_conditioned": ill_conditioned, "tasks": len(tasks),
            "support_sizes": sorted({int(t.support_x.shape[1]) for t in tasks}),
            "reference": REFERENCE[routes_through_higher(exp.model, tasks[0])], "passed": passed}
