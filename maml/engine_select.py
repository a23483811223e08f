"""Which engine runs a model: `--engine {auto,higher,batched}`, decided on the first batch.

The batched engine cannot run every model: `vmap` refuses data-dependent Python control flow,
`.item()`, in-place mutation of buffers and random operations, and an operation with a wrong
batching rule would silently give a wrong meta-gradient. So before the first real step, a float64
copy of the model takes the meta-gradient (or, for evaluation, the adapted predictions after at
least one step) of the first tasks with the batched engine and with the same loop run one task at
a time through `torch.func.functional_call`, and the two must agree to 1e-8. A problem found is
named: with `batched` it is a `UsageError`, with `auto` one warning line and the `higher` engine.

The `higher` engine cannot run every model either: `higher` ignores fast weights that a layer
reads from another layer (`higher_engine.routing_problem`). Such a model is refused by `higher`
and trained by the batched engine under `auto`. A model neither engine can run, or one that fails
in its first step for a reason of its own (say an operation without a second derivative), is a
one-line `UsageError`.

`auto` then picks the faster engine for the device: on CUDA the batched engine; on CPU, where
`vmap` of conv nets is slower than the loop, the batched engine only for models without
convolutions (see `batched_is_faster_on_cpu`: a fixed rule, so the same seed gives the same
engine and the same weights every time; a choice of the loop is printed once).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from maml import higher_engine
from maml.adaptation import InnerLoop, evaluation_mode
from maml.batched_engine import BatchedEngine
from maml.errors import UsageError, gist
from maml.higher_engine import CONVOLUTIONS
from maml.tasks import TaskBatch

TOLERANCE = 1e-8  # float64 agreement the probe demands; exact engines agree to ~1e-15
PROBE_TASKS = 2


@dataclass(frozen=True)
class EngineOptions:
    """The engine settings of a run (see `BatchedEngine` for the batched-only ones)."""

    name: str = "auto"
    task_chunk: int | None = None
    memory_budget_mb: float | None = None
    compile: bool = False
    cuda_graphs: bool = False
    bf16: bool = False
    tf32: bool = False


def _problem_name(exc: Exception) -> str:
    text = gist(exc, 160)
    low = str(exc).lower()
    if "data-dependent" in low or "item()" in low or ".item" in low:
        return "its forward uses data-dependent Python control flow or .item() " \
               f"(vmap cannot batch it: {text})"
    if "randomness" in low or "random operation" in low:
        return f"its forward uses random operations such as dropout ({text})"
    if "inplace" in low or "in-place" in low or "in place" in low:
        return "its forward mutates a tensor in place, e.g. a buffer " \
               f"(vmap cannot share it across tasks: {text})"
    if "batching rule" in low:
        return f"an operation in its forward has no vmap batching rule ({text})"
    return f"running it under vmap fails with {gist(exc, typed=True)}"


def _flat_grads(model: nn.Module, lrs: Tensor | None) -> Tensor:
    tensors = list(model.parameters()) + ([] if lrs is None else [lrs])
    return torch.cat([
        (t.grad if t.grad is not None else torch.zeros_like(t)).flatten() for t in tensors
    ])


def _copy64(model: nn.Module, lrs: Tensor | None) -> tuple[nn.Module, Tensor | None]:
    twin = copy.deepcopy(model).double()
    for p in twin.parameters():
        p.grad = None
    twin_lrs = None if lrs is None else nn.Parameter(lrs.detach().double().clone())
    return twin, twin_lrs


def model_failure(exc: Exception, purpose: str, first_order_works: bool = False) -> str:
    """The one line for a model that fails in the inner loop itself, whatever the engine.

    It suggests --first-order only when the same tasks pass with it (`first_order_works`): a
    wrong label or output fails either way, and the hint would send the user the wrong way."""
    what = "meta-trained" if purpose == "train" else "adapted to a task"
    hint = ("; second-order MAML differentiates the inner loop's gradients, --first-order does not"
            if first_order_works else "")
    return f"the model cannot be {what}: {gist(exc, typed=True)}{hint}"


def _passes_first_order(model: nn.Module, lrs: Tensor | None, batch: TaskBatch,
                        inner: InnerLoop, purpose: str) -> bool:
    """Whether a failing second-order meta-gradient goes through at first order."""
    if purpose != "train" or inner.first_order:
        return False
    own = copy.deepcopy(model)
    own_lrs = None if lrs is None else nn.Parameter(lrs.detach().clone())
    probe = batch.chunk(0, min(PROBE_TASKS, len(batch)))
    with torch.random.fork_rng(devices=[]):
        try:
            _reference(own, own_lrs, probe, dataclasses.replace(inner, first_order=True), purpose)
        except Exception:
            return False
    return True


def _reference(model: nn.Module, lrs: Tensor | None, probe: TaskBatch, inner: InnerLoop,
               purpose: str) -> Tensor:
    """The loop one task at a time through `functional_call`: meta-gradient or predictions."""
    if purpose == "train":
        higher_engine.meta_gradient(model, lrs, probe, inner, plain=True)
        return _flat_grads(model, lrs)
    return higher_engine.adapt_predict(model, lrs, probe, inner, plain=True).flatten()


def batched_problem(
    model: nn.Module, learned_lrs: Tensor | None, batch: TaskBatch, inner: InnerLoop,
    purpose: str = "train",
) -> str | None:
    """Why the batched engine cannot run `model` on `batch` (None if it can, exactly).

    `purpose` "train" compares meta-gradients, "eval" the adapted query predictions. Raises
    `UsageError` if the model fails in the reference loop too, in its own precision.
    """
    if purpose == "eval":  # evaluation's 0-step "before" call takes no gradient to check
        inner = dataclasses.replace(inner, steps=max(inner.steps, 1))
    probe = batch.chunk(0, min(PROBE_TASKS, len(batch)))
    with torch.random.fork_rng(devices=[]):
        twin, lrs = _copy64(model, learned_lrs)
        try:
            expected = _reference(twin, lrs, probe.to(probe.support_x.device, torch.float64),
                                  inner, purpose)
        except Exception as exc:  # float64 or the model itself: try its own precision
            own = copy.deepcopy(model)
            own_lrs = None if learned_lrs is None else nn.Parameter(learned_lrs.detach().clone())
            try:
                _reference(own, own_lrs, probe, inner, purpose)
            except Exception as own_exc:
                works = _passes_first_order(model, learned_lrs, probe, inner, purpose)
                raise UsageError(model_failure(own_exc, purpose, works)) from None
            return f"it fails in float64, where the engines are compared ({gist(exc, 160)})"
        twin, lrs = _copy64(model, learned_lrs)
        probe = probe.to(probe.support_x.device, torch.float64)
        try:
            engine = BatchedEngine(task_chunk=len(probe))
            if purpose == "train":
                engine.meta_gradient(twin, lrs, probe, inner)
                got = _flat_grads(twin, lrs)
            else:
                got = engine.adapt_predict(twin, lrs, probe, inner).flatten()
        except Exception as exc:  # any failure under vmap is a property of the model
            return _problem_name(exc)
    rel = ((got - expected).norm() / expected.norm().clamp_min(1e-300)).item()
    if not rel <= TOLERANCE:
        what = "meta-gradient" if purpose == "train" else "adapted predictions"
        return (f"its {what} under vmap differs from the loop's by {rel:.1e} "
                f"(relative, float64) on the first batch")
    return None


def batched_is_faster_on_cpu(model: nn.Module) -> bool:
    """Whether `auto` takes the batched engine on a CPU: for models without convolutions.

    Measured on a 2-core CPU (README, Batched engine): vmap runs an MLP 4.4x faster than the
    loop and conv nets 0.2-0.97x. The rule is structural, not a timing, on purpose: a timing
    flips between runs, ranks and resumes, and the engines agree to rounding, not bit for bit,
    so the same seed would not give the same weights.
    """
    return not any(isinstance(m, CONVOLUTIONS) for m in model.modules())


class SelectedEngine:
    """The engine API, deciding on its first call which engine runs (see the module docstring)."""

    def __init__(self, options: EngineOptions, warn: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self.batched = BatchedEngine(
            task_chunk=options.task_chunk, memory_budget_mb=options.memory_budget_mb,
            compile=options.compile, cuda_graphs=options.cuda_graphs, bf16=options.bf16,
            warn=self.warn,
        )
        self.chosen: dict[str, object] = {}

    @property
    def name(self) -> str | None:
        """The engine the training step runs ("higher" or "batched"), once decided."""
        engine = self.chosen.get("train")
        return None if engine is None else ("higher" if engine is higher_engine else "batched")

    def _decide(self, model, learned_lrs, batch, inner, purpose: str):
        try:
            with evaluation_mode(model) if purpose == "eval" else nullcontext():
                higher_wrong = higher_engine.routing_problem(model, batch.support_x[0])
        except (UsageError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:  # its forward fails through functional_call: on any engine
            raise UsageError(model_failure(exc, purpose)) from None
        if self.options.name == "higher":
            if higher_wrong:
                raise UsageError(f"--engine higher cannot run this model: {higher_wrong}; "
                                 "use --engine batched (or auto)")
            return higher_engine
        problem = batched_problem(model, learned_lrs, batch, inner, purpose)
        if problem is not None:
            if higher_wrong:
                raise UsageError(f"neither engine can run this model: {higher_wrong}; and the "
                                 f"batched engine cannot either: {problem}")
            if self.options.name == "batched":
                raise UsageError(f"--engine batched cannot run this model: {problem}; "
                                 "use --engine higher (or auto)")
            if not any(e is higher_engine for e in self.chosen.values()):
                self.warn(f"warning: the batched engine cannot run this model ({problem}); "
                          "using the higher engine")
            return higher_engine
        if higher_wrong:
            if self.options.name == "auto" and not self.chosen:
                self.warn(f"engine auto: batched ({higher_wrong})")
            return self.batched
        device = next(model.parameters()).device
        if self.options.name == "auto" and device.type == "cpu":
            if not batched_is_faster_on_cpu(model):
                if purpose == "train":
                    self.warn("engine auto: higher (the loop is faster than vmap for conv nets on "
                              "a CPU; --engine batched to override)")
                return higher_engine
        return self.batched

    def _engine(self, purpose, model, learned_lrs, batch, inner):
        if purpose not in self.chosen:
            self.chosen[purpose] = self._decide(model, learned_lrs, batch, inner, purpose)
        return self.chosen[purpose]

    def _first(self, purpose: str, call: Callable[[], object], inner: InnerLoop,
               model: nn.Module, learned_lrs: Tensor | None, batch: TaskBatch):
        """Run an engine's first call for `purpose`; a failure of the model's own is one line."""
        try:
            return call()
        except (UsageError, torch.cuda.OutOfMemoryError):
            raise
        except RuntimeError as exc:
            works = _passes_first_order(model, learned_lrs, batch, inner, purpose)
            raise UsageError(model_failure(exc, purpose, works)) from None

    def meta_gradient(
        self, model: nn.Module, learned_lrs: Tensor | None, batch: TaskBatch, inner: InnerLoop
    ) -> dict[str, Tensor]:
        first = "train" not in self.chosen
        engine = self._engine("train", model, learned_lrs, batch, inner)
        if first:
            return self._first(
                "train", lambda: engine.meta_gradient(model, learned_lrs, batch, inner), inner,
                model, learned_lrs, batch)
        return engine.meta_gradient(model, learned_lrs, batch, inner)

    def adapt_predict(
        self, model: nn.Module, learned_lrs: Tensor | None, batch: TaskBatch, inner: InnerLoop,
        one_at_a_time: bool = False,
    ) -> Tensor:
        first = "eval" not in self.chosen
        engine = self._engine("eval", model, learned_lrs, batch, inner)
        if first:
            return self._first(
                "eval", lambda: engine.adapt_predict(model, learned_lrs, batch, inner,
                                                     one_at_a_time=one_at_a_time),
                inner, model, learned_lrs, batch)
        return engine.adapt_predict(model, learned_lrs, batch, inner, one_at_a_time=one_at_a_time)


def select(options: EngineOptions, warn: Callable[[str], None] | None = None) -> SelectedEngine:
    """The engine for a run; applies the global TF32 opt-in now (it affects both engines).
    `warn` prints the engine's one-line notices (default: standard error)."""
    if options.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return SelectedEngine(options, warn)


