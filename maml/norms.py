"""Which statistics batch norm uses on a task's queries: the normalisation mode, written once.

A batch-norm layer in MAML normalises with the statistics of a batch, never with running
averages (`maml.adaptation.use_batch_statistics`). Which batch, at prediction time, is the mode:

- `transductive` (the MAML paper's convention): the batch the layer is given. A query is
  normalised with the statistics of the queries sent with it, so its answer depends on them, and
  a query sent alone is normalised with its own statistics (close to chance on Omniglot).
- `support`: the support set's statistics. The inner loop is unchanged (the support set is
  normalised with its own statistics); after adaptation the support set is run once more through
  the adapted weights and each batch-norm layer's mean and variance there, the task's *moments*,
  become part of the adapted state. Every query is normalised with them, so a query's output
  depends only on that query and the task's support set: one at a time equals all together.
- `tasknorm`: TaskNorm-I (Bronskill et al., "TaskNorm: Rethinking Batch Normalization for
  Meta-Learning", ICML 2020). Every example, support or query, is normalised with a blend of
  the support set's moments and its own instance moments (over its spatial positions), with
  weight `alpha = sigmoid(a * support_size + b)` on the support's. Each batch-norm layer gets
  a parameter `tasknorm_blend = (a, b)` (`add_parameters`, zeros: alpha starts at 1/2), which is
  adapted and meta-learned like every other parameter. A query's output depends only on it and
  the support set. A batch norm over `(N, C)` inputs has no spatial positions and uses the
  support moments alone (as `support`).

The moments are a flat tuple `(mean_0, var_0, mean_1, var_1, ...)`, one pair per batch-norm call
of a forward, in call order, each of shape `(channels,)`; the variance is the biased one that
batch norm divides by; `tasknorm` appends the support size as a 0-d tensor. Meta-training
differentiates through them (they are functions of the adapted weights). Instance, layer and group
norm use each example's own statistics, so they are already independent of the other queries and
no mode changes them.

`support_moments(forward, params, x, norm)` records the moments, `predict(...)` uses them, and
`on_support(...)` is the inner loop's forward (which only `tasknorm` changes). All are
`TorchFunctionMode`s over `F.batch_norm` in plain tensor operations, so they compose with `vmap`,
`grad` and tracing like `maml.exact_norms`. TaskNorm's `(a, b)` reach them through
`blends_from`, which each functional forward enters with its own parameters (a layer's blend is
the one of the k-th batch-norm layer for the k-th call: `check_call_order` holds a model to that).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from maml.errors import UsageError

NORM_MODES = ("transductive", "support", "tasknorm")
Moments = tuple[Tensor, ...]
BLEND = "tasknorm_blend"
"""The name of TaskNorm's `(a, b)` parameter on each batch-norm layer."""

_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training",
                    "momentum", "eps")
_BATCH_NORM_DEFAULTS = {"running_mean": None, "running_var": None, "weight": None, "bias": None,
                        "training": False, "momentum": 0.1, "eps": 1e-5}


def check_mode(norm: str) -> str:
    """`norm` if it names a mode, else a ValueError listing the modes."""
    if norm not in NORM_MODES:
        raise ValueError(f"unknown normalisation mode {norm!r}; choose one of "
                         f"{', '.join(NORM_MODES)}")
    return norm


def served_mode(trained: str | None, requested: str | None) -> str:
    """The mode to evaluate or export a model in: `requested`, else the one it was trained in.

    `transductive` and `support` share the inner loop (the support set normalised with its own
    statistics) and differ only in the statistics a query gets afterwards, so a model trained in
    either can be served in the other: a transductive model served as `support` answers each
    query alone (96.4% on the paper's Omniglot model, where alone it gets 28%). `tasknorm`
    has its own inner loop and parameters, so it is served as trained.
    """
    trained = trained or "transductive"  # runs from before the modes
    if requested is None or requested == trained:
        return trained
    if requested not in NORM_MODES:
        raise UsageError(f"unknown --norm {requested!r}; choose one of {', '.join(NORM_MODES)}")
    if "tasknorm" in (trained, requested):
        raise UsageError(f"--norm {requested}: this model was trained with --norm {trained}, and "
                         "tasknorm's inner loop differs from the other modes'; drop --norm, or "
                         f"train with --norm {requested}")
    return requested


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batch_norm(model: nn.Module) -> bool:
    """Whether any layer of `model` is a batch-norm layer (the only kind a mode changes)."""
    return bool(_batch_norms(model))


