"""The export, start to end: restore the checkpoint, trace, write each format, verify, commit.

`export_checkpoint` is what `python -m export` runs; it returns the adapter.json it wrote.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import bundle, onnx_format, pt2_format, torchscript_format
from export.decompositions import onnx_decompositions
from export.manifest import FORMATS, INIT, facts, file_names, manifest, onnx_metadata
from export.trace import (
    ENTRY_POINTS,
    Routine,
    compose,
    example_inputs,
    learned_step_sizes,
    routine,
    trace,
)
from export.verify import PERTURBATION, TOLERANCE, sample_tasks, verify
from maml import checkpoint
from maml.adaptation import InnerLoop
from maml.errors import UsageError
from maml.experiment import Experiment, restore
from maml.norms import served_mode

Example = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class VerificationFailed(UsageError):
    """An exported file does not reproduce the training-time inner loop."""


def parse_formats(formats: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    names = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        given = ",".join(names) or "(empty)"
        raise UsageError(f"--formats {given}: choose from {','.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in names)


def example_task(exp: Experiment) -> Example:
    """One test task to trace with: at least 2 support and 2 query examples, in different
    numbers (a size of 1 would be specialised while tracing)."""
    batch = exp.source.sample(1, torch.Generator().manual_seed(0), "test").to("cpu", torch.float32)
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    while sx.shape[0] < 2:
        sx, sy = torch.cat([sx, sx]), torch.cat([sy, sy])
    while qx.shape[0] < 2 or qx.shape[0] == sx.shape[0]:
        qx = torch.cat([qx, qx[:1]])
    return sx, sy, qx


def write_formats(r: Routine, task: Example, formats: tuple[str, ...], folder: Path,
                  metadata: dict[str, str], log: Callable[[str], None]) -> None:
    """Trace each entry point and write it in every chosen format to `folder`."""
    files = file_names(formats)
    onnx_models, graphs = {}, {}
    for entry in ENTRY_POINTS:
        example = example_inputs(r, entry, *task)
        if "torchscript" in formats or "pt2" in formats:
            if entry == "adapt_predict":
                gm = compose(graphs["adapt"], graphs["predict"], len(r.state_names))
            else:
                gm = graphs[entry] = trace(r, entry, example)
            if "torchscript" in formats:
                torchscript_format.save(gm, folder / files["torchscript"][entry])
            if "pt2" in formats:
                pt2_format.save(gm, example, r.input_names(entry), folder / files["pt2"][entry])
        if "onnx" in formats:
            if entry == "adapt_predict":
                model = onnx_format.compose(onnx_models["adapt"], onnx_models["predict"],
                                            r.state_names)
            else:
                gm = trace(r, entry, example, onnx_decompositions())
                model = onnx_format.to_onnx(gm, example, r.input_names(entry),
                                            r.output_names(entry))
            onnx_models[entry] = model
            onnx_format.save(model, folder / files["onnx"][entry], metadata)
        log(f"  {entry}: {', '.join(files[f][entry] for f in formats)}")


def export_checkpoint(
    checkpoint_path: str, out: str, steps: int | None = None, inner_lr: float | None = None,
    formats: str | tuple[str, ...] = FORMATS, check: bool = True, tasks: int = 3, seed: int = 0,
    log: Callable[[str], None] = print, data_root: str | None = None, norm: str | None = None,
) -> dict[str, Any]:
    """Export `checkpoint_path` to the folder `out`; returns the adapter.json written.

    `data_root` replaces the run's Omniglot folder (for the parity check's tasks) when the data
    has moved since training. `norm` serves the model in another normalisation mode than it was
    trained in, where `maml.norms.served_mode` allows it (a transductive model as `support`)."""
    chosen = parse_formats(formats)
    if tasks < 1:
        raise UsageError(f"--tasks must be >= 1, got {tasks}")
    if inner_lr is not None and not (math.isfinite(inner_lr) and inner_lr > 0):
        raise UsageError(f"--inner-lr must be a finite number > 0, got {inner_lr}")
    every_file = [INIT, *(n for per in file_names(FORMATS).values() for n in per.values())]
    bundle.check_target(out, every_file)
    state = checkpoint.load(checkpoint_path)
    if data_root is not None:
        state["config"] = {**state["config"], "data_root": data_root}
    exp = restore(state, checkpoint_path, "cpu")
    trained_norm = exp.cfg.norm or "transductive"
    exp.cfg.norm = served_mode(trained_norm, norm)
    r = routine(exp, steps, inner_lr)
    task = example_task(exp)
    classification = exp.cfg.loss == "cross_entropy"  # (restore checked the output shape)
    n_way = exp.cfg.n_way if classification else None
    learned = learned_step_sizes(exp, inner_lr)
    lr = exp.cfg.inner_lr if inner_lr is None else inner_lr
    inner = InnerLoop(exp.cfg.loss, int(r.step_sizes.shape[0]), lr, norm=r.norm)
    info = facts(exp, r, inner_lr, n_way, list(task[1].shape[1:]), trained_norm)
    with bundle.staging(Path(out), every_file) as folder:
        log(f"exporting {checkpoint_path} ({exp.model_spec}, {inner.steps} steps, "
            f"{'learned step sizes' if learned is not None else f'step size {lr:g}'}"
            + ("" if r.norm == trained_norm else f", {r.norm} normalisation (trained "
                                                 f"{trained_norm})") + f") to {out}")
        write_formats(r, task, chosen, folder, onnx_metadata(info), log)
        np.savez(folder / INIT, **{f"p{i}": p.numpy() for i, p in enumerate(r.init)})
        verification = None
        if check:
            verification = verify(exp, learned, inner, folder, file_names(chosen),
                                  sample_tasks(exp, tasks, seed))
            diffs = ", ".join(f"{f} {d:.2e}" for f, d in verification["max_abs_diff"].items())
            log(f"verified on {verification['tasks']} test tasks (support sizes "
                f"{verification['support_sizes']}): max |difference| to the training-time "
                f"inner loop: {diffs}"
                + "".join(f"; ill-conditioned task: the reference is {e['float32_error']:.2e} "
                          f"from float64, which moves by {e['perturbation_spread']:.2e} when the "
                          f"support moves by {PERTURBATION:g}"
                          for e in verification["ill_conditioned"])
                + ("" if verification["one_at_a_time_max_abs_diff"] is None else
                   "; each query alone against all together: " + ", ".join(
                       f"{f} {d:.2e}" for f, d in
                       verification["one_at_a_time_max_abs_diff"].items())))
            if not verification["passed"]:
                raise VerificationFailed(
                    f"verification failed: max |difference| {diffs} (tolerance {TOLERANCE:g} x the "
                    f"task's largest |output| if over 1, "
                    f"or twice the task's float32 noise on an ill-conditioned task; "
                    f"argmax equal: {verification['argmax_equal']}; one query at a time against "
                    f"all together: {verification['one_at_a_time_max_abs_diff']}, tolerance "
                    f"{verification['one_at_a_time_tolerance']}); nothing was written")
        info = manifest(info, chosen, folder, verification)
        (folder / "adapter.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {out}")
    return info
