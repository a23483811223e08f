"""The reference engine: one task at a time through `higher`'s functional view of the model.

`higher.monkeypatch` turns any `nn.Module` into a functional model `fmodel(x, params=...)`
without touching its layers; the inner loop itself is `maml.adaptation.adapt` with
`torch.autograd.grad`, so the step rule, loss and step sizes are exactly those every other
consumer uses. Second order keeps the graph through the support gradients (`create_graph=True`);
first order drops it. Each task's query loss is back-propagated as soon as it is computed, so
memory holds one task's graph at a time.

`higher` replaces each layer's parameters with the fast weights; a layer that reads a weight of
another layer itself (as `nn.MultiheadAttention` reads its `out_proj`) keeps the original there,
silently. `routing_problem` checks, once per model, that the functional view gives the outputs
`torch.func.functional_call` gives for the same weights, and names the weights it ignores.

For a conv net on a CPU with several threads, tasks run on `task_workers` threads at once, each
task with one intra-op thread (`_TaskThreads`): small convolutions use two cores better side by
side than split between them. Each thread has its own copy of the model's structure (the functional views swap
weights in place). Every task's gradient is taken alone with `torch.autograd.grad`; each thread
sums its own tasks (w, w + n, ...) in order, and the threads' sums are added in order, so the
result does not depend on timing. A forward that draws random numbers or changes a buffer keeps
the sequential loop (`draws_or_mutates`), so dropout masks stay in the same order and the same
seed gives the same weights.

An engine offers two functions, with the same meaning in `maml.batched_engine`:
- `meta_gradient(...)`: adds d(mean query loss)/d(meta-parameters) to their `.grad` and returns
  the batch's mean query loss (and accuracy) as tensors, without a host sync;
- `adapt_predict(...)`: adapts to each task (no meta-graph, in `evaluation_mode`) and returns the query
  outputs.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import higher
import torch
from torch import Tensor, nn

from maml.adaptation import (
    InnerLoop,
    Params,
    adapt_task,
    autograd_grad,
    check_adaptable,
    evaluation_mode,
    functional_forward,
    step_size_table,
    task_loss,
    twice_differentiable,
    use_batch_statistics,
)
from maml.errors import UsageError, gist
from maml.norms import blend_indices, blends_from, predict
from maml.tasks import TaskBatch

_ROUTING: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


def routing_problem(model: nn.Module, x: Tensor) -> str | None:
    """Which weights `higher`'s functional view of `model` ignores, in words (None: none).

    Both views run on the same perturbed weights and the same random seed, each on its own copy
    of the model (a forward may mutate a buffer); a weight whose change reaches the outputs of
    one view but not the other is named. The answer is kept for the model's lifetime.
    """
    if model in _ROUTING:
        return _ROUTING[model]
    names = [name for name, _ in model.named_parameters()]
    base = [p.detach() for p in model.parameters()]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def nudged(p: Tensor) -> Tensor:
        scale = 0.1 * (p.abs().mean() if p.numel() else 0.0) + 1e-2
        return p + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)

    def outputs(weights: list[Tensor]) -> tuple[Tensor, Tensor]:
        views = []
        for run in (lambda m: higher.monkeypatch(m, copy_initial_weights=False)(x, params=weights),
                    lambda m: torch.func.functional_call(m, dict(zip(names, weights)), (x,))):
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                torch.manual_seed(0)
                views.append(run(copy.deepcopy(model)))
        return views[0], views[1]

    def differs(weights: list[Tensor]) -> bool:
        a, b = outputs(weights)
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False  # not one tensor: the loss names that, whatever the engine
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return False  # diverged weights: nothing to compare; the callers name non-finite
        return not bool(((a - b).norm() <= 1e-4 * b.norm().clamp_min(1e-12)).item())

    with torch.no_grad():
        problem = None
        try:
            wrong = differs([nudged(p) for p in base])
        except Exception as exc:  # higher cannot patch the model, or the model cannot run at all
            # a model that fails through functional_call too fails on any engine: its own error
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                torch.func.functional_call(copy.deepcopy(model), dict(zip(names, base)), (x,))
            problem = f"higher's functional view of it fails ({gist(exc, 160, typed=True)})"
            wrong = False
        if wrong:
            ignored = [n for i, n in enumerate(names)
                       if differs([nudged(p) if j == i else p for j, p in enumerate(base)])]
            shown = ", ".join(ignored[:4]) + (f" and {len(ignored) - 4} more"
                                              if len(ignored) > 4 else "")
            problem = (f"the higher library ignores the adapted values of {shown or 'its weights'} "
                       "(higher keeps the original values of parameters held in an "
                       "nn.ParameterList or nn.ParameterDict, and of a layer's weights that "
                       "another layer reads itself, as nn.MultiheadAttention reads out_proj)")
    _ROUTING[model] = problem
    return problem


def _check_routing(model: nn.Module, x: Tensor, for_use: bool) -> None:
    """`routing_problem` once per model, on its first input."""
    if model not in _ROUTING:
        with evaluation_mode(model) if for_use else nullcontext():
            routing_problem(model, x)


def _forward(model: nn.Module, for_use: bool = False, plain: bool = False):
    if plain:  # the same loop through torch.func.functional_call: no higher, no vmap
        functional = functional_forward(model)

        def plain_forward(params: Params, x: Tensor) -> Tensor:
            with evaluation_mode(model) if for_use else nullcontext():
                return functional(params, x)

        return plain_forward
    check_adaptable(model)
    use_batch_statistics(model)
    with evaluation_mode(model) if for_use else nullcontext():  # `higher` copies the modes
        fmodel = higher.monkeypatch(model, copy_initial_weights=False)

    blends = blend_indices([name for name, _ in model.named_parameters()])  # TaskNorm's

    def forward(params: Params, x: Tensor) -> Tensor:
        _check_routing(model, x, for_use)  # (the engine's calls did, outside any norm mode)
        if _ROUTING[model] is not None:
            raise UsageError(f"the higher engine cannot run this model: {_ROUTING[model]}; use "
                             "--engine batched (or auto)")
        with blends_from(params, blends):
            return fmodel(x, params=list(params))

    return forward


def accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Fraction of correct argmax predictions."""
    return (outputs.argmax(dim=-1) == targets).to(outputs.dtype).mean()


