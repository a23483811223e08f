"""Reading an exported adapter's `adapter.json` and checking its files before anything runs.

An export directory (see the contract in `export/`) holds `adapter.json` plus the model files of
each format. `locate` turns what a user passes (the directory, `adapter.json`, or one of the model
files) into the directory and a backend; `read` parses and checks `adapter.json`; `verify_files`
compares each file the backend will load with the sha256 recorded at export, so a truncated copy
or an edited file is refused with a clear message instead of computing wrong answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maml.data import sha256
from maml.errors import UsageError

FORMAT = "maml-toolkit/adapter-v1"
METADATA = "adapter.json"
BACKENDS = ("onnx", "torchscript")
SUFFIXES = {".onnx": "onnx", ".ts": "torchscript"}
ENTRY_POINTS = ("adapt", "predict", "adapt_predict")
REQUIRED = ("format", "task", "n_way", "input", "target", "loss", "steps", "parameters",
            "files", "sha256")


def locate(path: str | Path, backend: str | None) -> tuple[Path, str]:
    """The export directory and backend for `path` (a directory, adapter.json or a model file).

    `backend=None` means onnxruntime for a directory, or the format of the file that was named.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"{path} does not exist; pass an export directory written by "
                         "`python -m export`")
    named = None
    if path.is_file():
        named = SUFFIXES.get(path.suffix)
        if named is None and path.name != METADATA:
            raise UsageError(f"{path} is neither an export directory, {METADATA}, nor an "
                             f"{' / '.join(SUFFIXES)} file of one")
        path = path.parent
    if backend is None:
        backend = named or "onnx"
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if named is not None and named != backend:
        raise UsageError(f"the file given is a {named} file but backend={backend!r} was asked "
                         f"for; pass the directory, or backend={named!r}")
    return path, backend


def read(directory: Path) -> dict[str, Any]:
    """Parse and check `directory/adapter.json`."""
    file = directory / METADATA
    if not file.is_file():
        raise UsageError(f"{directory} has no {METADATA}: it is not an export directory "
                         "(write one with `python -m export`)")
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{file} is not readable JSON ({exc}); re-export the adapter") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UsageError(f"{file} has format {found!r}; this runtime reads {FORMAT!r}")
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise UsageError(f"{file} lacks {', '.join(missing)}; re-export the adapter")
    if meta["task"] not in ("classification", "regression"):
        raise UsageError(f"{file}: unknown task {meta['task']!r}")
    if meta["task"] == "classification" and not (
        isinstance(meta["n_way"], int) and meta["n_way"] >= 1
    ):
        raise UsageError(f"{file}: a classification adapter needs an integer n_way")
    norm = meta.get("norm", {"mode": "transductive", "moments": []})
    if not (isinstance(norm, dict) and norm.get("mode") in ("transductive", "support", "tasknorm")
            and isinstance(norm.get("moments"), list)
            and all(isinstance(m, dict) and isinstance(m.get("name"), str)
                    for m in norm["moments"])):
        raise UsageError(f"{file}: 'norm' must be {{'mode': 'transductive', 'support' or 'tasknorm', "
                         f"'moments': [{{'name': ..., 'shape': [...]}}, ...]}}, got {norm!r}; "
                         "re-export the adapter")
    for key in ("input", "target"):
        spec = meta[key]
        if not (isinstance(spec, dict) and isinstance(spec.get("shape"), list)):
            raise UsageError(f"{file}: '{key}' must be {{'shape': [...], 'dtype': ...}}")
    return meta


def norm_mode(meta: dict[str, Any]) -> str:
    """The adapter's normalisation mode: `support` or `tasknorm` (each query answered alone) or
    `transductive` (queries normalised together; adapters exported before the modes)."""
    return (meta.get("norm") or {}).get("mode", "transductive")


def state_names(meta: dict[str, Any]) -> list[str]:
    """What `adapt` returns and `predict` takes before `query_x`: the weights `p0..`, then the
    support set's batch-norm moments `m0..` (none for a transductive adapter; TaskNorm's end with
    the support size)."""
    moments = (meta.get("norm") or {}).get("moments", [])
    return [f"p{i}" for i in range(len(meta["parameters"]))] + [m["name"] for m in moments]


def entry_files(meta: dict[str, Any], directory: Path, backend: str) -> dict[str, Path]:
    """The files of `backend`'s entry points, as recorded in `adapter.json`."""
    files = meta["files"].get(backend)
    if not isinstance(files, dict):
        exported = ", ".join(sorted(meta["files"])) or "none"
        raise UsageError(f"this adapter was not exported for {backend} (formats: {exported}); "
                         f"re-export with --formats including {backend}, or pick another backend")
    missing = [name for name in ENTRY_POINTS if name not in files]
    if missing:
        raise UsageError(f"adapter.json lists no {backend} file for {', '.join(missing)}")
    return {name: directory / files[name] for name in ENTRY_POINTS}




def verify_files(meta: dict[str, Any], files: dict[str, Path]) -> None:
    """Refuse a missing file, or one whose sha256 differs from `adapter.json`'s record."""
    recorded = meta["sha256"]
    for path in files.values():
        if not path.is_file():
            raise UsageError(f"{path} is missing from the export directory; copy the whole "
                             "directory, or re-export")
        expected = recorded.get(path.name)
        if expected is None:
            raise UsageError(f"adapter.json records no sha256 for {path.name}; re-export the "
                             "adapter")
        actual = sha256(path)
        if actual != expected:
            raise UsageError(
                f"{path} does not match its sha256 in adapter.json (expected {expected[:12]}..., "
                f"found {actual[:12]}...): the file was modified or truncated; copy it again or "
                "re-export"
            )
