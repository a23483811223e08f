"""Checking a task's inputs before any computation, each problem with its own one-line message.

Everything here is numpy and pure: `check_support` and `check_query` take what a caller sent
(numpy arrays or nested lists, e.g. straight from JSON) and either return arrays of exactly the
shapes and dtypes the exported graphs take, or raise `maml.errors.UsageError` naming the problem:
wrong shape or dtype, an empty set, more examples than the configured limits, non-finite values
(checked after the cast to float32, so 1e39 counts as infinite), labels outside [0, n_way), a
class with no support example, or support sets whose inputs and labels disagree in length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from maml.errors import UsageError


@dataclass(frozen=True)
class Limits:
    """The largest support and query sets one call accepts (memory and latency stay bounded)."""

    max_support: int = 1000
    max_query: int = 1000

    def __post_init__(self) -> None:
        if self.max_support < 1 or self.max_query < 1:
            raise UsageError("max_support and max_query (--max-support, --max-query) must be "
                             "at least 1")


@dataclass(frozen=True)
class Signature:
    """What an adapter takes, from its `adapter.json`: per-example shapes and the task kind."""

    input_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    n_way: int | None  # None for regression

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Signature:
        n_way = meta["n_way"] if meta["task"] == "classification" else None
        return cls(tuple(meta["input"]["shape"]), tuple(meta["target"]["shape"]), n_way)

    @property
    def classification(self) -> bool:
        return self.n_way is not None


def _shape_text(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def check_size(value: Any, name: str, limit: int, limit_name: str) -> None:
    """Refuse an empty or over-limit set before converting it (cheap on huge inputs)."""
    try:
        n = len(value)
    except TypeError:
        raise UsageError(f"{name} must be an array with one entry per example, got "
                         f"{type(value).__name__}") from None
    if n == 0:
        raise UsageError(f"{name} is empty; send at least one example")
    if n > limit:
        raise UsageError(f"{name} has {n} examples, more than the limit of {limit} "
                         f"({limit_name}); split the request or raise the limit")


def _contains_bool(value: Any) -> bool:
    """True when nested lists hold a boolean (numpy would silently read it as 0 or 1)."""
    level = [value]
    while level:  # one nesting level at a time, each scanned by C-level map / chain
        kinds = set(map(type, level))
        if bool in kinds or np.bool_ in kinds:
            return True
        if not kinds & {list, tuple, np.ndarray}:
            return False
        lists = [v for v in level if isinstance(v, list | tuple)]
        arrays = [v for v in level if isinstance(v, np.ndarray)]
        if any(a.dtype == np.bool_ for a in arrays):
            return True
        level = list(chain.from_iterable(lists))
        level += [a.tolist() for a in arrays if a.dtype == object]
    return False


def _numbers(value: Any, name: str, expected: str = "real numbers") -> np.ndarray:
    """`value` as a numeric numpy array, or a clear error for ragged / non-numeric data."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{name} is not a rectangular array of numbers ({exc}); every example "
                         "must have the same shape") from None
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        kinds = {"O": "ragged, mixed or out-of-range", "U": "text", "S": "text", "b": "boolean",
                 "c": "complex"}
        kind = kinds.get(array.dtype.kind, str(array.dtype))
        raise UsageError(f"{name} must hold {expected}, got {kind} values")
    if not isinstance(value, np.ndarray) and _contains_bool(value):
        raise UsageError(f"{name} must hold {expected}, got boolean values (true / false); "
                         "send numbers")
    return array


def _floats(value: Any, name: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    array = _numbers(value, name)
    if array.shape[1:] != shape:
        expected = _shape_text(["N", *shape])
        raise UsageError(f"{name} has shape {_shape_text(array.shape)}, expected {expected}: "
                         f"one {what} of shape {_shape_text(shape)} per example")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(out).all():
        bad = int(np.size(out) - np.isfinite(out).sum())
        raise UsageError(f"{name} has {bad} non-finite value(s) (NaN, infinity, or beyond "
                         "float32's range); send finite numbers")
    return out


def check_query(query_x: Any, sig: Signature, limits: Limits) -> np.ndarray:
    """Query inputs as float32 `(Q, *input_shape)`."""
    check_size(query_x, "query_x", limits.max_query, "max_query")
    return _floats(query_x, "query_x", sig.input_shape, "input")


def check_support(
    support_x: Any, support_y: Any, sig: Signature, limits: Limits
) -> tuple[np.ndarray, np.ndarray]:
    """Support inputs float32 `(S, *input_shape)` and labels int64 `(S,)` or targets float32."""
    check_size(support_x, "support_x", limits.max_support, "max_support")
    check_size(support_y, "support_y", limits.max_support, "max_support")
    x = _floats(support_x, "support_x", sig.input_shape, "input")
    if sig.classification:
        y = _labels(support_y, sig.n_way)
    else:
        y = _floats(support_y, "support_y", sig.target_shape, "target")
    if len(x) != len(y):
        raise UsageError(f"support_x has {len(x)} examples but support_y has {len(y)}; send one "
                         "label per example")
    return x, y


def _labels(value: Any, n_way: int) -> np.ndarray:
    labels = _numbers(value, "support_y", f"integer class indices 0..{n_way - 1}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(f"support_y must hold integer class indices 0..{n_way - 1}, got "
                         f"{labels.dtype} values")
    if labels.ndim != 1:
        raise UsageError(f"support_y has shape {_shape_text(labels.shape)}, expected (N,): one "
                         "class index per example")
    outside = labels[(labels < 0) | (labels >= n_way)]
    if outside.size:
        raise UsageError(f"support_y has label {int(outside[0])} outside [0, {n_way}); this "
                         f"adapter is {n_way}-way, so labels are 0..{n_way - 1}")
    absent = sorted(set(range(n_way)) - set(labels.tolist()))
    if absent:
        raise UsageError(f"class {absent[0]} has no support example (missing classes: "
                         f"{absent}); a {n_way}-way adapter needs at least one example of "
                         "every class")
    return labels.astype(np.int64)