_SIDE_EFFECTS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d)


def draws_or_mutates(model: nn.Module, x: Tensor) -> bool:
    """Whether a training-mode forward of `model` on `x` draws random numbers or changes a buffer
    (run on a copy, the random state restored). Kept for the model's lifetime."""
    if model not in _SIDE_EFFECTS:
        twin = copy.deepcopy(model)
        before = [b.detach().clone() for b in twin.buffers()]
        state = torch.get_rng_state()
        with torch.no_grad():
            twin(x)
        drew = not torch.equal(state, torch.get_rng_state())
        torch.set_rng_state(state)
        _SIDE_EFFECTS[model] = drew or any(
            not torch.equal(a, b) for a, b in zip(before, twin.buffers(), strict=True))
    return _SIDE_EFFECTS[model]


def task_workers(model: nn.Module, batch: TaskBatch) -> int:
    """How many tasks run at once: for a conv net on a CPU, one per intra-op thread (at most one
    per task). One on other devices, for a single task or thread, for a model `draws_or_mutates`,
    and for models without convolutions, whose small operators leave the threads waiting for
    Python's lock (the sinusoid MLP: 73 ms on two task threads, 60 ms one task at a time)."""
    threads = torch.get_num_threads()
    if len(batch) < 2 or threads < 2 or batch.support_x.device.type != "cpu":
        return 1
    if not any(isinstance(m, CONVOLUTIONS) for m in model.modules()):
        return 1
    if draws_or_mutates(model, batch.support_x[0]):
        return 1
    return min(threads, len(batch))


