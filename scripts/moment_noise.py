"""What a `support` adapter's batch-norm moments cost: the same queries, normalised with moments
taken from more or fewer images.

    python scripts/moment_noise.py --checkpoint tests/fixtures/page_omniglot_5w1s.pt
    # 300 tasks: under a minute on a 2-core CPU (25 s for this 32-channel net, 40 s for the paper's)

A `support` adapter normalises every query with its support set's per-channel mean and variance
under the adapted weights (`maml/norms.py`): in 5-way 1-shot, five images. A transductive one
normalises a whole task's queries with their own batch's (75 images here). This script adapts a
checkpoint to each meta-test task once, then predicts the same queries with the moments of:

- `support`: the support set (what the `support` mode ships; one query at a time gives the same
  answers);
- `query batch`: the queries themselves (the `transductive` mode; needs the queries together);
- `support + all queries`: the support set and the queries pooled. No deployed adapter has these
  images; the row shows what better-estimated moments are worth;
- `support, layer k pooled`: the support set's moments except batch-norm layer k's, which come
  from the pool: which layer's estimate costs the most;
- `support + rotated copies`, `support + mirrored copies`: the support set with its images turned
  by 90, 180 and 270 degrees, or flipped left to right: more images, but no new drawings.

With `--extra-per-class K` the first K queries of each class are set aside as unlabelled images
of the task, never predicted: every row is then measured on the remaining queries, and rows
`support + j more images per class` (j = 1..K) show what real extra drawings are worth.

Accuracies over the same tasks, with 95% intervals (the tasks `maml eval --seed` draws).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maml import checkpoint as ckpt  # noqa: E402
from maml.adaptation import (  # noqa: E402
    adapt_task,
    autograd_grad,
    evaluation_mode,
    functional_forward,
    step_size_table,
)
from maml.arguments import Parser  # noqa: E402
from maml.errors import UsageError, exit_status  # noqa: E402
from maml.evaluation import eval_batches, summary  # noqa: E402
from maml.experiment import restore  # noqa: E402
from maml.norms import has_batch_norm, predict, support_moments  # noqa: E402


def held_out(qy: torch.Tensor, n_way: int, k: int) -> torch.Tensor:
    """A mask of the queries set aside as unlabelled images: the first `k` of each class."""
    mask = torch.zeros(len(qy), dtype=torch.bool)
    for c in range(n_way):
        mask[torch.nonzero(qy == c).flatten()[:k]] = True
    return mask


def moment_rows(path: str, tasks: int, steps: int | None, seed: int, data_root: str | None,
                extra_per_class: int = 0) -> tuple[dict[str, list[float]], str]:
    """Per-task query accuracy for each source of moments, and a line describing the run."""
    state = ckpt.load(path)
    config = dict(state["config"], **({"data_root": data_root} if data_root else {}))
    exp = restore({**state, "config": config}, path, "cpu")
    cfg, model = exp.cfg, exp.model
    if cfg.dataset != "omniglot":
        raise UsageError(f"{path} is a {cfg.dataset} run; this script measures classifiers with "
                         "batch norm (an Omniglot checkpoint)")
    if cfg.norm == "tasknorm":
        raise UsageError(f"{path} was trained with --norm tasknorm, whose queries blend the support "
                         "moments with their own; this script measures support and transductive "
                         "runs")
    if not has_batch_norm(model):
        raise UsageError(f"the model in {path} has no batch norm: its queries are already "
                         "normalised on their own")
    if not 0 <= extra_per_class < cfg.q_query:
        raise UsageError(f"--extra-per-class must be between 0 and {cfg.q_query - 1} (the run "
                         f"has {cfg.q_query} queries per class), got {extra_per_class}")
    forward = functional_forward(model)
    params = tuple(p.detach().requires_grad_() for p in model.parameters())
    inner = cfg.inner_loop(cfg.eval_inner_steps if steps is None else steps)
    lrs = None if exp.inner_lrs is None else exp.inner_lrs.detach()
    table = step_size_table(inner.steps, len(params), inner.lr, lrs, params[0].dtype,
                            params[0].device)
    rows: dict[str, list[float]] = {}
    with evaluation_mode(model):
        for batch in eval_batches(exp.source, tasks, torch.Generator().manual_seed(seed)):
            for sx, sy, qx, qy in zip(*batch.tensors(), strict=True):
                with torch.enable_grad():  # the inner loop in the checkpoint's own mode
                    fast, _ = adapt_task(forward, params, sx, sy, inner.loss, table,
                                         autograd_grad(False), inner.norm)
                with torch.no_grad():
                    fast = tuple(p.detach() for p in fast)
                    aside = held_out(qy, cfg.n_way, extra_per_class)
                    extra, extra_y = qx[aside], qy[aside]
                    qx, qy = qx[~aside], qy[~aside]
                    mine = support_moments(forward, fast, sx, "support")
                    pool = support_moments(forward, fast, torch.cat([sx, qx]), "support")
                    tried = {"support": mine, "query batch": None, "support + all queries": pool}
                    for k in range(len(mine) // 2):
                        tried[f"support, layer {k} pooled"] = (
                            *mine[:2 * k], *pool[2 * k:2 * k + 2], *mine[2 * k + 2:])
                    turned = [torch.rot90(sx, k, dims=(-2, -1)) for k in range(4)]
                    tried["support + rotated copies"] = support_moments(
                        forward, fast, torch.cat(turned), "support")
                    tried["support + mirrored copies"] = support_moments(
                        forward, fast, torch.cat([sx, sx.flip(-1)]), "support")
                    for j in range(1, extra_per_class + 1):
                        more = extra[held_out(extra_y, cfg.n_way, j)]
                        tried[f"support + {j} more images per class"] = support_moments(
                            forward, fast, torch.cat([sx, more]), "support")
                    for name, moments in tried.items():
                        out = (forward(fast, qx) if moments is None
                               else predict(forward, fast, moments, qx, "support"))
                        rows.setdefault(name, []).append(
                            (out.argmax(-1) == qy).double().mean().item())
    predicted = (f"{cfg.q_query} queries per class" if not extra_per_class else
                 f"{cfg.q_query - extra_per_class} of {cfg.q_query} queries per class predicted, "
                 f"{extra_per_class} set aside")
    about = (f"{path}: trained with --norm {cfg.norm} for {state['iteration']} iterations; "
             f"{cfg.n_way}-way {cfg.k_shot}-shot, {predicted}, {inner.steps} steps, "
             f"{tasks} meta-test tasks (seed {seed})")
    return rows, about


def run(args: argparse.Namespace) -> None:
    if args.tasks < 2:
        raise UsageError(f"--tasks must be >= 2 (for an interval), got {args.tasks}")
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"no checkpoint at {args.checkpoint}")
    rows, about = moment_rows(args.checkpoint, args.tasks, args.inner_steps, args.seed,
                              args.data_root, args.extra_per_class)
    print(about)
    print("| queries normalised with the moments of | accuracy (95% interval) |")
    print("| --- | --- |")
    for name, values in rows.items():
        r = summary(torch.tensor(values, dtype=torch.float64))
        print(f"| {name} | {100 * r['mean']:.2f} +- {100 * r['ci95']:.2f}% |")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="an Omniglot run from `maml train`")
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--inner-steps", type=int, default=None,
                        help="adaptation steps (default: the run's --eval-inner-steps)")
    parser.add_argument("--seed", type=int, default=1234, help="seeds the tasks")
    parser.add_argument("--extra-per-class", type=int, default=0, metavar="K",
                        help="set the first K queries of each class aside as unlabelled images "
                             "and add rows for the support set with 1..K of them")
    parser.add_argument("--data-root", default=None,
                        help="the Omniglot data, if it has moved since training")
    args = parser.parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
