"""ONNX files of the traced entry points, runnable by onnxruntime with numpy only.

The routine is traced again with core-ATen and backward decompositions (`export.decompositions`)
so that every operator has an ONNX translation, then exported by `torch.onnx.export(dynamo=True)`
at opset 18 with dynamic support and query sizes; `adapt_predict` is the composition of the
`adapt` and `predict` models. Key facts of `adapter.json` are also written
into each model's `metadata_props`.
"""

from __future__ import annotations

import io
import re
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import onnx
import torch
from onnx import compose as compose_lib
from torch.fx import GraphModule

from maml.errors import UsageError, gist

OPSET = 18


def dynamic_shapes(input_names: list[str]) -> dict[str, dict[int, torch.export.Dim] | None]:
    """S shared by support_x / support_y, Q for query_x, weights static."""
    support = torch.export.Dim("S", min=1, max=1 << 20)
    query = torch.export.Dim("Q", min=1, max=1 << 20)
    spec = {"support_x": {0: support}, "support_y": {0: support}, "query_x": {0: query}}
    return {name: spec.get(name) for name in input_names}


def _unsupported(exc: BaseException) -> str:
    """The first aten operator an exporter error names, else its first line."""
    text = str(exc)
    match = re.search(r"aten[.:]+[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?", text)
    if match:
        return f"operator {match.group(0)} has no ONNX translation"
    return gist(exc, 300)


def to_onnx(gm: GraphModule, example: tuple[torch.Tensor, ...], input_names: list[str],
            output_names: list[str]) -> onnx.ModelProto:
    """Export a decomposed traced graph to an in-memory ONNX model (opset 18)."""
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), \
                redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                gm, example, dynamo=True, opset_version=OPSET, input_names=input_names,
                output_names=output_names, dynamic_shapes=dynamic_shapes(input_names),
                external_data=False, verbose=False, report=False,
            )
    except Exception as exc:
        raise UsageError(f"cannot export to ONNX: {_unsupported(exc)}; --formats "
                         "torchscript,pt2 writes the other formats") from None
    return _outputs_from_nodes(program.model_proto)


def _outputs_from_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every graph output a producing node.

    A weight the forward never uses has a zero gradient, so `adapt` returns it unchanged and the
    exporter folds that output into a constant: the output *is* an initializer (with a value_info
    of the same name). ONNX's model composition renames both and then cannot find the output, so
    the constant gets its own name and an Identity produces the output.
    """
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    outputs = {out.name for out in graph.output}
    kept = [info for info in graph.value_info if info.name not in outputs]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for out in graph.output:
        if out.name in constants:
            constants[out.name].name = f"{out.name}_constant"
            graph.node.append(onnx.helper.make_node(
                "Identity", [f"{out.name}_constant"], [out.name], name=f"{out.name}_identity"))
    return model


def compose(adapt: onnx.ModelProto, predict: onnx.ModelProto,
            state: list[str]) -> onnx.ModelProto:
    """`adapt_predict` as the adapt graph feeding the predict graph (the same two graphs, and
    one export instead of a third, slower one)."""
    first = compose_lib.add_prefix(adapt, "adapt/", rename_inputs=False, rename_outputs=False)
    second = compose_lib.add_prefix(predict, "predict/", rename_inputs=False,
                                    rename_outputs=False)
    return compose_lib.merge_models(first, second,
                                    io_map=[(name, name) for name in state])


def save(model: onnx.ModelProto, path: Path, metadata: dict[str, str]) -> None:
    """Write `model` with `metadata` as its metadata_props, after ONNX's own check."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
