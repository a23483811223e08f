"""Schemathesis over the running service's /openapi.json, every check, a few examples per
operation (the longer run is in docs/serving-security.md): no failure, no 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import ROOT

CONFIG = Path(__file__).with_name("schemathesis.toml")


def st() -> list[str]:
    pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install "
                                               "schemathesis, in the test extra)")
    command = Path(sys.executable).with_name("st")
    return [str(command)] if command.is_file() else [shutil.which("st") or "st"]


def test_schemathesis_finds_no_failure(sine, server_factory):
    server = server_factory(sine.directory)
    result = subprocess.run(
        [*st(), "--config-file", str(CONFIG), "run", server.url + "/openapi.json",
         "--checks", "all", "--max-examples", "10", "--seed", "1", "--no-color"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    assert " passed" in summary and "failure" not in summary.split("SUMMARY")[-1], summary
    assert "Traceback" not in server.log.read_text()
