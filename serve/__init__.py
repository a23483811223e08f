"""The lightweight runtime for exported MAML adapters: adapt to a support set, then predict.

    import serve
    adapter = serve.load("runs/adapter")            # an export directory; onnxruntime by default
    task = adapter.adapt(support_x, support_y)
    outputs = task.predict(query_x)

Importing `serve` imports numpy and onnxruntime only (never torch or higher), so it runs where
PyTorch is not installed; `backend="torchscript"` needs torch. `python -m serve` is the HTTP
service (`serve.app`); `scripts/embed/cpp/` runs the same adapter from C++.
"""

from maml.errors import UsageError
from serve.adapter import Adapter, Task, TransductiveWarning, load, softmax
from serve.validation import Limits

__all__ = ["Adapter", "Limits", "Task", "TransductiveWarning", "UsageError", "load", "softmax"]
