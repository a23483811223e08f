"""Evaluation: adapt to new tasks and measure query accuracy (or MSE) before and after.

The tasks come from a generator with a fixed seed, so every model evaluated with the same seed
sees the same tasks (and the exported adapter can be checked on exactly those tasks).
Reported: the mean over tasks and a 95% confidence interval, 1.96 * std / sqrt(tasks); one task
has no spread to estimate, so its interval is None (not 0, which would claim certainty).
Under torchrun (`ranks`) every rank draws the same tasks and adapts its share of each batch; the
per-task values are summed into one vector on every rank, so the result equals 1 process's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from maml.adaptation import InnerLoop, task_loss
from maml.distributed import SINGLE, Ranks
from maml.errors import UsageError
from maml.tasks import TaskBatch


def task_metric(kind: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-task metric of `(B, Q, ...)` outputs: accuracy for classification, MSE for regression."""
    if kind == "cross_entropy":
        return (outputs.argmax(-1) == targets).double().mean(dim=1)
    return torch.stack([task_loss("mse", o, t) for o, t in zip(outputs, targets)]).double()


def summary(values: Tensor) -> dict[str, float | None]:
    """Mean and 95% confidence interval of per-task values (None for a single task)."""
    n = values.numel()
    ci95 = 1.96 * values.std().item() / math.sqrt(n) if n > 1 else None
    return {"mean": values.mean().item(), "ci95": ci95}


def eval_batches(source, tasks: int, generator: torch.Generator, split: str = "test",
                 batch_size: int = 25) -> Iterator[TaskBatch]:
    """The evaluation tasks, in batches: the same seed gives the same tasks to every consumer,
    whatever its batch size (each task is drawn on its own: a sampler draws a batch's random
    numbers by kind, so drawing 25 at once would give other tasks than 10 + 10 + 5)."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    done = 0
    while done < tasks:
        drawn = [source.sample(1, generator, split) for _ in range(min(batch_size, tasks - done))]
        done += len(drawn)
        yield TaskBatch(*(torch.cat(parts) for parts in zip(*(t.tensors() for t in drawn))))


def evaluate(
    model: nn.Module,
    inner_lrs: Tensor | None,
    source,
    inner: InnerLoop,
    tasks: int,
    generator: torch.Generator,
    split: str = "test",
    batch_size: int = 25,
    adapt_predict: Callable | None = None,
    progress: Callable[[int], None] | None = None,
    ranks: Ranks = SINGLE,
    one_at_a_time: bool = False,
) -> dict:
    """Mean metric with 95% CI over `tasks` new tasks, before and after `inner.steps` steps.

    Each task's queries are predicted together (the MAML paper's protocol); `one_at_a_time` also
    measures them sent one by one, as a deployed adapter is asked (`result["one_at_a_time"]`).
    The two are equal in the `support` normalisation mode (tested), and differ for a
    `transductive` model, which normalises queries with the batch they come in.

    Also returns each task's metric after adaptation (`per_task`), to compare other runtimes
    task by task on the same tasks (`eval_batches` with the same seed).
    """
    if adapt_predict is None:
        from maml.higher_engine import adapt_predict
    first = next(model.parameters())
    values = torch.zeros(3 if one_at_a_time else 2, tasks, dtype=torch.float64,
                         device=first.device)
    zero = InnerLoop(inner.loss, 0, inner.lr, inner.first_order, inner.norm)
    runs = [(zero, False), (inner, False)] + ([(inner, True)] if one_at_a_time else [])
    done = 0
    for batch in eval_batches(source, tasks, generator, split, batch_size):
        lo, hi = ranks.share(len(batch))  # every rank drew the same batch; adapt this rank's part
        if hi > lo:
            mine = batch.chunk(lo, hi).to(batch.support_x.device, first.dtype)
            for row, (loop, each) in enumerate(runs):
                outputs = adapt_predict(model, inner_lrs, mine, loop, one_at_a_time=each)
                values[row, done + lo:done + hi] = task_metric(inner.loss, outputs, mine.query_y)
        done += len(batch)
        if progress is not None:
            progress(len(batch))
    values = ranks.sum(values, "the gathering of evaluation results")
    metric = "accuracy" if inner.loss == "cross_entropy" else "mse"
    per_task = values[1]
    result_after, result_before = summary(per_task), summary(values[0])
    result = {
        "metric": metric, "mean": result_after["mean"], "ci95": result_after["ci95"],
        "before": result_before, "tasks": tasks, "inner_steps": inner.steps, "split": split,
        "norm": inner.norm, "per_task": per_task.tolist(),
    }
    if one_at_a_time:
        result["one_at_a_time"] = summary(values[2])
    return result
