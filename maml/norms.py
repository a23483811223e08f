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

The moments are a flat tuple `(mean_0, var_0, mean_1, var_1, ...)`, one pair per batch-norm call
of a forward, in call order, each of shape `(channels,)`; the variance is the biased one that
batch norm divides by. Meta-training differentiates through them (they are functions of the
adapted weights). Instance, layer and group norm use each example's own statistics, so they are
already independent of the other queries and no mode changes them.

`support_moments(forward, params, x)` records the moments; `with_moments(moments)` is the
context in which a forward uses them. Both are `TorchFunctionMode`s over `F.batch_norm` in plain
tensor operations, so they compose with `vmap`, `grad` and tracing like `maml.exact_norms`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

NORM_MODES = ("transductive", "support")
Moments = tuple[Tensor, ...]

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


def has_batch_norm(model: nn.Module) -> bool:
    """Whether any layer of `model` is a batch-norm layer (the only kind a mode changes)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _bind(args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(_BATCH_NORM_DEFAULTS)
    bound.update(zip(_BATCH_NORM_ARGS, args, strict=False))
    bound.update(kwargs)
    return bound


def _uses_batch_statistics(a: dict[str, Any]) -> bool:
    return bool(a["training"]) and a["running_mean"] is None and a["running_var"] is None


def _normalise(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
               bias: Tensor | None, eps: float) -> Tensor:
    shape = [1, -1] + [1] * (x.ndim - 2)
    y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


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


def support_moments(forward: Callable[[Any, Tensor], Tensor], params: Any, support_x: Tensor,
                    norm: str) -> Moments:
    """The task's moments under `params`: each batch-norm call's statistics on the support set.

    Empty for `transductive` (queries then use their own batch's statistics) and for a model
    without batch norm."""
    if check_mode(norm) == "transductive":
        return ()
    with _Record() as record:
        forward(params, support_x)
    return tuple(record.moments)


def predict(forward: Callable[[Any, Tensor], Tensor], params: Any, moments: Moments, x: Tensor,
            norm: str) -> Tensor:
    """`forward(params, x)` with batch norm in the task's mode: the batch's own statistics
    (`transductive`) or the task's `moments` (`support`)."""
    if check_mode(norm) == "transductive":
        return forward(params, x)
    with _Replay(moments) as replay:
        outputs = forward(params, x)
    if replay.used != len(moments):
        raise ValueError(f"the forward called batch norm {replay.used // 2} times, the support set "
                         f"{len(moments) // 2}: a forward must call the same norm layers whatever "
                         "its input")
    return outputs
