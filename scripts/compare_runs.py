"""Two runs on the same meta-test tasks, task by task: is B better than A, or is it noise?

    python scripts/compare_runs.py --a runs/support.pt --b runs/tasknorm.pt --tasks 600
    # 600 Omniglot tasks: 1-3 minutes on a 2-core CPU for the 32-channel net

Each run is adapted to the same tasks (`maml eval --seed` draws them) with its own inner loop
(steps, step sizes, normalisation mode) and scored with its queries sent together, as `maml eval`
reports `mean`. Two intervals of `maml eval` overlap long after a difference is real, because
most of their width is which tasks were drawn, and both runs saw the same ones. The paired
difference removes that: its interval is the one to read. Runs that would draw different tasks
(another dataset, way, shot or character split) are refused: they cannot be paired.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maml import checkpoint as ckpt  # noqa: E402
from maml.arguments import Parser  # noqa: E402
from maml.errors import UsageError, exit_status  # noqa: E402
from maml.evaluation import eval_batches, evaluate, summary  # noqa: E402
from maml.experiment import Experiment, restore  # noqa: E402
from maml.training import select_engine  # noqa: E402


def load(path: str, data_root: str | None) -> Experiment:
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    state = ckpt.load(path)
    config = dict(state["config"], **({"data_root": data_root} if data_root else {}))
    return restore({**state, "config": config}, path, "cpu")


def same_tasks(a: Experiment, b: Experiment, tasks: int, seed: int) -> bool:
    """Whether the two runs' task sources draw exactly the same tasks for this seed."""
    pairs = zip(eval_batches(a.source, tasks, torch.Generator().manual_seed(seed)),
                eval_batches(b.source, tasks, torch.Generator().manual_seed(seed)))
    return all(len(x.tensors()) == len(y.tensors()) and all(
        u.shape == v.shape and torch.equal(u, v) for u, v in zip(x.tensors(), y.tensors()))
        for x, y in pairs)


def per_task(exp: Experiment, tasks: int, seed: int) -> torch.Tensor:
    engine = select_engine(exp.cfg.engine, exp.cfg)
    result = evaluate(exp.model, exp.inner_lrs, exp.source,
                      exp.cfg.inner_loop(exp.cfg.eval_inner_steps), tasks,
                      torch.Generator().manual_seed(seed), adapt_predict=engine.adapt_predict)
    return torch.tensor(result["per_task"], dtype=torch.float64)


def compare(path_a: str, path_b: str, tasks: int, seed: int,
            data_root: str | None = None) -> dict:
    """Per-run means and the paired difference B - A (with its 95% interval), in the metric's
    units; `b_better` / `a_better` count the tasks where one run scored better."""
    a, b = load(path_a, data_root), load(path_b, data_root)
    if a.cfg.loss != b.cfg.loss:
        raise UsageError(f"{path_a} is scored by {a.cfg.loss} and {path_b} by {b.cfg.loss}: "
                         "compare runs of the same kind of task")
    if not same_tasks(a, b, tasks, seed):
        raise UsageError(f"{path_a} and {path_b} draw different meta-test tasks (another dataset, "
                         "way, shot, query count or character split): compare their `maml eval` "
                         "results instead")
    va, vb = per_task(a, tasks, seed), per_task(b, tasks, seed)
    higher_is_better = a.cfg.loss == "cross_entropy"
    diff = vb - va
    better = diff > 0 if higher_is_better else diff < 0
    worse = diff < 0 if higher_is_better else diff > 0
    paired = summary(diff)
    return {"metric": "accuracy" if higher_is_better else "mse", "tasks": tasks, "seed": seed,
            "a": {"checkpoint": path_a, **summary(va)}, "b": {"checkpoint": path_b, **summary(vb)},
            "b_minus_a": paired["mean"], "ci95": paired["ci95"],
            "b_better": int(better.sum()), "a_better": int(worse.sum())}


def run(args: argparse.Namespace) -> None:
    if args.tasks < 2:
        raise UsageError(f"--tasks must be >= 2 (for an interval), got {args.tasks}")
    r = compare(args.a, args.b, args.tasks, args.seed, args.data_root)
    if args.json:
        print(json.dumps(r))
        return
    scale, unit = (100, " points") if r["metric"] == "accuracy" else (1, "")
    print(f"{r['tasks']} meta-test tasks (seed {r['seed']}), {r['metric']}, queries together:")
    for key in ("a", "b"):
        print(f"  {key}: {scale * r[key]['mean']:.4g} +- {scale * r[key]['ci95']:.2g}  "
              f"{r[key]['checkpoint']}")
    print(f"  b - a, task by task: {scale * r['b_minus_a']:+.3g} +- {scale * r['ci95']:.2g}{unit} "
          f"(95%); b better on {r['b_better']} tasks, a on {r['a_better']}")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="a run from `maml train` (the baseline)")
    parser.add_argument("--b", required=True, help="the run to compare with it")
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1234, help="seeds the tasks, as `maml eval`")
    parser.add_argument("--data-root", default=None,
                        help="the Omniglot data, if it has moved since training")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
