"""The reference engine: one task at a time through `higher`'s functional view of the model.

`higher.monkeypatch` turns any `nn.Module` into a functional model `fmodel(x, params=...)`
without touching its layers; the inner loop itself is `maml.adaptation.adapt` with
`torch.autograd.grad`, so the step rule, loss and step sizes are exactly those every other
consumer uses. Second order keeps the graph through the support gradients (`create_graph=True`);
first order drops it. Each task's query loss is back-propagated as soon as it is computed, so
memory holds one task's graph at a time.

An engine offers two functions, with the same meaning in `maml.batched_engine`:
- `meta_gradient(...)`: adds d(mean query loss)/d(meta-parameters) to their `.grad` and returns
  the batch's mean query loss (and accuracy) as tensors, without a host sync;
- `adapt_predict(...)`: adapts to each task (no meta-graph, in `evaluation_mode`) and returns the query
  outputs.
"""

from __future__ import annotations

from contextlib import nullcontext

import higher
import torch
from torch import Tensor, nn

from maml.adaptation import (
    InnerLoop,
    Params,
    adapt,
    autograd_grad,
    check_adaptable,
    evaluation_mode,
    step_size_table,
    task_loss,
    use_batch_statistics,
)
from maml.tasks import TaskBatch


def _forward(model: nn.Module, for_use: bool = False):
    check_adaptable(model)
    use_batch_statistics(model)
    with evaluation_mode(model) if for_use else nullcontext():  # `higher` copies the modes
        fmodel = higher.monkeypatch(model, copy_initial_weights=False)

    def forward(params: Params, x: Tensor) -> Tensor:
        return fmodel(x, params=list(params))

    return forward


def accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Fraction of correct argmax predictions."""
    return (outputs.argmax(dim=-1) == targets).to(outputs.dtype).mean()


def meta_gradient(
    model: nn.Module, learned_lrs: Tensor | None, batch: TaskBatch, inner: InnerLoop
) -> dict[str, Tensor]:
    """Accumulate the MAML meta-gradient of `batch` into `.grad`; return mean loss (and accuracy)."""
    forward = _forward(model)
    params = tuple(model.parameters())
    grad_fn = autograd_grad(create_graph=not inner.first_order)
    losses, accuracies = [], []
    for i in range(len(batch)):
        sx, sy, qx, qy = (t[i] for t in batch.tensors())
        table = step_size_table(
            inner.steps, len(params), inner.lr, learned_lrs, params[0].dtype, params[0].device
        )
        fast = adapt(forward, params, sx, sy, inner.loss, table, grad_fn)
        outputs = forward(fast, qx)
        loss = task_loss(inner.loss, outputs, qy)
        (loss / len(batch)).backward()
        losses.append(loss.detach())
        if inner.loss == "cross_entropy":
            accuracies.append(accuracy(outputs.detach(), qy))
    stats = {"loss": torch.stack(losses).mean()}
    if accuracies:
        stats["accuracy"] = torch.stack(accuracies).mean()
    return stats


def adapt_predict(
    model: nn.Module, learned_lrs: Tensor | None, batch: TaskBatch, inner: InnerLoop
) -> Tensor:
    """Adapt to every task of `batch` and return the query outputs, stacked `(B, Q, ...)`."""
    params = tuple(p.detach().requires_grad_() for p in model.parameters())
    lrs = None if learned_lrs is None else learned_lrs.detach()
    table = step_size_table(
        inner.steps, len(params), inner.lr, lrs, params[0].dtype, params[0].device
    )
    forward = _forward(model, for_use=True)
    outputs = []
    for i in range(len(batch)):
        sx, sy, qx, _ = (t[i] for t in batch.tensors())
        with torch.enable_grad():
            fast = adapt(forward, params, sx, sy, inner.loss, table, autograd_grad(False))
        with torch.no_grad():
            outputs.append(forward(tuple(p.detach() for p in fast), qx))
    return torch.stack(outputs)
