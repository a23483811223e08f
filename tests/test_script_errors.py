"""Bad input to the scripts under scripts/ ends in one line, `error: ...`, and exit status 2,
before anything is measured (never a traceback, never a run whose result cannot be saved)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def refused(script: str, *args: object) -> str:
    """Run `scripts/<script>` and return its one error line; nothing may have run."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert done.stdout == ""
    return lines[0]


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A sinusoid adapter: 2 meta-iterations, exported as ONNX with 1 step (seconds)."""
    folder = tmp_path_factory.mktemp("sine")
    ckpt = folder / "model.pt"
    for command in (
        ["-m", "maml", "train", "--iterations", "2", "--val-tasks", "2", "--checkpoint",
         str(ckpt), "--quiet"],
        ["-m", "export", "--checkpoint", str(ckpt), "--out", str(folder / "adapter"),
         "--formats", "onnx", "--steps", "1", "--no-verify"],
    ):
        done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    return folder / "adapter"


def test_adapt_onnx_refuses_more_shots_or_queries_than_an_adapter_takes(adapter):
    assert "--shots and --queries must be at most 1000" in refused(
        "adapt_onnx.py", adapter, "--shots", "5000")
    assert "got 10 and 5000" in refused("adapt_onnx.py", adapter, "--queries", "5000")


def test_adapt_onnx_refuses_a_truncated_file_by_its_hash_and_an_unloadable_one(adapter,
                                                                               tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    model = copy / "adapt.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    assert "adapt.onnx does not match its sha256" in refused("adapt_onnx.py", copy)
    # a file whose recorded hash was edited to match: onnxruntime's own refusal, in one line
    meta = json.loads((copy / "adapter.json").read_text())
    meta["sha256"]["adapt.onnx"] = hashlib.sha256(model.read_bytes()).hexdigest()
    (copy / "adapter.json").write_text(json.dumps(meta))
    assert "onnxruntime cannot load" in refused("adapt_onnx.py", copy)


def test_load_test_refuses_a_missing_service_a_url_without_scheme_and_bad_sizes(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    line = refused("load_test.py", "--url", url, "--duration", "1")
    assert line.startswith(f"error: no service at {url} (") and "or use --adapter" in line
    assert "needs http://" in refused("load_test.py", "--url", "127.0.0.1:8000")
    assert "--k-shot must be >= 1" in refused("load_test.py", "--url", url, "--k-shot", "0")
    (tmp_path / "file").write_text("")
    assert "--json-out" in refused("load_test.py", "--url", url, "--json-out",
                                   tmp_path / "file" / "x.json")


# an unfixed script would go on to train on --data-root; a missing one makes it fail at once
def test_bench_adapt_refuses_zero_repeats(tmp_path):
    line = refused("bench_adapt.py", "--models", "cnn", "--steps", "1", "--repeats", "0",
                   "--data-root", tmp_path / "none", "--work", tmp_path / "work",
                   "--out", tmp_path / "out.json")
    assert "--repeats must be >= 1" in line


def test_bench_adapt_refuses_an_unwritable_out_before_measuring(tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "x.json"
    line = refused("bench_adapt.py", "--models", "cnn", "--steps", "1", "--repeats", "1",
                   "--warmup", "0", "--data-root", tmp_path / "none", "--work",
                   tmp_path / "work", "--out", out)
    assert line == (f"error: --out {out} cannot be written (a file stands where a folder is "
                    "needed); choose another path")


def test_bench_distributed_names_the_workloads_and_refuses_zero_processes(tmp_path):
    out = tmp_path / "out.json"  # never benchmarks/, whatever happens
    line = refused("bench_distributed.py", "--workloads", "bogus", "--out", out)
    assert "'bogus'" in line and "sinusoid-mb25" in line and "omniglot-5w1s-mb16" in line
    line = refused("bench_distributed.py", "--workloads", "sinusoid-mb25", "--procs", "0",
                   "--out", out)
    assert "--procs takes comma-separated whole numbers >= 1" in line
    assert not out.exists()


@pytest.mark.parametrize("command, line", [
    (["-m", "export", "--checkpont", "x.pt", "--out", "a"],
     "error: unknown option --checkpont; did you mean --checkpoint?"),
    (["-m", "export", "--checkpoint", "x.pt"], "error: the following arguments are required: --out"),
    (["scripts/reproduce.py", "sinusoid", "--minuts", "3"],
     "error: unknown option --minuts; did you mean --minutes?"),
    (["scripts/bench_train.py", "--iterations", "x"],
     "error: argument --iterations: invalid int value: 'x'"),
])
def test_argument_errors_are_one_line_with_the_closest_option(command, line):
    """As `python -m maml` does: no argparse usage block, a misspelt option named with the real
    one (not reported as a missing --checkpoint)."""
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stderr.strip(), done.stdout) == (2, line, "")
