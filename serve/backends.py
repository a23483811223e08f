"""The two ways to run an exported adapter's graphs: onnxruntime and TorchScript.

Each backend loads the three entry points of the contract and runs them on checked numpy arrays:

- `adapt(support_x, support_y) -> state` (the task's adapted state: the fine-tuned weights, and
  for an adapter in the `support` normalisation mode the support set's batch-norm moments; kept
  in the backend's own array type so a task's predictions need no conversion),
- `predict(state, query_x) -> outputs`, and `adapt_predict(support_x, support_y, query_x)`.

`OnnxBackend` needs only onnxruntime and numpy (onnxruntime releases the GIL while it runs, so
threads serve requests in parallel). `TorchScriptBackend` imports torch when it is built, never
`higher`; the exported programs take their gradients inside the graph, so they run with autograd
enabled and in the mode they were saved in (never `.eval()`: batch norm must keep using batch
statistics, see the contract).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from maml.errors import UsageError, gist


class InferenceError(RuntimeError):
    """The exported graph failed on inputs that passed validation (a runtime or export bug)."""


class Backend(Protocol):
    name: str

    def adapt(self, support_x: np.ndarray, support_y: np.ndarray) -> tuple[Any, ...]: ...

    def predict(self, state: Sequence[Any], query_x: np.ndarray) -> np.ndarray: ...

    def adapt_predict(
        self, support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray
    ) -> np.ndarray: ...

    def to_numpy(self, state: Sequence[Any]) -> tuple[np.ndarray, ...]: ...


class OnnxBackend:
    """onnxruntime sessions for `adapt.onnx`, `predict.onnx` and `adapt_predict.onnx`."""

    name = "onnx"

    def __init__(self, files: dict[str, Path], state: list[str], threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        self.state = state
        expected = {
            "adapt": (["support_x", "support_y"], self.state),
            "predict": ([*self.state, "query_x"], ["outputs"]),
            "adapt_predict": (["support_x", "support_y", "query_x"], ["outputs"]),
        }
        self.sessions = {}
        for entry, path in files.items():
            try:
                session = ort.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own exception types
                raise UsageError(f"onnxruntime cannot load {path}: "
                                 f"{gist(exc, 300)}") from None
            inputs = [i.name for i in session.get_inputs()]
            outputs = [o.name for o in session.get_outputs()]
            if sorted(inputs) != sorted(expected[entry][0]) or outputs != expected[entry][1]:
                raise UsageError(
                    f"{path.name} takes {inputs} and returns {outputs}, expected "
                    f"{expected[entry][0]} -> {expected[entry][1]} (the parameters and moments "
                    "adapter.json declares); it is not an export of this adapter.json"
                )
            self.sessions[entry] = session

    def _run(self, entry: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.sessions[entry].run(None, feeds)
        except Exception as exc:
            raise InferenceError(f"{entry}.onnx failed: {gist(exc, 300)}") from exc

    def adapt(self, support_x: np.ndarray, support_y: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self._run("adapt", {"support_x": support_x, "support_y": support_y}))

    def predict(self, state: Sequence[np.ndarray], query_x: np.ndarray) -> np.ndarray:
        feeds = dict(zip(self.state, state, strict=True))
        feeds["query_x"] = query_x
        return self._run("predict", feeds)[0]

    def adapt_predict(
        self, support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray
    ) -> np.ndarray:
        feeds = {"support_x": support_x, "support_y": support_y, "query_x": query_x}
        return self._run("adapt_predict", feeds)[0]

    def to_numpy(self, state: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        return tuple(state)


class TorchScriptBackend:
    """`torch.jit.load` of `adapt.ts`, `predict.ts` and `adapt_predict.ts` (CPU)."""

    name = "torchscript"

    def __init__(self, files: dict[str, Path], state: list[str], threads: int = 0) -> None:
        try:
            import torch
        except ImportError:
            raise UsageError("the torchscript backend needs torch; install it, or use "
                             "backend='onnx'") from None
        self.torch = torch
        if threads > 0:
            torch.set_num_threads(threads)
        self.state = state
        self.modules = {}
        for entry, path in files.items():
            try:
                with warnings.catch_warnings():  # TorchScript's deprecation notice is noise here
                    warnings.simplefilter("ignore", FutureWarning)
                    self.modules[entry] = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:
                raise UsageError(f"torch.jit.load cannot load {path}: "
                                 f"{gist(exc, 300)}") from None

    def _call(self, entry: str, *args: Any, grad: bool = True) -> Any:
        try:
            # adapt differentiates the support loss inside the graph; predict needs no graph
            with self.torch.set_grad_enabled(grad):
                return self.modules[entry](*args)
        except Exception as exc:
            raise InferenceError(f"{entry}.ts failed: {gist(exc, 300)}") from exc

    def adapt(self, support_x: np.ndarray, support_y: np.ndarray) -> tuple[Any, ...]:
        state = self._call("adapt", self.torch.from_numpy(support_x),
                           self.torch.from_numpy(support_y))
        if len(state) != len(self.state):
            raise UsageError(f"adapt.ts returns {len(state)} tensors, but adapter.json declares "
                             f"{len(self.state)} ({', '.join(self.state)}); it is not an export "
                             "of this adapter.json")
        return tuple(t.detach() for t in state)

    def predict(self, state: Sequence[Any], query_x: np.ndarray) -> np.ndarray:
        out = self._call("predict", *state, self.torch.from_numpy(query_x), grad=False)
        return out.detach().numpy()

    def adapt_predict(
        self, support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray
    ) -> np.ndarray:
        t = self.torch.from_numpy
        return self._call("adapt_predict", t(support_x), t(support_y), t(query_x)).detach().numpy()

    def to_numpy(self, state: Sequence[Any]) -> tuple[np.ndarray, ...]:
        return tuple(t.numpy() for t in state)


def make_backend(name: str, files: dict[str, Path], state: list[str], threads: int) -> Backend:
    """The backend called `name` over the entry-point `files`; `state` names what `adapt`
    returns (`serve.metadata.state_names`)."""
    if name == "onnx":
        return OnnxBackend(files, state, threads)
    return TorchScriptBackend(files, state, threads)
