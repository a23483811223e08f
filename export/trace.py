"""Trace the adaptation routine into plain aten graphs, one per entry point.

The routine is `maml.adaptation.adapt` itself (the code training and `maml eval` run), with the
gradient taken by `torch.func.grad`. `make_fx` records every aten operator it dispatches, the
backward operators of each SGD step included, so the graphs need no autograd at run time.

Only the number of support examples `S` and of queries `Q` are symbolic; every other size is
fixed by the model. The meta-learned init and the step-size table become constants of the graph.

A task's adapted state is what `adapt` returns and `predict` takes: the weights `p0..`, then, in
the `support` normalisation mode, the support set's batch-norm moments `m0..` (`maml.norms`), so
that `predict` answers each query on its own.

Three layers are traced in an equivalent form whose backward is made of plain operators:
attention in its math form (the CPU's fused kernel has a backward operator ONNX cannot express),
recurrent layers without mkldnn (`mkldnn_rnn_layer`, likewise), and a biased linear layer on
inputs of 3 or more dimensions with the bias added separately (`_UnfusedLinearBias`). Each
differs from the trained forward by float32 rounding at most, which `export.verify` measures.
"""

from __future__ import annotations

import logging
import operator
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule
from torch.fx.experimental import _config as shape_config
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from maml.adaptation import (
    Forward,
    Params,
    adapt_task,
    evaluation_mode,
    functional_forward,
    step_size_table,
)
from maml.errors import UsageError, gist, shorten
from maml.experiment import Experiment
from maml.norms import predict as norm_predict
from maml.norms import support_moments

ENTRY_POINTS = ("adapt", "predict", "adapt_predict")


@dataclass(frozen=True)
class Routine:
    """What the adapter computes: start from `init`, take one SGD step per row of `step_sizes`."""

    forward: Forward
    init: Params
    names: tuple[str, ...]
    step_sizes: Tensor  # (steps, n_params)
    loss: str
    norm: str = "transductive"
    moment_shapes: tuple[tuple[int, ...], ...] = ()  # (channels,) per mean and per variance
    norm_layers: int = 0  # batch-norm calls in a forward (whatever the mode)

    @property
    def state_names(self) -> list[str]:
        """A task's adapted state, as `adapt` returns it: weights `p*`, then moments `m*`."""
        return ([f"p{i}" for i in range(len(self.init))]
                + [f"m{i}" for i in range(len(self.moment_shapes))])

    def input_names(self, entry: str) -> list[str]:
        """The positional inputs of `entry`, named as the contract says."""
        return {"adapt": ["support_x", "support_y"], "predict": [*self.state_names, "query_x"],
                "adapt_predict": ["support_x", "support_y", "query_x"]}[entry]

    def output_names(self, entry: str) -> list[str]:
        return self.state_names if entry == "adapt" else ["outputs"]


