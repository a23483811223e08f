"""The batched engine: every task of a meta-batch at once, with `torch.func`.

The inner loop is `maml.adaptation.adapt` (the one definition of adaptation), run for all tasks
together by `torch.func.vmap`, with a `GradFn` built on `torch.func.grad`; the forward is
`torch.func.functional_call` of the user's module. One meta-iteration is a step
`step(params, lrs, support, query) -> (gradients, loss, accuracy)` (`meta_step_fn`) whose outer
gradient, of the mean query loss with respect to the weights (and learned step sizes), is taken
one of two ways, with the same float64 result:

- eagerly, by `torch.autograd.grad` of the vmapped tasks' loss (ordinary autograd through the
  inner `torch.func.grad`): faster than `torch.func.grad` of the `vmap` (measured 1.3x on the
  sinusoid MLP on a CPU);
- with `compile` or `cuda_graphs`, by `torch.func.grad`, so that the step is one pure function
  that `torch.compile` and CUDA graphs take whole. Nothing in it breaks the graph: the TaskNorm
  context of `maml.norms.blends_from` (a context variable, which compilation cannot trace) is
  entered only by models with TaskNorm parameters (`batched_forward`), and the modes below only
  where needed.

The same API as `maml.higher_engine`: `meta_gradient` adds to `.grad` and returns the mean loss
(and accuracy) as tensors without a host sync; `adapt_predict` returns the adapted query outputs.

Exactness: the tasks run under `maml.exact_norms.ExactNorms`, because `vmap` of `grad` through
PyTorch's fused normalisation kernels gives wrong second-order gradients, and under
`maml.plain_recurrent.PlainRecurrent`, because the fused recurrent operators cannot be batched.
Both are `TorchFunctionMode`s, which cost a Python call per operation, so each is entered only
where the forward calls a function it reroutes: the first time a step (or prediction) meets a
model, inner loop and per-task shapes, one task goes through it inside both modes, each records
whether it saw such a call, and the step keeps only those that did (`needed`). The decision is
what the forward calls, not which modules the model has: a hand-written `F.batch_norm` counts.
A mode left out would only have passed every call through, so the result is the same.

Memory: a meta-batch can be run in chunks of `task_chunk` tasks, accumulating the gradient (the
result is the same meta-gradient). With `task_chunk=None` the chunk is sized on the first batch
to keep the step's peak memory under `memory_budget_mb` (see `BatchedEngine._size_chunks`).
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from maml.adaptation import (
    Forward,
    GradFn,
    InnerLoop,
    Params,
    adapt_task,
    evaluation_mode,
    functional_forward,
    step_size_table,
    task_loss,
    twice_differentiable,
)
from maml.exact_norms import ExactNorms
from maml.norms import blend_indices
from maml.norms import predict as norm_predict
from maml.plain_recurrent import PlainRecurrent
from maml.tasks import TaskBatch


def func_grad(first_order: bool) -> GradFn:
    """A `GradFn` from `torch.func.grad` (composes with `vmap`); first order cuts the graph."""

    def grad(loss_of: Callable[[Params], Tensor], params: Params) -> Params:
        grads = torch.func.grad(loss_of)(params)
        return tuple(g.detach() for g in grads) if first_order else grads

    return grad


def _accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs.argmax(dim=-1) == targets).to(outputs.dtype).mean()


Modes = tuple[TorchFunctionMode, ...]


def all_modes() -> Modes:
    """Fresh instances of every mode the batched forward may need (each records what it saw)."""
    return (ExactNorms(), PlainRecurrent())


def _under(modes: Modes, run: Callable, *args):
    """`run(*args)` inside `modes` (entered in order); without modes, a plain call."""
    if not modes:
        return run(*args)
    with modes[0]:
        return _under(modes[1:], run, *args)


def batched_forward(model: nn.Module) -> Forward:
    """`maml.adaptation.functional_forward`, less the TaskNorm context where there is no TaskNorm.

    `functional_forward` enters `maml.norms.blends_from` on every call, which sets a context
    variable that `torch.compile` cannot trace (a graph break that left the compiled step
    eager). Without TaskNorm parameters that context holds nothing any layer reads, so the same
    `functional_call` runs without it.
    """
    forward = functional_forward(model)  # its checks and MAML's batch-norm convention
    names = [name for name, _ in model.named_parameters()]
    if blend_indices(names):
        return forward

    def plain(params: Params, x: Tensor) -> Tensor:
        return torch.func.functional_call(model, dict(zip(names, params)), (x,))

    return plain


def meta_step_fn(
    model: nn.Module, inner: InnerLoop, learned: bool, modes: Modes | None = None,
    outer: str = "func",
) -> Callable:
    """The pure meta-gradient step of one chunk of tasks.

    `step(params, lrs, sx, sy, qx, qy, total) -> (param_grads, lr_grads, loss_sum, acc_sum)`:
    the gradient of (sum of the chunk's query losses) / `total`, so that chunks of one meta-batch
    of `total` tasks add up to the gradient of its mean loss. `lr_grads` is None without learned
    step sizes; `acc_sum` is zero for regression.

    The tasks run under `vmap` inside `modes` (default: `all_modes()`). The outer gradient is
    `torch.func.grad` of the chunk loss (`outer="func"`: one pure function, for `torch.compile`
    and CUDA graphs) or `torch.autograd.grad` of it (`outer="autograd"`: faster eagerly, the
    same float64 meta-gradient).
    """
    forward = batched_forward(model)
    grad_fn = func_grad(inner.first_order)
    classify = inner.loss == "cross_entropy"
    modes = all_modes() if modes is None else modes

    def one_task(params: Params, table: Tensor, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        fast, moments = adapt_task(forward, params, sx, sy, inner.loss, table, grad_fn, inner.norm)
        outputs = norm_predict(forward, fast, moments, qx, inner.norm)
        loss = task_loss(inner.loss, outputs, qy)
        acc = _accuracy(outputs, qy) if classify else torch.zeros_like(loss)
        return loss, acc

    tasks = torch.func.vmap(one_task, in_dims=(None, None, 0, 0, 0, 0))

    def chunk_loss(params: Params, lrs: Tensor | None, sx, sy, qx, qy, total: int):
        table = step_size_table(
            inner.steps, len(params), inner.lr, lrs, params[0].dtype, params[0].device
        )
        losses, accs = _under(modes, tasks, params, table, sx, sy, qx, qy)
        return losses.sum() / total, (losses.detach().sum(), accs.detach().sum())

    if outer == "autograd":

        def autograd_step(params: Params, lrs: Tensor | None, sx, sy, qx, qy, total: int):
            params = tuple(p.detach().requires_grad_() for p in params)
            lrs = None if lrs is None else lrs.detach().requires_grad_()
            with torch.enable_grad():
                loss, (loss_sum, acc_sum) = chunk_loss(params, lrs, sx, sy, qx, qy, total)
                grads = torch.autograd.grad(  # materialize: unused parameters get zeros
                    loss, (*params, *([] if lrs is None else [lrs])), materialize_grads=True
                )
            lr_grads = grads[-1] if learned else None
            return grads[: len(params)], lr_grads, loss_sum, acc_sum

        return autograd_step
    if outer != "func":
        raise ValueError(f"unknown outer gradient {outer!r}; expected 'func' or 'autograd'")

    argnums = (0, 1) if learned else 0
    grad_of = torch.func.grad(chunk_loss, argnums=argnums, has_aux=True)

    def step(params: Params, lrs: Tensor | None, sx, sy, qx, qy, total: int):
        grads, (loss_sum, acc_sum) = grad_of(params, lrs, sx, sy, qx, qy, total)
        if learned:
            return grads[0], grads[1], loss_sum, acc_sum
        return grads, None, loss_sum, acc_sum

    return step


def predict_fn(
    model: nn.Module, inner: InnerLoop, one_at_a_time: bool = False, modes: Modes | None = None
) -> Callable:
    """`predict(params, table, sx, sy, qx) -> (B, Q, ...)`: adapt each task, predict its queries
    (all together, or `one_at_a_time`), inside `modes` (default: `all_modes()`)."""
    forward = batched_forward(model)
    grad_fn = func_grad(first_order=True)
    modes = all_modes() if modes is None else modes

    def one_task(params: Params, table: Tensor, sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
        fast, moments = adapt_task(forward, params, sx, sy, inner.loss, table, grad_fn,
                                   inner.norm)
        groups = qx.split(1) if one_at_a_time else (qx,)
        return torch.cat([norm_predict(forward, fast, moments, q, inner.norm) for q in groups])

    batched = torch.func.vmap(one_task, in_dims=(None, None, 0, 0, 0))

    def predict(params: Params, table: Tensor, sx, sy, qx) -> Tensor:
        return _under(modes, batched, params, table, sx, sy, qx)

    return predict


def needed(modes: Modes) -> Modes:
    """Those of `modes` (after a run inside them) that saw one of the functions they reroute.
    The others would only pass every call through, at the cost of a Python call per operation:
    leaving them out changes no result."""
    return tuple(mode for mode in modes if mode.seen)


def _layout(model: nn.Module, tensors: tuple[Tensor, ...]) -> tuple:
    """What decides which functions a forward calls: per-task shapes, dtypes and devices, and
    every module's training flag."""
    return (tuple((t.shape[1:], t.dtype, t.device) for t in tensors),
            tuple(m.training for m in model.modules()))


def chunk_bounds(total: int, chunk: int) -> list[tuple[int, int]]:
    """Split `total` tasks into balanced chunks of at most `chunk` (sizes differ by at most 1)."""
    n = math.ceil(total / max(1, min(chunk, total)))
    base, extra = divmod(total, n)
    bounds, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _add_grad(p: Tensor, g: Tensor) -> None:
    if p.grad is None:
        p.grad = g.detach().clone()
    else:
        p.grad.add_(g)


class _PeakMemory:
    """Peak memory of a block: CUDA from the allocator, CPU from the process's peak RSS (Linux)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @property
    def available(self) -> bool:
        if self.device.type == "cuda":
            return True
        try:  # the peak-RSS reset needs Linux and a writable /proc/self/clear_refs
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _rss_kb(self, key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
        raise RuntimeError(f"{key} not in /proc/self/status")

    def measure(self, run: Callable[[], None]) -> int:
        """Bytes the block adds at its peak over what was resident when it started.

        On CPU, freed memory the C allocator kept would be reused unseen, so it is handed back
        to the system first (`malloc_trim`); the estimate stays approximate (see `_size_chunks`).
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            run()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
        base = self._rss_kb("VmRSS:")
        run()
        return (self._rss_kb("VmHWM:") - base) * 1024

    def resident(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        _malloc_trim()
        return self._rss_kb("VmRSS:") * 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: measure without it
        pass


def default_budget_mb(device: torch.device) -> float | None:
    """CUDA: 80% of the card's memory. CPU: None (no chunking unless `--memory-budget-mb`).

    On CPU the only meter is the process's peak RSS, which is too noisy to decide a chunk size
    the same way twice; chunking changes the summation order, so an automatic CPU chunk would
    break "same seed, same weights" and exact resume. A whole meta-batch under vmap can need
    tens of GB on CPU for conv nets (which `auto` runs with the loop there): set a budget or
    `--task-chunk` when forcing `--engine batched` on them.
    """
    if device.type == "cuda":
        return 0.8 * torch.cuda.get_device_properties(device).total_memory / 2**20
    return None


@dataclass
class BatchedEngine:
    """The batched engine with its options; `meta_gradient` / `adapt_predict` as in the API.

    - `task_chunk`: tasks per chunk; None sizes it on the first batch from `memory_budget_mb`
      (default: 80% of the GPU; on CPU no chunking unless a budget is given).
    - `compile`: run the step under `torch.compile` (one compilation per chunk shape).
    - `cuda_graphs`: capture the step in a CUDA graph per chunk shape and replay it (CUDA only).
    - `bf16`: bfloat16 autocast inside the step (opt-in; changes the numerics).
    - `warn`: where a one-line warning goes (default: stderr), e.g. that one task alone needs
      more memory than the budget.
    """

    task_chunk: int | None = None
    memory_budget_mb: float | None = None
    compile: bool = False
    cuda_graphs: bool = False
    bf16: bool = False
    chosen_chunk: int | None = None
    warn: Callable[[str], None] | None = field(default=None, repr=False)
    _steps: dict = field(default_factory=dict, repr=False)
    _predicts: dict = field(default_factory=dict, repr=False)
    _modes: dict = field(default_factory=dict, repr=False)

    def _step(
        self, model: nn.Module, inner: InnerLoop, learned_lrs: Tensor | None, tensors: tuple,
        total: int, plain: bool,
    ) -> Callable:
        """The step for these chunk tensors; `plain` skips compilation and graph capture.

        A CUDA graph replays what it captured, the meta-batch size the loss is divided by
        included, so a graph is kept per chunk shape and meta-batch size.
        """
        learned = learned_lrs is not None
        if self.compile and not plain and inner.norm == "tasknorm":
            # measured: the compiled TaskNorm step is 3e-3 off the loop (its (a, b) reach the
            # norm layers through a context variable, which compilation does not follow)
            raise ValueError("--compile does not support --norm tasknorm yet (its compiled step "
                             "is not exact); drop --compile, or use --norm support")
        # eagerly, autograd of the vmapped tasks is faster than torch.func.grad of them;
        # compilation and graph capture take the step as one pure torch.func function
        outer = "func" if self.compile or self.cuda_graphs else "autograd"
        layout = _layout(model, tensors)
        modes_key = (id(model), inner, learned, outer, layout)
        if modes_key not in self._modes:  # one task through the step, inside every mode
            probe = all_modes()
            params = tuple(p.detach() for p in model.parameters())
            lrs = None if learned_lrs is None else learned_lrs.detach()
            meta_step_fn(model, inner, learned, probe, outer)(
                params, lrs, *(t[:1] for t in tensors), 1)
            self._modes[modes_key] = needed(probe)
        modes = self._modes[modes_key]
        shapes = (total, *(tuple(t.shape) for t in tensors)) if self.cuda_graphs else None
        key = (modes_key, shapes, plain)
        if key not in self._steps:
            step = meta_step_fn(model, inner, learned, modes, outer)
            if self.bf16:
                step = _autocast(step, next(model.parameters()).device)
            if self.compile and not plain:
                step = torch.compile(step, dynamic=False)
            if self.cuda_graphs and not plain:
                step = _CudaGraphStep(step)
            self._steps[key] = step
        return self._steps[key]

    def _run_chunk(
        self, model, learned_lrs, batch: TaskBatch, inner, start, stop, total, acc, plain=False
    ):
        params = tuple(model.parameters())
        tensors = tuple(t[start:stop] for t in batch.tensors())
        step = self._step(model, inner, learned_lrs, tensors, total, plain)
        # Detached inputs: the step takes the gradients itself; an outer autograd graph around
        # it would only hold memory.
        lrs = None if learned_lrs is None else learned_lrs.detach()
        grads, lr_grad, loss_sum, acc_sum = step(
            tuple(p.detach() for p in params), lrs, *tensors, total
        )
        for p, g in zip(params, grads, strict=True):
            _add_grad(p, g)
        if lr_grad is not None:
            _add_grad(learned_lrs, lr_grad)
        acc.append((loss_sum, acc_sum))

    def _size_chunks(self, model, learned_lrs, batch, inner) -> None:
        """Pick the chunk on the first batch: run 1 task, then 2, fit memory = a + b * tasks.

        The probe's gradients are thrown away (the `.grad` held before is restored), so the
        meta-gradient is always summed in the same chunks, on the first batch as on every other,
        and a resumed run repeats the straight run exactly.
        """
        total = len(batch)
        device = next(model.parameters()).device
        budget = self.memory_budget_mb or default_budget_mb(device)
        meter = _PeakMemory(device)
        if budget is None or total < 3 or not meter.available:
            self.chosen_chunk = total
            return
        tensors = list(model.parameters()) + ([] if learned_lrs is None else [learned_lrs])
        held = [t.grad for t in tensors]
        for t in tensors:
            t.grad = None
        scratch: list = []
        one = meter.measure(lambda: self._run_chunk(model, learned_lrs, batch, inner, 0, 1,
                                                    total, scratch, plain=True))
        two = meter.measure(lambda: self._run_chunk(model, learned_lrs, batch, inner, 1, 3,
                                                    total, scratch, plain=True))
        for t, g in zip(tensors, held, strict=True):
            t.grad = g
        # Conservative: no fixed cost, and the largest per-task figure the two readings allow
        # (a reading can come out low when memory is reused unseen; a too-small chunk only
        # costs speed, a too-large one can exhaust the machine).
        per_task = max(one, two / 2, two - one, 1)
        room = budget * 2**20 - meter.resident()
        self.chosen_chunk = int(min(total, max(1, room // per_task)))
        if per_task > room:  # the smallest chunk will still exceed the budget: say so once
            (self.warn or _stderr)(
                f"warning: one task needs about {per_task / 2**20:.0f} MB in the batched step, "
                f"more than the {max(room, 0) / 2**20:.0f} MB the {budget:.0f} MB memory budget "
                "leaves; running one task per chunk (raise --memory-budget-mb to silence this)"
            )

    def meta_gradient(
        self, model: nn.Module, learned_lrs: Tensor | None, batch: TaskBatch, inner: InnerLoop
    ) -> dict[str, Tensor]:
        """Add the meta-gradient of `batch` to `.grad`; return the mean loss (and accuracy)."""
        total = len(batch)
        sums: list[tuple[Tensor, Tensor]] = []
        with twice_differentiable(inner):  # attention's fused kernels: no second derivative
            if self.task_chunk is not None:
                self.chosen_chunk = min(self.task_chunk, total)
            elif self.chosen_chunk is None:
                self._size_chunks(model, learned_lrs, batch, inner)
            for a, b in chunk_bounds(total, self.chosen_chunk):
                self._run_chunk(model, learned_lrs, batch, inner, a, b, total, sums)
        stats = {"loss": torch.stack([s[0] for s in sums]).sum() / total}
        if inner.loss == "cross_entropy":
            stats["accuracy"] = torch.stack([s[1] for s in sums]).sum() / total
        return stats

    def adapt_predict(
        self, model: nn.Module, learned_lrs: Tensor | None, batch: TaskBatch, inner: InnerLoop,
        one_at_a_time: bool = False,
    ) -> Tensor:
        """Adapt to every task of `batch` (no meta-graph, in `evaluation_mode`); return query outputs
        `(B, Q, ...)`, the queries predicted together or `one_at_a_time`."""
        params = tuple(p.detach() for p in model.parameters())
        lrs = None if learned_lrs is None else learned_lrs.detach()
        table = step_size_table(
            inner.steps, len(params), inner.lr, lrs, params[0].dtype, params[0].device
        )
        chunk = self.task_chunk or self.chosen_chunk or len(batch)
        outputs = []
        with torch.no_grad():
            for a, b in chunk_bounds(len(batch), chunk):
                sx, sy, qx, _ = (t[a:b] for t in batch.tensors())
                predict = self._predict(model, inner, one_at_a_time, params, table, (sx, sy, qx))
                with evaluation_mode(model):
                    outputs.append(predict(params, table, sx, sy, qx))
        return torch.cat(outputs).detach()

    def _predict(self, model, inner, one_at_a_time, params, table, tensors) -> Callable:
        """The prediction function for these tensors, inside the modes its forward needs (found
        as the step's: one task through it, in `evaluation_mode`, inside every mode).

        Built outside `evaluation_mode`: building a forward puts the model in training mode."""
        key = (id(model), inner, one_at_a_time, _layout(model, tensors))
        if key not in self._predicts:
            probe = all_modes()
            predict = predict_fn(model, inner, one_at_a_time, probe)
            with evaluation_mode(model):
                predict(params, table, *(t[:1] for t in tensors))
            self._predicts[key] = predict_fn(model, inner, one_at_a_time, needed(probe))
        return self._predicts[key]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _autocast(step: Callable, device: torch.device) -> Callable:
    def run(*args):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return step(*args)

    return run


class _CudaGraphStep:
    """A step captured once in a CUDA graph (per chunk shape) and replayed on copied inputs.

    Safe because the step is a pure function of fixed-shape device tensors with no host sync;
    the outputs live in the graph's memory and are cloned before they are handed out.
    """

    def __init__(self, step: Callable) -> None:
        self.step, self.graph = step, None

    def __call__(self, params, lrs, sx, sy, qx, qy, total):
        inputs = (*params, *([] if lrs is None else [lrs]), sx, sy, qx, qy)
        if self.graph is None:
            self._capture(len(params), lrs is not None, inputs, total)
        for static, value in zip(self.static_in, inputs, strict=True):
            static.copy_(value)
        self.graph.replay()
        grads, lr_grad, loss_sum, acc_sum = self.static_out
        return (tuple(g.clone() for g in grads), None if lr_grad is None else lr_grad.clone(),
                loss_sum.clone(), acc_sum.clone())

    def _capture(self, n_params: int, learned: bool, inputs, total: int) -> None:
        self.static_in = [t.detach().clone() for t in inputs]

        def run():
            params = tuple(self.static_in[:n_params])
            lrs = self.static_in[n_params] if learned else None
            return self.step(params, lrs, *self.static_in[-4:], total)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: lazy initialisation and compilation happen here
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = run()


def meta_gradient(
    model: nn.Module, learned_lrs: Tensor | None, batch: TaskBatch, inner: InnerLoop
) -> dict[str, Tensor]:
    """The engine API with default options: the whole meta-batch at once, no compilation."""
    return BatchedEngine(task_chunk=len(batch)).meta_gradient(model, learned_lrs, batch, inner)


def adapt_predict(
    model: nn.Module, learned_lrs: Tensor | None, batch: TaskBatch, inner: InnerLoop,
    one_at_a_time: bool = False,
) -> Tensor:
    """The engine API with default options: every task at once."""
    return BatchedEngine(task_chunk=len(batch)).adapt_predict(model, learned_lrs, batch, inner,
                                                              one_at_a_time)