def options_from(name: str, cfg=None) -> EngineOptions:
    """`EngineOptions` from `--engine` and a run's `Config` (its batched-engine settings)."""
    from maml.config import ENGINES

    if name not in ENGINES:
        raise UsageError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    if cfg is None:
        return EngineOptions(name=name)
    chunk, budget = getattr(cfg, "task_chunk", None), getattr(cfg, "memory_budget_mb", None)
    chunk = None if chunk == "auto" else chunk  # `--task-chunk auto`: sized to the budget
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise UsageError(f"--task-chunk must be a whole number >= 1 or auto, got {chunk!r}")
    if budget is not None and not budget > 0:
        raise UsageError(f"--memory-budget-mb must be > 0, got {budget!r}")
    cuda = str(getattr(cfg, "device", "cpu")).startswith("cuda")
    if getattr(cfg, "cuda_graphs", False) and not cuda:
        raise UsageError("--cuda-graphs needs --device cuda")
    return EngineOptions(
        name=name, task_chunk=chunk, memory_budget_mb=budget,
        compile=bool(getattr(cfg, "compile", False)),
        cuda_graphs=bool(getattr(cfg, "cuda_graphs", False)),
        bf16=bool(getattr(cfg, "bf16", False)), tf32=bool(getattr(cfg, "tf32", False)),
    )
