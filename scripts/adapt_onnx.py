"""Adapt an exported ONNX adapter to a new sinusoid task with onnxruntime + numpy only.

    python scripts/adapt_onnx.py ADAPTER_DIR [--shots K] [--seed 0] [--compare CHECKPOINT]

Draws a new sinusoid (amplitude and phase as in training), adapts on `--shots` points (default:
the training shot count) and
prints the query MSE before and after adaptation. `--compare CHECKPOINT` also runs the PyTorch
inner loop (`maml.higher_engine`, with the steps and step sizes recorded in `adapter.json`) on
the same task in a separate process, and prints the largest difference between the two; this
process itself never imports torch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maml.arguments import Parser  # noqa: E402
from maml.errors import UsageError, exit_status, gist  # noqa: E402
from serve import metadata  # noqa: E402  (numpy only)
from serve.validation import Limits, Signature, check_query, check_support  # noqa: E402

REFERENCE = """
import json, sys, numpy as np, torch
from maml import checkpoint
from maml.adaptation import InnerLoop
from maml.experiment import restore
from maml.higher_engine import adapt_predict
from maml.tasks import TaskBatch
ckpt, data, info = sys.argv[1], np.load(sys.argv[2]), json.loads(open(sys.argv[3]).read())
exp = restore(checkpoint.load(ckpt), ckpt, "cpu")
table = torch.tensor(info["step_sizes"], dtype=torch.float32)  # the adapter's own steps
inner = InnerLoop(info["loss"], info["steps"], lr=0.0)
batch = TaskBatch(*(torch.from_numpy(data[k])[None] for k in ("sx", "sy", "qx", "qy")))
print(json.dumps(adapt_predict(exp.model, table, batch, inner)[0].tolist()))
"""


def read_info(folder: Path) -> dict:
    """The adapter's `adapter.json`, checked as the runtime (`serve.load`) checks it."""
    if not (folder / "adapter.json").is_file():
        raise UsageError(f"{folder} has no adapter.json; give the folder written by "
                         "`python -m export --out`")
    info = metadata.read(folder)
    if "onnx" not in info["files"]:
        raise UsageError(f"{folder} has no ONNX files (exported with other --formats); export "
                         "it again with --formats onnx")
    if info.get("data", {}).get("name") != "sinusoid":
        raise UsageError(f"{folder} is a {info.get('data', {}).get('name', 'non-sinusoid')} "
                         "adapter; this script draws sinusoid tasks (use serve.load for others)")
    if "init" not in info:
        raise UsageError(f"{folder / 'adapter.json'} records no init file; export the adapter "
                         "again")
    return info


def session(path: Path) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise UsageError(f"onnxruntime cannot load {path}: {gist(exc)}; export the adapter "
                         "again") from None


def sinusoid_task(rng: np.random.Generator, shots: int, queries: int):
    amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0.0, np.pi)
    x = rng.uniform(-5.0, 5.0, size=(shots + queries, 1)).astype(np.float32)
    y = (amplitude * np.sin(x - phase)).astype(np.float32)
    return x[:shots], y[:shots], x[shots:], y[shots:], amplitude, phase


def parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("adapter")
    p.add_argument("--shots", type=int, default=None, help="default: the training shot count")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", metavar="CHECKPOINT", default=None)
    return p


def run(args: argparse.Namespace) -> None:
    folder = Path(args.adapter)
    info = read_info(folder)
    shots = info["data"]["k_shot"] if args.shots is None else args.shots
    if shots < 1 or args.queries < 1:
        raise UsageError("--shots and --queries must be >= 1")
    limits = Limits()  # what one call of an adapter takes (serve.validation)
    if shots > limits.max_support or args.queries > limits.max_query:
        raise UsageError(f"--shots and --queries must be at most {limits.max_support} and "
                         f"{limits.max_query}, the examples one adapter call takes; got {shots} "
                         f"and {args.queries}")
    files = metadata.entry_files(info, folder, "onnx")
    # a truncated or edited file is refused by its sha256, as serve.load does
    metadata.verify_files(info, {**files, "init": folder / info["init"]})
    sx, sy, qx, qy, amplitude, phase = sinusoid_task(np.random.default_rng(args.seed), shots,
                                                     args.queries)
    sig = Signature.from_metadata(info)  # the checks every runtime makes (serve.validation)
    sx, sy = check_support(sx, sy, sig, limits)
    qx = check_query(qx, sig, limits)
    adapt, predict = session(files["adapt"]), session(files["predict"])
    init = np.load(folder / info["init"])
    init = [init[f"p{i}"] for i in range(len(info["parameters"]))]
    before = predict.run(None, {**_weights(init), "query_x": qx})[0]
    weights = adapt.run(None, {"support_x": sx, "support_y": sy})
    after = predict.run(None, {**_weights(weights), "query_x": qx})[0]
    assert "torch" not in sys.modules
    print(f"new sinusoid: amplitude {amplitude:.2f}, phase {phase:.2f}; {shots} shots, "
          f"{info['steps']} steps (onnxruntime {ort.__version__}, torch not imported)")
    print(f"query MSE before adaptation {np.mean((before - qy) ** 2):.4f}, "
          f"after {np.mean((after - qy) ** 2):.4f}")
    if args.compare:
        data = folder.resolve().parent / f".{folder.name}.task.npz"  # the child runs elsewhere
        np.savez(data, sx=sx, sy=sy, qx=qx, qy=qy)
        try:
            done = subprocess.run(
                [sys.executable, "-c", REFERENCE, str(Path(args.compare).resolve()), str(data),
                 str((folder / "adapter.json").resolve())],
                capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        finally:
            data.unlink(missing_ok=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UsageError(f"--compare {args.compare}: the PyTorch inner loop failed ({last}); "
                             "give the checkpoint this adapter was exported from")
        reference = np.asarray(json.loads(done.stdout.strip().splitlines()[-1]), np.float32)
        print(f"max |difference| to the PyTorch inner loop: {np.abs(after - reference).max():.2e}")


def main() -> int:
    args = parser().parse_args()
    return exit_status(lambda: run(args))


def _weights(values) -> dict[str, np.ndarray]:
    return {f"p{i}": v for i, v in enumerate(values)}


if __name__ == "__main__":
    sys.exit(main())
