"""How an exported classifier's accuracy depends on how its queries are sent.

    python scripts/query_batching.py --adapter ADAPTER_DIR --checkpoint CHECKPOINT
    # 600 tasks of the paper's net: about 4 minutes on a 2-core CPU

A deployed adapter is asked about one image at a time; the MAML paper's protocol sends a whole
task's queries together. This script adapts the exported adapter (with `serve`, the runtime users
run) to each meta-test task of the checkpoint's run once, then predicts the same queries sent:

- `together`: all of the task's queries in one batch (the paper's protocol, what `eval` reports);
- `one at a time`: each query alone, as the runtimes receive them;
- `in random groups of N`: N = the number of classes, in a random order;
- `each alone, with the support set`: each query in one batch with the support images (a
  workaround for transductive adapters; its row is the query's).

A `support` or `tasknorm` adapter gives the same answers in every row; a `transductive` one does
not. Accuracies over the tasks `maml eval --seed` draws, with 95% intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serve  # noqa: E402
from maml import checkpoint as ckpt  # noqa: E402
from maml.arguments import Parser  # noqa: E402
from maml.errors import UsageError, exit_status  # noqa: E402
from maml.evaluation import eval_batches, summary  # noqa: E402
from maml.experiment import restore  # noqa: E402


def batching_rows(adapter_dir: str, checkpoint: str, tasks: int, seed: int,
                  data_root: str | None = None) -> tuple[dict[str, list[float]], str]:
    """Per-task query accuracy for each way of sending the queries, and a line about the run."""
    adapter = serve.load(adapter_dir)
    meta = adapter.metadata
    if meta["task"] != "classification":
        raise UsageError(f"{adapter_dir} is a {meta['task']} adapter; this script measures "
                         "classifiers")
    state = ckpt.load(checkpoint)
    config = dict(state["config"], **({"data_root": data_root} if data_root else {}))
    exp = restore({**state, "config": config}, checkpoint, "cpu")
    if list(exp.source.input_shape) != meta["input"]["shape"] or exp.cfg.n_way != meta["n_way"]:
        raise UsageError(f"{adapter_dir} takes {meta['n_way']}-way tasks of {meta['input']['shape']} "
                         f"inputs, but {checkpoint} draws {exp.cfg.n_way}-way tasks of "
                         f"{list(exp.source.input_shape)}: pass the checkpoint it was exported from")
    n_way, order = meta["n_way"], np.random.default_rng(seed)
    rows: dict[str, list[float]] = {}

    def record(name: str, logits: np.ndarray, qy: np.ndarray) -> None:
        rows.setdefault(name, []).append(float((logits.argmax(-1) == qy).mean()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", serve.TransductiveWarning)  # what this script measures
        for batch in eval_batches(exp.source, tasks, torch.Generator().manual_seed(seed)):
            for sx, sy, qx, qy in zip(*(t.numpy() for t in batch.tensors()), strict=True):
                task = adapter.adapt(sx, sy)
                record("together", np.asarray(task.predict(qx)), qy)
                alone = [np.asarray(task.predict(qx[j:j + 1])) for j in range(len(qx))]
                record("one at a time", np.concatenate(alone), qy)
                grouped = np.empty((len(qx), n_way), dtype=np.float32)
                shuffled = order.permutation(len(qx))
                for start in range(0, len(qx), n_way):
                    part = shuffled[start:start + n_way]
                    grouped[part] = np.asarray(task.predict(qx[part]))
                record(f"in random groups of {n_way}", grouped, qy)
                with_support = [np.asarray(task.predict(np.concatenate([qx[j:j + 1], sx])))[:1]
                                for j in range(len(qx))]
                record("each alone, with the support set", np.concatenate(with_support), qy)
    trained = (meta.get("norm") or {}).get("trained")  # None: exported before it was recorded
    served = adapter.norm + ("" if trained in (None, adapter.norm) else f" (trained {trained})")
    about = (f"{adapter_dir}: {served} normalisation, {meta['steps']} steps; {checkpoint} "
             f"({state['iteration']} iterations): {n_way}-way {exp.cfg.k_shot}-shot, "
             f"{exp.cfg.q_query} queries per class, {tasks} meta-test tasks (seed {seed})")
    return rows, about


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    if args.tasks < 2:
        raise UsageError(f"--tasks must be >= 2 (for an interval), got {args.tasks}")
    if not os.path.isfile(os.path.join(args.adapter, "adapter.json")):
        raise UsageError(f"no adapter at {args.adapter} (a folder from `python -m export`)")
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"no checkpoint at {args.checkpoint}")
    rows, about = batching_rows(args.adapter, args.checkpoint, args.tasks, args.seed,
                                args.data_root)
    results = {name: summary(torch.tensor(v, dtype=torch.float64) * 100)
               for name, v in rows.items()}
    if args.json:
        print(json.dumps({"about": about, "accuracy": results}))
        return results
    print(about)
    print("| how the queries were sent to `predict` | accuracy (95% interval) |")
    print("| --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['mean']:.2f} +- {r['ci95']:.2f}% |")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="a classifier from `python -m export`")
    parser.add_argument("--checkpoint", required=True,
                        help="the run it was exported from (its meta-test tasks are drawn)")
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1234, help="seeds the tasks")
    parser.add_argument("--data-root", default=None,
                        help="the Omniglot data, if it has moved since training")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = parser.parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
