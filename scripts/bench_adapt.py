"""Adapt + predict latency of one task through every way of running the adaptation routine.

    python scripts/bench_adapt.py [--models cnn,maxpool] [--steps 1,3,5] [--repeats 30]

For each model (the paper's strided Omniglot net `cnn`, the max-pool net `maxpool`, full width)
and step count: a 5-way 1-shot Omniglot test task with 75 queries, adapted and predicted by
- eager PyTorch: `maml.adaptation.adapt` with `torch.autograd.grad`, then the query forward;
- `higher`: `maml.higher_engine.adapt_predict` (the training-time engine);
- the exported TorchScript, `.pt2` and ONNX (onnxruntime) `adapt_predict` files.
Each cell is the median of `--repeats` runs after `--warmup` runs, the engines measured
round-robin so that load from other processes on a shared CPU hits them alike. The weights
come from a 1-iteration checkpoint (latency does not depend on them). Prints a markdown table
and writes `benchmarks/adapt_latency.json`. CPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.build import VerificationFailed, export_checkpoint  # noqa: E402
from maml import checkpoint  # noqa: E402
from maml.__main__ import main as maml_main  # noqa: E402
from maml.adaptation import adapt, autograd_grad, functional_forward, step_size_table  # noqa: E402
from maml.arguments import Parser, whole_numbers, writable_file  # noqa: E402
from maml.errors import UsageError, exit_status  # noqa: E402
from maml.experiment import restore  # noqa: E402
from maml.higher_engine import adapt_predict  # noqa: E402

ENGINES = ("eager", "higher", "torchscript", "pt2", "onnxruntime")
NETS = ("cnn", "maxpool", "convnet")  # maml.models' Omniglot networks


def interleaved_ms(fns: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of each function, measured round-robin (one call of each per
    round) so that a noisy, shared CPU slows every engine alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def bench_model(model: str, steps_list: list[int], folder: Path, warmup: int, repeats: int,
                data_root: str) -> list[dict]:
    ckpt = folder / f"{model}.pt"
    if not ckpt.is_file():
        code = maml_main(["train", "--dataset", "omniglot", "--model", model, "--iterations",
                          "1", "--meta-batch-size", "1", "--val-tasks", "1", "--q-query", "15",
                          "--data-root", data_root, "--checkpoint", str(ckpt), "--quiet"])
        if code != 0:  # maml has said why, in one line
            raise SystemExit(code)
    exp = restore(checkpoint.load(ckpt), str(ckpt), "cpu")
    batch = exp.source.sample(1, torch.Generator().manual_seed(0), "test")
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    assert sx.shape[0] == 5 and qx.shape[0] == 75
    forward = functional_forward(exp.model)
    params = tuple(p.detach().requires_grad_() for p in exp.model.parameters())
    rows = []
    for steps in steps_list:
        out = folder / f"{model}-{steps}"
        failed = None
        if not (out / "adapter.json").is_file():  # reuse the adapters of an earlier run
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    export_checkpoint(str(ckpt), str(out), steps=steps, tasks=1,
                                      log=lambda s: None)
                except VerificationFailed as exc:  # time the formats that pass, report the rest
                    failed = str(exc)
                    export_checkpoint(str(ckpt), str(out), steps=steps, tasks=1,
                                      formats="torchscript,pt2", log=lambda s: None)
        has_onnx = (out / "adapt_predict.onnx").is_file()
        table = step_size_table(steps, len(params), exp.cfg.inner_lr)
        inner = exp.cfg.inner_loop(steps)

        def eager(table=table):
            fast = adapt(forward, params, sx, sy, "cross_entropy", table, autograd_grad(False))
            with torch.no_grad():
                return forward(tuple(p.detach() for p in fast), qx)

        def higher_engine(inner=inner):
            return adapt_predict(exp.model, None, batch, inner)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = torch.jit.load(str(out / "adapt_predict.ts"))
            pt2 = torch.export.load(str(out / "adapt_predict.pt2")).module()
        session = ort.InferenceSession(str(out / "adapt_predict.onnx"),
                                       providers=["CPUExecutionProvider"]) if has_onnx else None
        feeds = {"support_x": sx.numpy(), "support_y": sy.numpy(), "query_x": qx.numpy()}

        def no_grad(module):
            def run():
                with torch.no_grad():
                    return module(sx, sy, qx)
            return run

        fns = {"eager": eager, "higher": higher_engine, "torchscript": no_grad(ts),
               "pt2": no_grad(pt2), "onnxruntime": lambda s=session, f=feeds: s.run(None, f)}
        if not has_onnx:
            del fns["onnxruntime"]
        reference = higher_engine().numpy()[0]
        row = {"model": model, "steps": steps, "ms": {}, "min_ms": {}, "max_abs_diff": {},
               "export_error": failed}
        for name, fn in fns.items():
            result = fn()
            result = result[0] if isinstance(result, list) else result
            result = result.detach().numpy() if isinstance(result, torch.Tensor) else result
            result = result[0] if result.ndim == 3 else result
            row["max_abs_diff"][name] = float(np.abs(result - reference).max())
        for name, times in interleaved_ms(fns, warmup, repeats).items():
            row["ms"][name], row["min_ms"][name] = statistics.median(times), min(times)
        rows.append(row)
        print(markdown_row(row), flush=True)
    return rows


def markdown_row(row: dict) -> str:
    cells = " | ".join(f"{row['ms'][e]:.1f}" if e in row["ms"] else "fails parity"
                       for e in ENGINES)
    return f"| {row['model']} | {row['steps']} | {cells} |"


def header() -> str:
    return ("| model | steps | " + " | ".join(f"{e} (ms)" for e in ENGINES) + " |\n"
            "|---|---:|" + "---:|" * len(ENGINES))


def parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cnn,maxpool",
                   help=f"comma-separated: {', '.join(NETS)} or package.module:factory")
    p.add_argument("--steps", default="1,3,5", help="comma-separated inner-loop step counts")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "omniglot"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "adapt_latency.json"))
    p.add_argument("--work", default=None,
                   help="folder for the checkpoints and adapters, reused if present "
                        "(default: a temporary folder)")
    return p


def check_args(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """The models and step counts; a UsageError for what would fail later, results unsaved."""
    models = args.models.split(",")
    unknown = [m for m in models if m not in NETS and ":" not in m]
    if unknown:
        raise UsageError(f"--models: {unknown[0]!r} is not an Omniglot network; choose from "
                         f"{', '.join(NETS)} (or give package.module:factory)")
    steps = whole_numbers(args.steps, "--steps", "1,3,5")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1 (each cell is the median of that many runs), "
                         f"got {args.repeats}")
    writable_file(Path(args.out), "--out")
    if args.work:
        try:
            Path(args.work).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--work {args.work} cannot be made a folder ({exc.strerror}); "
                             "choose another --work") from None
    return models, steps


def run(args: argparse.Namespace) -> None:
    models, steps = check_args(args)
    print(f"5-way 1-shot Omniglot, 75 queries, adapt+predict, median of {args.repeats} after "
          f"{args.warmup} warm-up runs; CPU: {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(header())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        for model in models:
            rows += bench_model(model, steps, work, args.warmup, args.repeats, args.data_root)
    out = Path(args.out)
    out.write_text(json.dumps({
        "task": "omniglot 5-way 1-shot, 75 queries", "device": "cpu",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "warmup": args.warmup, "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> int:
    args = parser().parse_args()
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