def add_parameters(model: nn.Module, norm: str) -> nn.Module:
    """Give `model` the parameters its mode needs, in place: for `tasknorm`, `(a, b)` on each
    batch-norm layer (zeros, in the layer's dtype and device); nothing for the other modes."""
    if check_mode(norm) != "tasknorm":
        return model
    for layer in _batch_norms(model):
        if BLEND not in layer._parameters:
            like = next(iter(layer.parameters()), layer.running_mean)
            dtype = like.dtype if like is not None else torch.get_default_dtype()
            device = like.device if like is not None else None
            layer.register_parameter(BLEND, nn.Parameter(torch.zeros(2, dtype=dtype,
                                                                     device=device)))
    return model


def check_call_order(model: nn.Module, example: Tensor) -> str | None:
    """Why `tasknorm` cannot run `model` (None if it can): its forward must call each batch-norm
    layer once, in the order the layers are defined (how a call finds its blend)."""
    layers, called = _batch_norms(model), []
    hooks = [m.register_forward_pre_hook(lambda m, _: called.append(m)) for m in layers]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    if [id(m) for m in called] == [id(m) for m in layers]:
        return None
    return (f"its forward calls its {len(layers)} batch-norm layers {len(called)} times, or in "
            "another order than they are defined; --norm tasknorm needs each called once, in "
            "order (use --norm support)")


_BLENDS: ContextVar[Sequence[Tensor] | None] = ContextVar("tasknorm_blends", default=None)


def blend_indices(names: Sequence[str]) -> tuple[int, ...]:
    """Where TaskNorm's `(a, b)` parameters sit among a model's named parameters."""
    return tuple(i for i, n in enumerate(names) if n == BLEND or n.endswith("." + BLEND))


@contextmanager
def blends_from(params: Sequence[Tensor], indices: Sequence[int]) -> Iterator[None]:
    """Within the block, TaskNorm's k-th batch-norm call uses `params[indices[k]]` as its (a, b).
    Each functional forward enters it with the parameters it runs on."""
    token = _BLENDS.set([params[i] for i in indices])
    try:
        yield
    finally:
        _BLENDS.reset(token)


