"""Fixtures of the runtime tests: tiny real adapters, exported once per session, and services.

Two adapters are trained for a meta-iteration or two and exported with `python -m export`: the
sinusoid MLP (regression, no batch norm) and a strided conv net with 8 channels on Omniglot
(5-way classification with batch norm and image preprocessing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import OMNIGLOT, ROOT, Exported, Server, start_server, stop_server


def _train(argv: list[str]) -> None:
    from maml.__main__ import main

    assert main(["train", *argv, "--quiet"]) == 0


def _export(checkpoint: Path, out: Path) -> Exported:
    result = subprocess.run(
        [sys.executable, "-m", "export", "--checkpoint", str(checkpoint), "--out", str(out),
         "--formats", "onnx,torchscript"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"export failed:\n{result.stdout}\n{result.stderr}"
    return Exported(checkpoint, out, json.loads((out / "adapter.json").read_text()))


@pytest.fixture(scope="session")
def sine(tmp_path_factory) -> Exported:
    """The sinusoid MLP (1-40-40-1), meta-trained for 2 iterations and exported."""
    d = tmp_path_factory.mktemp("sine")
    _train(["--iterations", "2", "--val-tasks", "5", "--checkpoint", str(d / "s.pt")])
    return _export(d / "s.pt", d / "adapter")


@pytest.fixture(scope="session")
def omniglot(tmp_path_factory) -> Exported:
    """A 5-way conv net with batch norm (8 channels), 1 Omniglot iteration, exported."""
    if not (OMNIGLOT / "images_background.npz").is_file():
        pytest.skip(f"no Omniglot data in {OMNIGLOT.resolve()}")
    d = tmp_path_factory.mktemp("omniglot")
    _train(["--dataset", "omniglot", "--data-root", str(OMNIGLOT), "--iterations", "1",
            "--meta-batch-size", "2", "--val-tasks", "2", "--model-kwargs", '{"hidden": 8}',
            "--checkpoint", str(d / "o.pt")])
    return _export(d / "o.pt", d / "adapter")


@pytest.fixture(params=["sine", "omniglot"])
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
