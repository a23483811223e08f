"""Checkpoints: one file per run state, written atomically, loaded without arbitrary pickles.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(path, weights_only=True)`:

    format      "maml-toolkit/checkpoint-v1"
    config      every setting of the run (`maml.config.Config.to_dict()`)
    model       {"spec": "package.module:factory", "kwargs": {...}, "state_dict": {...}}
    inner_lrs   learned step sizes `(steps, tensors)`, or None
    optimizer   the meta-optimizer's state dict
    iteration   meta-iterations done
    rng         {"tasks": task generator state, "torch": global torch RNG state, and on CUDA
                "cuda": the run's GPU's RNG state (dropout draws there)}
    split       Omniglot character indices {"train", "val", "test"}, or None
    metrics     {"best_val": ..., "best_iteration": ..., "last": {...}}
    versions    {"torch": ..., "maml": ...}
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maml.errors import UsageError, gist

FORMAT = "maml-toolkit/checkpoint-v1"
REQUIRED = ("config", "model", "inner_lrs", "iteration")


def umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a temporary file in the same folder, then a rename.

    The state is serialised in memory first, so that a full disk is the file system's OSError
    (one line from `exit_status`), not torch's zip writer's RuntimeError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = io.BytesIO()
    torch.save({"format": FORMAT, **state}, data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~umask())  # as open() would create it, not mkstemp's private 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a full disk names no file
            exc.filename = str(path)
        raise


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; any problem is a one-line `UsageError`."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"checkpoint {path} is a folder; give the .pt file `train` wrote")
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; train one with `python -m maml train`")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise UsageError(f"{path} is not a readable checkpoint: not a file torch.save wrote "
                         "(truncated, or another kind of file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UsageError(
            f"{path} is not a readable checkpoint (truncated or not written by this toolkit): "
            f"{gist(exc)}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"{path} is not a maml-toolkit checkpoint (no '{FORMAT}' format tag)")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise UsageError(f"{path} is an incomplete checkpoint: missing {', '.join(missing)}")
    problem = config_problem(state["config"])
    if problem:
        raise UsageError(f"{path} is an incomplete or corrupt checkpoint: {problem}; use "
                         "another checkpoint of the run or train again")
    return state


def config_problem(config: object) -> str | None:
    """What makes a checkpoint's config unusable (not a dict, or a setting of the wrong type),
    or None."""
    import dataclasses
    import types
    import typing

    from maml.config import Config

    if not isinstance(config, dict):
        return f"its config is a {type(config).__name__}, not a dict of settings"
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name not in config:
            continue
        hint, value = hints[f.name], config[f.name]
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kinds = tuple(typing.get_origin(a) or a for a in allowed)
        if float in kinds:
            kinds += (int,)  # an int is a fine float setting
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wanted = " or ".join("None" if k is type(None) else k.__name__ for k in kinds
                                 if not (k is int and float in kinds))
            return f"config[{f.name!r}] is {value!r:.40}, not {wanted}"
    return None


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, turning a shape or key mismatch into a one-line error."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise UsageError(
            f"the weights in {source} do not fit the model: {gist(exc, 300, lines=3)}"
        ) from None
