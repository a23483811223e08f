"""Fixtures of the runtime tests: tiny real adapters, exported once per session, and services.

Tiny adapters are trained for a meta-iteration or two and exported with `python -m export`: the
sinusoid MLP (regression, no batch norm), a sinusoid MLP with batch norm in both normalisation
modes, and a strided conv net with 8 channels on Omniglot (5-way classification with batch norm
and image preprocessing), in both modes. Exports are cached under the
temporary folder keyed by the sources they depend on (see `_trained_and_exported`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import ROOT, Exported, Server, start_server, stop_server

CACHE = Path(tempfile.gettempdir()) / "maml-serve-test-adapters"


def _sources_key(*parts: str) -> str:
    """A digest of everything an export depends on: the maml/ and export/ sources, torch, args,
    and the maker of the synthetic Omniglot."""
    import torch

    digest = hashlib.sha256(f"{torch.__version__} {parts}".encode())
    for folder in ("maml", "export"):
        for file in sorted((ROOT / folder).rglob("*.py")):
            digest.update(str(file.relative_to(ROOT)).encode() + file.read_bytes())
    digest.update((ROOT / "tests" / "omniglot_data.py").read_bytes())
    return digest.hexdigest()[:16]


def _trained_and_exported(name: str, train_args: list[str], data_root: Path | None = None
                          ) -> Exported:
    """Train and export once; reuse the result while the sources are unchanged.

    Exporting takes about a minute of CPU per adapter, so the result is kept under the temporary
    folder, keyed by the sources of `maml/` and `export/` (a lock serialises concurrent runs).
    `data_root` (the session's synthetic Omniglot) is passed as --data-root but left out of the
    key: its folder name changes every session, its drawings do not.
    """
    export_args = ["--formats", "onnx,torchscript", "--steps", "2", "--no-verify"]
    folder = CACHE / f"{name}-{_sources_key(*train_args, *export_args)}"
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, out = folder / "model.pt", folder / "adapter"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").is_file():
            from maml.__main__ import main

            data = [] if data_root is None else ["--data-root", str(data_root)]
            assert main(["train", *train_args, *data, "--checkpoint", str(checkpoint),
                         "--quiet"]) == 0
            result = subprocess.run(
                [sys.executable, "-m", "export", "--checkpoint", str(checkpoint), "--out",
                 str(out), *export_args],
                cwd=ROOT, capture_output=True, text=True, timeout=900,
            )
            assert result.returncode == 0, f"export failed:\n{result.stdout}\n{result.stderr}"
            (folder / "done").write_text("")
    return Exported(checkpoint, out, json.loads((out / "adapter.json").read_text()))


@pytest.fixture(scope="session")
def sine() -> Exported:
    """The sinusoid MLP (1-40-40-1), meta-trained for 2 iterations, exported with 2 steps."""
    return _trained_and_exported("sine", ["--iterations", "2", "--val-tasks", "5"])


@pytest.fixture(scope="session")
def omniglot(synthetic_omniglot) -> Exported:
    """A 5-way conv net with batch norm (8 channels), 1 iteration on the synthetic Omniglot of
    `tests/conftest.py` (no real data needed), 2 steps."""
    return _trained_and_exported(
        "omniglot", ["--dataset", "omniglot", "--iterations", "1", "--meta-batch-size", "2",
                     "--val-tasks", "2", "--model-kwargs", '{"hidden": 8}'], synthetic_omniglot)


@pytest.fixture(scope="session")
def sine_bn() -> Exported:
    """A sinusoid MLP with batch norm in the `support` mode (the default): no data needed."""
    return _trained_and_exported(
        "sine-bn", ["--iterations", "2", "--val-tasks", "5",
                    "--model", "tests.export_models:batchnorm_mlp"])


@pytest.fixture(scope="session")
def sine_bn_transductive() -> Exported:
    """The same in the `transductive` mode (the MAML paper's)."""
    return _trained_and_exported(
        "sine-bn-transductive", ["--iterations", "2", "--val-tasks", "5", "--norm",
                                 "transductive", "--model", "tests.export_models:batchnorm_mlp"])


@pytest.fixture(scope="session")
def omniglot_transductive(synthetic_omniglot) -> Exported:
    """The Omniglot conv net in the `transductive` mode (synthetic Omniglot too)."""
    return _trained_and_exported(
        "omniglot-transductive",
        ["--dataset", "omniglot", "--norm", "transductive", "--iterations", "1",
         "--meta-batch-size", "2", "--val-tasks", "2", "--model-kwargs", '{"hidden": 8}'],
        synthetic_omniglot)


@pytest.fixture(scope="session")
def omniglot_tasknorm(synthetic_omniglot) -> Exported:
    """The Omniglot conv net in the `tasknorm` mode (synthetic Omniglot too)."""
    return _trained_and_exported(
        "omniglot-tasknorm",
        ["--dataset", "omniglot", "--norm", "tasknorm", "--iterations", "1",
         "--meta-batch-size", "2", "--val-tasks", "2", "--model-kwargs", '{"hidden": 8}'],
        synthetic_omniglot)


@pytest.fixture(params=["sine", pytest.param("omniglot", marks=pytest.mark.omniglot)])
def exported(request) -> Exported:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory) -> Iterator:
    """Start services for one test module; all are stopped when the module ends."""
    started: list[Server] = []

    def start(adapter: Path, *options: str, block_torch: bool = False) -> Server:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = start_server(adapter, log, *options, block_torch=block_torch)
        started.append(server)
        return server

    yield start
    for server in started:
        stop_server(server)