class _TaskThreads:
    """Run a function of every task on `workers` threads; results in task order.

    Each thread gets its own copy of the model's modules, because a functional view swaps
    weights into its modules while it runs; the copies share the original's parameter and buffer
    tensors (no forward here changes a buffer: `draws_or_mutates`), and the weights a forward
    runs on are the ones passed in, so gradients reach the original's parameters. Intra-op
    threads are shared out between the workers while they run."""

    def __init__(self, model: nn.Module, workers: int, make_forward: Callable) -> None:
        self.workers = workers
        self.forwards = [make_forward(model)]
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        for _ in range(workers - 1):
            twin = copy.deepcopy(model, memo=dict(shared))
            if model in _ROUTING:  # the same structure: the original's verdict holds
                _ROUTING[twin] = _ROUTING[model]
            self.forwards.append(make_forward(twin))

    def map(self, task: Callable[[int, int], object], n: int) -> list:
        """`task(worker, i)` for i in range(n); worker `w` takes tasks w, w + workers, ..."""
        if self.workers == 1:
            return [task(0, i) for i in range(n)]

        def run(w: int) -> list:
            return [task(w, i) for i in range(w, n, self.workers)]

        with _intra_op_threads(max(1, torch.get_num_threads() // self.workers)), \
                ThreadPoolExecutor(self.workers) as pool:
            parts = list(pool.map(run, range(self.workers)))
        return [parts[i % self.workers][i // self.workers] for i in range(n)]


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def meta_gradient(
    model: nn.Module, learned_lrs: Tensor | None, batch: TaskBatch, inner: InnerLoop,
    plain: bool = False, workers: int | None = None,
) -> dict[str, Tensor]:
    """Accumulate the MAML meta-gradient of `batch` into `.grad`; return mean loss (and accuracy).

    `plain`: the same loop through `torch.func.functional_call` instead of `higher` (the
    reference `maml.engine_select` holds the batched engine to). `workers`: tasks at once
    (default: `task_workers`' rule).
    """
    if not plain and len(batch):  # before the norm mode's forwards: its probe runs plain layers
        _check_routing(model, batch.support_x[0], for_use=False)
    params = tuple(model.parameters())
    meta = params + (() if learned_lrs is None else (learned_lrs,))
    grad_fn = autograd_grad(create_graph=not inner.first_order)
    workers = task_workers(model, batch) if workers is None else workers

    # the threads' own sums (one task at a time adds straight into .grad instead)
    sums: list[list[Tensor | None]] = [[None] * len(meta) for _ in range(workers if workers > 1 else 0)]

    def one_task(w: int, i: int):
        forward = threads.forwards[w]
        sx, sy, qx, qy = (t[i] for t in batch.tensors())
        table = step_size_table(
            inner.steps, len(params), inner.lr, learned_lrs, params[0].dtype, params[0].device
        )
        fast, moments = adapt_task(forward, params, sx, sy, inner.loss, table, grad_fn,
                                   inner.norm)
        outputs = predict(forward, fast, moments, qx, inner.norm)
        loss = task_loss(inner.loss, outputs, qy)
        if workers == 1:  # straight into .grad: one task's graph alive at a time
            (loss / len(batch)).backward()
        else:  # each worker sums its own tasks in order; the workers are added in order below
            grads = torch.autograd.grad(loss / len(batch), meta, allow_unused=True)
            sums[w] = [g if s is None else s if g is None else s.add_(g)
                       for s, g in zip(sums[w], grads, strict=True)]
        acc = accuracy(outputs.detach(), qy) if inner.loss == "cross_entropy" else None
        return loss.detach(), acc

    with twice_differentiable(inner):  # attention's fused kernels: no second derivative
        threads = _TaskThreads(model, workers, lambda m: _forward(m, plain=plain))
        results = threads.map(one_task, len(batch))
    if workers > 1:
        for grads in sums:
            for t, g in zip(meta, grads, strict=True):
                if g is not None:
                    t.grad = g if t.grad is None else t.grad.add_(g)
    stats = {"loss": torch.stack([r[0] for r in results]).mean()}
    if inner.loss == "cross_entropy" and len(results):
        stats["accuracy"] = torch.stack([r[1] for r in results]).mean()
    return stats


def adapt_predict(
    model: nn.Module, learned_lrs: Tensor | None, batch: TaskBatch, inner: InnerLoop,
    plain: bool = False, one_at_a_time: bool = False, workers: int | None = None,
) -> Tensor:
    """Adapt to every task of `batch` and return the query outputs, stacked `(B, Q, ...)`.

    `one_at_a_time`: predict each query alone (as a deployed adapter is asked), not all of a
    task's queries in one batch; the same outputs unless the mode is `transductive`.
    `plain`, `workers`: as for `meta_gradient`."""
    check_adaptable(model)
    params = tuple(p.detach().requires_grad_() for p in model.parameters())
    lrs = None if learned_lrs is None else learned_lrs.detach()
    table = step_size_table(
        inner.steps, len(params), inner.lr, lrs, params[0].dtype, params[0].device
    )
    if not plain and len(batch):
        _check_routing(model, batch.support_x[0], for_use=True)
    workers = task_workers(model, batch) if workers is None else workers

    def one_task(w: int, i: int) -> Tensor:
        forward = threads.forwards[w]
        sx, sy, qx, _ = (t[i] for t in batch.tensors())
        with torch.enable_grad():
            fast, moments = adapt_task(forward, params, sx, sy, inner.loss, table,
                                       autograd_grad(False), inner.norm)
        fast, moments = tuple(p.detach() for p in fast), tuple(m.detach() for m in moments)
        groups = qx.split(1) if one_at_a_time else (qx,)
        with torch.no_grad():
            return torch.cat([predict(forward, fast, moments, q, inner.norm) for q in groups])

    with evaluation_mode(model):  # the copies take their modes from the original
        threads = _TaskThreads(model, workers, lambda m: _forward(m, for_use=True, plain=plain))
        # `_forward(..., for_use=True)` puts each copy in evaluation mode while it runs
        outputs = threads.map(one_task, len(batch))
    return torch.stack(outputs)
