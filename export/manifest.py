"""`adapter.json`: everything a runtime needs to use the exported files without torch.

Written from the restored run and the traced routine; the layout is the adapter contract
(`maml-toolkit/adapter-v1`, see the README's Export section). A runtime checks its inputs against
it: `support_x` / `query_x` of shape `(S, *input.shape)`, `support_y` with `S` entries, class
labels in `[0, n_way)` (see `serve.validation`: `check_support`, `check_query`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch

from export.onnx_format import OPSET
from export.trace import Routine, learned_step_sizes
from maml.data import sha256
from maml.experiment import Experiment

FORMAT = "maml-toolkit/adapter-v1"
FORMATS = ("onnx", "torchscript", "pt2")
SUFFIX = {"onnx": "onnx", "torchscript": "ts", "pt2": "pt2"}
INIT = "init.npz"  # the meta-learned weights p0..p{n-1} (numpy), e.g. to predict unadapted
BATCH_NORM = {
    "transductive": "batch statistics (support batch in adapt, query batch in predict)",
    "support": "batch statistics of the support batch in adapt; predict normalises every query "
               "with the support set's moments m0.. (a mean and a variance per batch-norm layer, "
               "in call order), so each query's output depends on that query alone",
    "tasknorm": "TaskNorm-I: adapt normalises each support example with the support moments "
                "blended with its own instance moments; predict does the same for each query with "
                "the support's moments m0.. (a mean and a variance per batch-norm layer, in call "
                "order) and the support size (the last m), so each query's output depends on that "
                "query alone",
}


def file_names(formats: tuple[str, ...]) -> dict[str, dict[str, str]]:
    entries = ("adapt", "predict", "adapt_predict")
    return {fmt: {entry: f"{entry}.{SUFFIX[fmt]}" for entry in entries} for fmt in formats}


def _maml_version() -> str:
    try:
        from importlib.metadata import version

        return version("maml-toolkit")
    except Exception:
        return "0.1.0"


def facts(
    exp: Experiment, r: Routine, lr: float | None, n_way: int | None, target_shape: list[int],
    trained_norm: str | None = None,
) -> dict[str, Any]:
    """What the adapter computes and expects, known before any file is written.

    `trained_norm` is the mode the run was trained in, where it is served in another (`r.norm`).
    """
    cfg, source = exp.cfg, exp.source
    classification = cfg.loss == "cross_entropy"
    preprocessing = getattr(source, "preprocessing", None)  # a folder's: maml.images pixels
    if preprocessing is not None:
        preprocessing = dict(preprocessing)
    elif cfg.dataset == "omniglot" and len(source.input_shape) == 3:  # ink images
        from maml.images import PREPROCESSING

        preprocessing = dict(PREPROCESSING)
        if cfg.dataset == "omniglot":  # drawn input (the page): how pen strokes become images
            from maml.strokes import RASTERISATION

            preprocessing["strokes"] = dict(RASTERISATION)
    return {
        "format": FORMAT,
        "task": "classification" if classification else "regression",
        "n_way": n_way,
        "input": {"shape": list(source.input_shape), "dtype": "float32"},
        "target": ({"shape": [], "dtype": "int64"} if classification
                   else {"shape": target_shape, "dtype": "float32"}),
        "loss": cfg.loss,
        "steps": int(r.step_sizes.shape[0]),
        "step_sizes": r.step_sizes.tolist(),
        "step_sizes_source": "learned" if learned_step_sizes(exp, lr) is not None else "constant",
        "parameters": [{"name": n, "shape": list(p.shape)}
                       for n, p in zip(r.names, r.init, strict=True)],
        "batch_norm": BATCH_NORM[r.norm],
        "norm": {"mode": r.norm, "trained": trained_norm or r.norm,
                 "batch_norm_layers": r.norm_layers,
                 "moments": [{"name": f"m{i}", "shape": list(shape)}
                             for i, shape in enumerate(r.moment_shapes)]},
        "preprocessing": preprocessing,
        "data": {**source.describe(), "split": "test"},
        "model": {"spec": exp.model_spec, "kwargs": exp.model_kwargs},
    }


def manifest(info: dict[str, Any], formats: tuple[str, ...], folder: Path,
             verification: dict[str, Any] | None) -> dict[str, Any]:
    """The complete adapter.json of the files already written to `folder`."""
    files = file_names(formats)
    names = [INIT, *(name for per in files.values() for name in per.values())]
    return {
        **info,
        "init": INIT,
        "files": files,
        "sha256": {name: sha256(folder / name) for name in names},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET,
                     "maml": _maml_version()},
        "verification": verification,
    }


def onnx_metadata(info: dict[str, Any]) -> dict[str, str]:
    """The key facts of adapter.json as ONNX metadata_props (strings)."""
    import json

    return {key: json.dumps(value) for key, value in info.items()}
