"""Check a task's arrays against `adapter.json` before running an adapter (numpy only).

The exported graphs trust their inputs: a class label outside `[0, n_way)` or a support set whose
labels and examples differ in number gives an opaque runtime error or a wrong gradient, not a
clear message. A runtime (`serve/`, `scripts/adapt_onnx.py`) calls `check_task` first; everything
it needs is in adapter.json (`input`, `target`, `n_way`). No torch import here.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class InputError(ValueError):
    """A task's arrays do not fit the adapter; the message names the problem."""


def _examples(name: str, array: np.ndarray, shape: list[int]) -> int:
    if array.dtype != np.float32:
        raise InputError(f"{name} must be float32, got {array.dtype}")
    if array.ndim != 1 + len(shape) or list(array.shape[1:]) != shape:
        raise InputError(f"{name} must have shape (N, {', '.join(map(str, shape))}), "
                         f"got {tuple(array.shape)}")
    if array.shape[0] < 1:
        raise InputError(f"{name} is empty; give at least one example")
    return int(array.shape[0])


def check_task(info: dict[str, Any], support_x: np.ndarray, support_y: np.ndarray,
               query_x: np.ndarray | None = None) -> None:
    """Raise `InputError` unless the arrays are what the adapter described by `info` takes."""
    shape = info["input"]["shape"]
    s = _examples("support_x", support_x, shape)
    if query_x is not None:
        _examples("query_x", query_x, shape)
    target = info["target"]
    if list(support_y.shape) != [s, *target["shape"]]:
        raise InputError(f"support_y must have shape ({', '.join(map(str, [s, *target['shape']]))})"
                         f" to match {s} support examples, got {tuple(support_y.shape)}")
    if support_y.dtype != np.dtype(target["dtype"]):
        raise InputError(f"support_y must be {target['dtype']}, got {support_y.dtype}")
    if info["task"] == "classification":
        n_way = info["n_way"]
        bad = support_y[(support_y < 0) | (support_y >= n_way)]
        if bad.size:
            raise InputError(f"class label {int(bad[0])} is outside [0, {n_way}): this adapter "
                             f"is {n_way}-way; number the classes 0..{n_way - 1}")