def routine(exp: Experiment, steps: int | None = None, lr: float | None = None) -> Routine:
    """The routine of a restored run, in float32.

    `steps` defaults to the run's evaluation steps. The step sizes are the run's learned ones when
    it has them, else its `inner_lr`; an explicit `lr` replaces either with a constant table.
    """
    cfg = exp.cfg
    steps = cfg.eval_inner_steps if steps is None else steps
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps} (for the unadapted model, run "
                         "predict on the weights in init.npz)")
    model = exp.model.float()
    names = tuple(name for name, _ in model.named_parameters())
    init = tuple(p.detach().clone() for p in model.parameters())
    learned = learned_step_sizes(exp, lr)
    table = step_size_table(steps, len(init), cfg.inner_lr if lr is None else lr, learned,
                            torch.float32)
    forward = functional_forward(model)

    def deterministic(params: Params, x: Tensor) -> Tensor:  # as in evaluation: `evaluation_mode`
        with evaluation_mode(model):
            return forward(params, x)

    norm = cfg.norm or "transductive"
    with torch.no_grad():  # the batch-norm layers and their moments: one forward of two examples
        probe = torch.randn(2, *exp.source.input_shape, generator=torch.Generator().manual_seed(0))
        every = support_moments(deterministic, init, probe, "support")
        shapes = tuple(tuple(m.shape) for m in support_moments(deterministic, init, probe, norm))
    return Routine(deterministic, init, names, table.clone(), cfg.loss, norm, shapes,
                   len(every) // 2)


def learned_step_sizes(exp: Experiment, lr: float | None) -> Tensor | None:
    """The learned step sizes the routine uses: the run's, unless `lr` overrides them."""
    if exp.inner_lrs is None or lr is not None:
        return None
    return exp.inner_lrs.detach().float()


def func_grad(loss_of: Callable[[Params], Tensor], params: Params) -> Params:
    """A `maml.adaptation.GradFn` from `torch.func.grad` (traceable by `make_fx`)."""
    return torch.func.grad(loss_of)(params)


def entry_functions(r: Routine) -> dict[str, Callable[..., Any]]:
    """The three entry points as plain functions of their positional tensors."""

    n = len(r.init)

    def adapt_(support_x: Tensor, support_y: Tensor) -> tuple[Tensor, ...]:
        fast, moments = adapt_task(r.forward, r.init, support_x, support_y, r.loss,
                                   r.step_sizes, func_grad, r.norm)
        return (*fast, *moments)

    def predict(*args: Tensor) -> Tensor:
        state = args[:-1]
        return norm_predict(r.forward, tuple(state[:n]), tuple(state[n:]), args[-1], r.norm)

    def adapt_predict(support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        return predict(*adapt_(support_x, support_y), query_x)

    return {"adapt": adapt_, "predict": predict, "adapt_predict": adapt_predict}


def example_inputs(r: Routine, entry: str, sx: Tensor, sy: Tensor, qx: Tensor) -> tuple:
    with torch.no_grad():
        moments = support_moments(r.forward, r.init, sx, r.norm)
    return {"adapt": (sx, sy), "predict": (*r.init, *moments, qx),
            "adapt_predict": (sx, sy, qx)}[entry]


def dynamic_inputs(r: Routine, entry: str) -> list[bool]:
    """Whether each input's first dimension (S or Q) is dynamic: the examples', not the state's."""
    return [name in ("support_x", "support_y", "query_x") for name in r.input_names(entry)]


def _fake(mode: FakeTensorMode, t: Tensor, dynamic: bool) -> Tensor:
    dims = [DimDynamic.DYNAMIC if dynamic and i == 0 else DimDynamic.STATIC for i in range(t.dim())]
    return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))


