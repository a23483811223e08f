"""An exported adapter as a Python object: adapt to a support set, then predict queries.

    adapter = serve.load("runs/adapter")                 # onnxruntime, numpy in and out
    task = adapter.adapt(support_x, support_y)           # the adapted task, computed once
    outputs = task.predict(query_x)                      # logits (Q, n_way) or values (Q, ...)

Inputs are numpy arrays or nested lists; for an image adapter also lists of PNG / JPEG files or
bytes, preprocessed as its `adapter.json` records. Every input is checked (`serve.validation`)
before any computation, and every problem is a one-line `maml.errors.UsageError`, as are
non-finite adapted weights or outputs (inputs far outside the training range).

Batch norm follows the adapter's normalisation mode (`adapter.norm`, recorded at training time):
- `support` (the default for new runs) and `tasknorm`: queries are normalised with the support
  set's statistics (blended with each query's own, for `tasknorm`), kept with the task, so each
  query's output depends on that query alone: send one or many.
- `transductive` (the MAML paper's, and every adapter exported before the modes): queries are
  normalised with the statistics of the query batch, so an answer depends on the other queries
  sent with it; a batch of fewer queries than `n_way` gets a `TransductiveWarning`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from maml.errors import UsageError
from serve import metadata
from serve.backends import Backend, make_backend
from serve.image_input import (
    check_pixel_budget,
    images_to_inputs,
    is_image_list,
    labels,
    read_images,
)
from serve.validation import Limits, Signature, check_query, check_size, check_support


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits along the last axis (numerically stable)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def finite_outputs(outputs: np.ndarray) -> np.ndarray:
    """`outputs`, refused when any is NaN or infinite (a diverged adaptation, not an answer)."""
    if not np.isfinite(outputs).all():
        raise UsageError("the adapted model produced non-finite outputs for these inputs (are "
                         "they far outside the training range?); send smaller values")
    return outputs


class TransductiveWarning(UserWarning):
    """A transductive adapter was asked about fewer queries than it has classes."""


def transductive_warning(adapter: Adapter, n_queries: int) -> str | None:
    """Why these queries' answers depend on the batch they came in, or None where they don't."""
    layers = (adapter.metadata.get("norm") or {}).get("batch_norm_layers")  # None: older export
    if adapter.norm != "transductive" or layers == 0 or adapter.task_kind != "classification" \
            or n_queries >= adapter.metadata["n_way"]:
        return None
    return (f"this adapter normalises queries with the statistics of the batch they come in "
            f"(transductive batch norm), so the answers for these {n_queries} queries depend on "
            f"the batch: send at least {adapter.metadata['n_way']} queries together, or export "
            "the model again with `--norm support` to answer each query alone")


class Task:
    """One adapted task: its state (the fine-tuned weights, and in the `support` mode the
    support set's batch-norm moments), ready to predict queries."""

    def __init__(self, adapter: Adapter, state: tuple[Any, ...], n_support: int) -> None:
        self.adapter = adapter
        self._state = state
        self.n_support = n_support

    @property
    def state(self) -> tuple[np.ndarray, ...]:
        """Everything `predict` needs, as `adapter.json` names it: `p0..`, then `m0..`."""
        return self.adapter.backend.to_numpy(self._state)

    @property
    def parameters(self) -> tuple[np.ndarray, ...]:
        """The adapted weights, in `adapter.json`'s `parameters` order."""
        return self.state[:len(self.adapter.metadata["parameters"])]

    @property
    def moments(self) -> tuple[np.ndarray, ...]:
        """The support set's batch-norm moments (mean, variance per layer); empty unless the
        adapter's mode is `support`."""
        return self.state[len(self.adapter.metadata["parameters"]):]

    def predict(self, query_x: Any) -> np.ndarray:
        """Outputs for the queries: logits `(Q, n_way)` or regression values `(Q, *target)`.

        In the `support` mode each query's output is its own; a transductive adapter warns
        when the batch is too small to stand for the task (see the module docstring).
        """
        x = self.adapter.query_inputs(query_x)  # checked before the backend is touched
        why = transductive_warning(self.adapter, len(x))
        if why is not None:
            warnings.warn(why, TransductiveWarning, stacklevel=2)
        return finite_outputs(self.adapter.backend.predict(self._state, x))


class Adapter:
    """An exported adapter loaded with one backend; see `serve.load`."""

    def __init__(
        self, directory: Path, meta: dict[str, Any], backend: Backend, limits: Limits
    ) -> None:
        self.directory = directory
        self.metadata = meta
        self.backend = backend
        self.limits = limits
        self.signature = Signature.from_metadata(meta)

    @property
    def task_kind(self) -> str:
        """`"classification"` or `"regression"`."""
        return self.metadata["task"]

    @property
    def norm(self) -> str:
        """The normalisation mode: `"support"`, `"tasknorm"` or `"transductive"` (module docstring)."""
        return metadata.norm_mode(self.metadata)

    def inputs(self, x: Any, name: str) -> Any:
        """Images (files or bytes) become input arrays; anything else passes through unchanged."""
        if is_image_list(x):
            if name == "query_x":  # sizes are checked before decoding, as for arrays
                check_size(x, name, self.limits.max_query, "max_query")
            else:
                check_size(x, name, self.limits.max_support, "max_support")
            return images_to_inputs(x, self.metadata.get("preprocessing"),
                                    self.signature.input_shape, name)
        return x

    def support_inputs(self, support_x: Any, support_y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Checked support inputs and labels (or targets) from arrays, lists or images."""
        return check_support(self.inputs(support_x, "support_x"), support_y, self.signature,
                             self.limits)

    def query_inputs(self, query_x: Any) -> np.ndarray:
        """Checked float32 `(Q, *input_shape)` queries from arrays, lists or images."""
        return check_query(self.inputs(query_x, "query_x"), self.signature, self.limits)

    def adapt(self, support_x: Any, support_y: Any) -> Task:
        """Fine-tune the meta-learned weights on a support set (labels `0..n_way-1` or targets)."""
        x, y = self.support_inputs(support_x, support_y)
        task = Task(self, self.backend.adapt(x, y), len(x))
        if not all(np.isfinite(t).all() for t in task.state):
            raise UsageError("adapting to this support set gave non-finite weights (are its "
                             "inputs or targets far outside the training range?); send smaller "
                             "values")
        return task

    def adapt_predict(self, support_x: Any, support_y: Any, query_x: Any) -> np.ndarray:
        """Adapt and predict in one call (one graph; nothing kept between calls).

        With images on both sides, the pixel budget covers them together, checked from their
        headers before either set is decoded."""
        if is_image_list(support_x) and is_image_list(query_x):
            check_size(support_x, "support_x", self.limits.max_support, "max_support")
            check_size(query_x, "query_x", self.limits.max_query, "max_query")
            support_x, query_x = read_images(support_x, "support_x"), read_images(query_x, "query_x")
            check_pixel_budget(support_x + query_x, labels("support_x", len(support_x))
                               + labels("query_x", len(query_x)))
        x, y = self.support_inputs(support_x, support_y)
        q = self.query_inputs(query_x)
        why = transductive_warning(self, len(q))
        if why is not None:
            warnings.warn(why, TransductiveWarning, stacklevel=2)
        return finite_outputs(self.backend.adapt_predict(x, y, q))


def load(
    path: str | Path, backend: str | None = None, *, limits: Limits | None = None,
    threads: int = 0, verify: bool = True,
) -> Adapter:
    """Load an exported adapter from its directory (or `adapter.json`, or one of its files).

    `backend` is `"onnx"` (onnxruntime; the default for a directory) or `"torchscript"` (needs
    torch); naming a `.onnx` / `.ts` file picks its backend. `limits` bounds the support and query
    sizes one call accepts; `threads` sets the backend's intra-op threads (0: its default).
    `verify` checks each loaded file against the sha256 recorded in `adapter.json`.
    """
    directory, name = metadata.locate(path, backend)
    meta = metadata.read(directory)
    files = metadata.entry_files(meta, directory, name)
    if verify:
        metadata.verify_files(meta, files)
    runner = make_backend(name, files, metadata.state_names(meta), threads)
    return Adapter(directory, meta, runner, limits or Limits())