def _bind(args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(_BATCH_NORM_DEFAULTS)
    bound.update(zip(_BATCH_NORM_ARGS, args, strict=False))
    bound.update(kwargs)
    return bound


def _uses_batch_statistics(a: dict[str, Any]) -> bool:
    return bool(a["training"]) and a["running_mean"] is None and a["running_var"] is None


def _normalise(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
               bias: Tensor | None, eps: float) -> Tensor:
    """`x` normalised with per-channel `(mean, var)`, then batch norm's affine map."""
    shape = [1, -1] + [1] * (x.ndim - 2)
    return _affine(x, mean.reshape(shape), var.reshape(shape), weight, bias, eps)


def _affine(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
            eps: float) -> Tensor:
    """`(x - mean) / sqrt(var + eps) * weight + bias` as `x * scale + shift`, with `mean` and
    `var` shaped to broadcast against `x`: the small per-channel factors first, so the
    activation-sized work (and its derivatives, to second order) is one multiply-add."""
    shape = [1, -1] + [1] * (x.ndim - 2)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.reshape(shape)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.reshape(shape)
    return torch.addcmul(shift, x, scale)


def _moments(x: Tensor, dims: list[int]) -> tuple[Tensor, Tensor]:
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    return mean, (centred * centred).mean(dim=dims, keepdim=True)


def _tasknorm(x: Tensor, mean: Tensor, var: Tensor, n_support: Tensor, blend: Tensor,
              weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """TaskNorm-I: `x` normalised with the support moments `(mean, var)` of `n_support`
    examples blended with each example's instance moments (alpha on the support's)."""
    shape = [1, -1] + [1] * (x.ndim - 2)
    mean, var = mean.reshape(shape), var.reshape(shape)
    if x.ndim > 2:  # blended with each example's instance moments (a 2-d input has none)
        alpha = torch.sigmoid(blend[0] * n_support + blend[1])
        own_mean, own_var = _moments(x, list(range(2, x.ndim)))
        pooled = alpha * mean + (1 - alpha) * own_mean
        var = (alpha * (var + (mean - pooled) ** 2)
               + (1 - alpha) * (own_var + (own_mean - pooled) ** 2))
        mean = pooled
    return _affine(x, mean, var, weight, bias, eps)


class _TaskNorm(TorchFunctionMode):
    """TaskNorm-I over every batch-statistics batch norm: on the support set (`moments` None:
    the batch's own moments, recorded) or on queries (the task's recorded `moments`)."""

    def __init__(self, moments: Moments | None = None) -> None:
        super().__init__()
        self.given = moments
        self.moments: list[Tensor] = []
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            a = _bind(args, kwargs)
            if _uses_batch_statistics(a):
                return self._norm(a)
        return func(*args, **kwargs)

    def _norm(self, a: dict[str, Any]) -> Tensor:
        x, k = a["input"], self.calls
        blends = _BLENDS.get()
        if blends is None or k >= len(blends):
            raise ValueError(
                f"batch-norm call {k + 1} has no TaskNorm parameters ({BLEND}; the model has "
                f"{0 if blends is None else len(blends)}): a --norm tasknorm forward must call "
                "each batch-norm layer once, in order")
        if self.given is None:
            dims = [0, *range(2, x.ndim)]
            mean, var = (t.reshape(-1) for t in _moments(x, dims))
            n_support = x.new_ones(x.shape[0]).sum()
            self.moments += [mean, var]
            self.n_support = n_support
        else:
            if 2 * k + 2 > len(self.given) - 1:
                raise ValueError("the forward calls batch norm more often than the support set "
                                 "did: a forward must call the same norm layers whatever its input")
            mean, var, n_support = self.given[2 * k], self.given[2 * k + 1], self.given[-1]
        self.calls += 1
        return _tasknorm(x, mean, var, n_support, blends[k], a["weight"], a["bias"], a["eps"])


class _Record(TorchFunctionMode):
    """Batch norm with the batch's statistics (plain ops), keeping each call's (mean, var)."""

    def __init__(self) -> None:
        super().__init__()
        self.moments: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            a = _bind(args, kwargs)
            if _uses_batch_statistics(a):
                x = a["input"]
                dims = [0, *range(2, x.ndim)]
                mean = x.mean(dim=dims)
                centred = x - mean.reshape([1, -1] + [1] * (x.ndim - 2))
                var = (centred * centred).mean(dim=dims)
                self.moments += [mean, var]
                return _normalise(x, mean, var, a["weight"], a["bias"], a["eps"])
        return func(*args, **kwargs)


class _Replay(TorchFunctionMode):
    """Batch norm with given moments, one (mean, var) pair per call, in call order."""

    def __init__(self, moments: Moments) -> None:
        super().__init__()
        self.moments, self.used = moments, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            a = _bind(args, kwargs)
            if _uses_batch_statistics(a):
                if self.used + 2 > len(self.moments):
                    raise ValueError(
                        f"the forward calls batch norm more often than the {len(self.moments) // 2} "
                        "times the support set did: a forward must call the same norm layers "
                        "whatever its input")
                mean, var = self.moments[self.used], self.moments[self.used + 1]
                self.used += 2
                return _normalise(a["input"], mean, var, a["weight"], a["bias"], a["eps"])
        return func(*args, **kwargs)


def on_support(forward: Callable[[Any, Tensor], Tensor], params: Any, support_x: Tensor,
               norm: str) -> Tensor:
    """The inner loop's forward on the support set: batch norm with the support's own
    statistics (`transductive`, `support`), or TaskNorm-I's blend with each example's."""
    if check_mode(norm) != "tasknorm":
        return forward(params, support_x)
    with _TaskNorm():
        return forward(params, support_x)


def support_moments(forward: Callable[[Any, Tensor], Tensor], params: Any, support_x: Tensor,
                    norm: str) -> Moments:
    """The task's moments under `params`: each batch-norm call's statistics on the support set
    (and, for `tasknorm`, the support size).

    Empty for `transductive` (queries then use their own batch's statistics) and for a model
    without batch norm."""
    if check_mode(norm) == "transductive":
        return ()
    if norm == "tasknorm":
        with _TaskNorm() as record:
            forward(params, support_x)
        return (*record.moments, record.n_support) if record.calls else ()
    with _Record() as record:
        forward(params, support_x)
    return tuple(record.moments)


def predict(forward: Callable[[Any, Tensor], Tensor], params: Any, moments: Moments, x: Tensor,
            norm: str) -> Tensor:
    """`forward(params, x)` with batch norm in the task's mode: the batch's own statistics
    (`transductive`) or the task's `moments` (`support`)."""
    if check_mode(norm) == "transductive":
        return forward(params, x)
    if norm == "tasknorm":
        if not moments:  # no batch norm in the model
            return forward(params, x)
        with _TaskNorm(moments) as replay:
            outputs = forward(params, x)
        if 2 * replay.calls != len(moments) - 1:
            raise ValueError(f"the forward called batch norm {replay.calls} times, the support "
                             f"set {(len(moments) - 1) // 2}: a forward must call the same norm "
                             "layers whatever its input")
        return outputs
    with _Replay(moments) as replay:
        outputs = forward(params, x)
    if replay.used != len(moments):
        raise ValueError(f"the forward called batch norm {replay.used // 2} times, the support set "
                         f"{len(moments) // 2}: a forward must call the same norm layers whatever "
                         "its input")
    return outputs