class _UnfusedLinearBias(TorchFunctionMode):
    """`F.linear(x, w, b)` as `F.linear(x, w) + b` for an `x` of 3 or more dimensions.

    Traced under `grad`, torch 2.14's fused path for a biased linear on such inputs fixes the
    number of examples (a sequence model's or a transformer's linear layers); the same product
    with the bias added separately keeps it symbolic, at the cost of one float32 rounding.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._C._nn.linear and len(args) >= 2:  # F.linear(input, weight, bias)
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            if bias is not None and x.dim() > 2:
                return func(x, weight) + bias
        return func(*args, **kwargs)


@contextmanager
def _plain_layers() -> Iterator[None]:
    """Attention in its math form, recurrent layers without mkldnn, biased 3-d linear layers
    unfused (see the module's docstring)."""
    with warnings.catch_warnings():  # mkldnn.flags warns about Intel GPUs' TF32 on a CPU build
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with sdpa_kernel(SDPBackend.MATH), torch.backends.mkldnn.flags(enabled=False), \
                _UnfusedLinearBias():
            yield


def trace(
    r: Routine, entry: str, example: tuple[Tensor, ...],
    decompositions: Mapping[Any, Callable] | None = None,
) -> GraphModule:
    """Trace one entry point with symbolic S / Q into an aten `GraphModule` whose inputs and
    outputs carry the contract's names."""
    def make_graph() -> tuple[GraphModule, ShapeEnv]:
        mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False), allow_non_fake_inputs=True)
        fakes = [_fake(mode, t, d) for t, d in zip(example, dynamic_inputs(r, entry), strict=True)]
        try:
            with mode, _plain_layers():
                gm = make_fx(entry_functions(r)[entry], decomposition_table=decompositions,
                             tracing_mode="symbolic", _allow_non_fake_inputs=True)(*fakes)
        except UsageError:
            raise
        except Exception as exc:
            if "mutate a captured Tensor" in str(exc):
                raise UsageError(
                    "cannot trace the adaptation routine: the model's forward changes a buffer "
                    "in place (a counter or a running statistic); the adapter is a pure function "
                    "of its inputs, so keep forward free of in-place updates to buffers "
                    "(batch norm: track_running_stats=False)") from None
            raise UsageError(f"cannot trace the adaptation routine: {gist(exc, 300)}") from None
        return gm, mode.shape_env

    gm, env = make_graph()
    fixed = _fixed_input(gm, env, r, entry)
    if fixed is not None:
        raise UsageError(f"the model fixes the number of examples of {fixed} while tracing"
                         f"{_where_fixed(env, make_graph)}; the adapter needs a model whose "
                         "batch size can vary")
    for node, name in zip([n for n in gm.graph.nodes if n.op == "placeholder"],
                          r.input_names(entry), strict=True):
        node.name = node.target = name
    for node in gm.graph.nodes:
        node.type = None  # Python annotations of the traced functions mean nothing to TorchScript
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _fixed_input(gm: GraphModule, env: ShapeEnv, r: Routine, entry: str) -> str | None:
    """The first input whose support / query size a guard fixed during tracing, if any."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name, dyn in zip(holders, r.input_names(entry), dynamic_inputs(r, entry),
                               strict=True):
        if not dyn:
            continue  # weights, step sizes: fixed shapes, possibly 0-dim (a learned temperature)
        size = node.meta["val"].shape[0]
        if not isinstance(size, torch.SymInt) or not env.replace(size.node.expr).free_symbols:
            return name
    return None


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def _where_fixed(env: ShapeEnv, make_graph: Callable[[], object]) -> str:
    """Where the first guard that fixed a size was added, as " (at FILE:LINE in FUNC: `code`)":
    the innermost frame outside torch (the model's own code), and the torch.nn frame it called.

    torch logs a guard's Python stack when asked for that guard by name, so the graph is traced
    again with the question asked; "" where that finds nothing.
    """
    constants = {s for s, v in env.replacements.items() if v.is_number}
    touching = [g.expr for g in env.guards if g.expr.free_symbols & constants]
    equalities = [e for e in touching if getattr(e, "rel_op", None) == "=="]  # `Eq(s0, 10)`
    if not touching:
        return ""
    first = (equalities or touching)[0]
    stacks: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.stack_info:
                stacks.append(record.stack_info)

    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    saved = log.handlers, log.level, log.propagate
    log.handlers, log.propagate = [Keep()], False  # kept, not printed
    log.setLevel(logging.INFO)  # (setLevel, unlike an assignment, clears the logger's cache)
    try:
        with shape_config.patch(extended_debug_guard_added=str(first)):
            make_graph()
    except Exception:  # the diagnosis is a courtesy; the refusal stands without it
        pass
    finally:
        log.handlers, _, log.propagate = saved
        log.setLevel(saved[1])
    frames = _FRAME.findall(stacks[0]) if stacks else []
    torch_dir = Path(torch.__file__).parent
    here = Path(__file__).parent  # the exporter's own frames (its layer forms) are not news
    own = [i for i, f in enumerate(frames)
           if not Path(f[0]).is_relative_to(torch_dir) and not Path(f[0]).is_relative_to(here)]
    if not own:
        return ""
    layers = [f for f in frames[own[-1] + 1:]  # the torch.nn code the model's line called
              if Path(f[0]).is_relative_to(torch_dir / "nn") and Path(f[0]).name != "module.py"]
    shown = [f"{Path(file).name}:{line} in {func}: `{shorten(code.strip(), 80)}`"
             for file, line, func, code in [frames[own[-1]], *layers[-1:]]]
    return f" (at {', calling '.join(shown)})"


def compose(adapt_gm: GraphModule, predict_gm: GraphModule, n_state: int) -> GraphModule:
    """`adapt_predict` as a graph calling the traced `adapt` then `predict` graphs (no third
    trace, and the very graphs the other two entry points are made of)."""
    root = torch.nn.Module()
    root.adapt, root.predict = adapt_gm, predict_gm
    graph = torch.fx.Graph()
    sx, sy, qx = (graph.placeholder(n) for n in ("support_x", "support_y", "query_x"))
    weights = graph.call_module("adapt", (sx, sy))
    params = [graph.call_function(operator.getitem, (weights, i)) for i in range(n_state)]
    graph.output(graph.call_module("predict", (*params, qx)))
    return GraphModule(root, graph)


def ops(gm: GraphModule) -> set[str]:
    """The names of the operators a graph calls."""
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}

