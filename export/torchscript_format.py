"""TorchScript files of the traced entry points (`torch.jit.load` in Python, libtorch in C++).

The traced graph calls aten overloads (`aten.mm.default`); TorchScript resolves overload packets
(`aten.mm`) by schema, so each call is retargeted to its packet before `torch.jit.script`.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch.fx import GraphModule

from maml.errors import UsageError, gist


def to_torchscript(gm: GraphModule) -> torch.jit.ScriptModule:
    """Script a traced aten graph; the result takes the same positional tensors."""
    gm = copy.deepcopy(gm)
    for module in gm.modules():  # the composed adapt_predict holds the other two graphs
        if isinstance(module, GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                    node.target = node.target.overloadpacket
            module.recompile()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.14 deprecates jit.script; see the .pt2 files
            return torch.jit.script(gm)
    except Exception as exc:
        raise UsageError(f"cannot compile to TorchScript: {gist(exc, 300, lines=2)}") from None


def save(gm: GraphModule, path: Path) -> None:
    scripted = to_torchscript(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(scripted, str(path))


def load(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu")
