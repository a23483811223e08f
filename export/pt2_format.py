"""`.pt2` files: the `torch.export` program of the traced entry points (TorchScript's successor).

Load with `torch.export.load(path).module()`; the module takes the same positional tensors.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.fx import GraphModule

from export.onnx_format import dynamic_shapes
from maml.errors import UsageError, gist


def save(gm: GraphModule, example: tuple[torch.Tensor, ...], input_names: list[str],
         path: Path) -> None:
    """Export the traced graph with dynamic S / Q and save it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(gm, example, dynamic_shapes=dynamic_shapes(input_names))
    except Exception as exc:
        raise UsageError(f"cannot export the .pt2 program: {gist(exc, 300)}") from None
    torch.export.save(program, str(path))


def load(path: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.load(str(path)).module()
