"""The C++ example (`scripts/embed/cpp`) built with CMake against the torch wheel's libtorch:
its predictions equal the Python runtime's within 1e-5.

The build takes a minute, so it is cached in the temporary folder under a key made of the sources
and the torch build; a lock keeps concurrent test runs from building the same folder twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import ROOT, make_task

import serve
from serve import tensor_file

SOURCES = ROOT / "scripts/embed/cpp"


def torch_root() -> Path:
    import torch

    return Path(torch.__file__).parent


@pytest.fixture(scope="session")
def cpp_program() -> Path:
    cmake = shutil.which("cmake")
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cmake is None or compiler is None:
        pytest.skip("no CMake or C++ compiler on this machine (install cmake and g++ to build "
                    "scripts/embed/cpp)")
    import torch

    key = hashlib.sha256()
    for name in ("CMakeLists.txt", "main.cpp"):
        key.update((SOURCES / name).read_bytes())
    key.update(f"{torch.__version__} {torch_root()} {compiler}".encode())
    build = Path(tempfile.gettempdir()) / f"maml-embed-cpp-{key.hexdigest()[:16]}"
    build.mkdir(exist_ok=True)
    program = build / "maml_adapter"
    with open(build / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not program.is_file():
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
            for cmd in (
                [cmake, "-S", str(SOURCES), "-B", str(build), *generator,
                 f"-DTORCH_ROOT={torch_root()}", f"-DTORCH_CXX11_ABI={abi}"],
                [cmake, "--build", str(build), "-j", str(os.cpu_count() or 1)],
            ):
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n" \
                                               f"{result.stderr[-3000:]}"
    return program


def parse(stdout: str) -> tuple[np.ndarray, list[int] | None]:
    """The program's `shape ...`, value rows and optional `classes ...` lines."""
    lines = stdout.strip().splitlines()
    shape = [int(d) for d in lines[0].split()[1:]]
    rows = [[float(v) for v in line.split()] for line in lines[1 : 1 + shape[0]]]
    classes = None
    if len(lines) > 1 + shape[0]:
        assert lines[1 + shape[0]].startswith("classes ")
        classes = [int(c) for c in lines[1 + shape[0]].split()[1:]]
    return np.array(rows).reshape(shape), classes


def test_cpp_program_matches_the_python_runtime(cpp_program, exported, tmp_path):
    adapter = serve.load(exported.directory, "torchscript")
    for k_shot, q_query, seed in ((1, 3, 20), (2, 5, 21)):
        task = make_task(exported.meta, k_shot, q_query, seed)
        file = tmp_path / f"task{seed}.bin"
        tensor_file.save(file, task)
        result = subprocess.run([str(cpp_program), str(exported.directory), str(file)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        outputs, classes = parse(result.stdout)
        expected = adapter.adapt(task["support_x"], task["support_y"]).predict(task["query_x"])
        assert outputs.shape == expected.shape
        np.testing.assert_allclose(outputs, expected, atol=1e-5, rtol=0)
        if exported.classification:
            assert classes == expected.argmax(-1).tolist()
        else:
            assert classes is None


def test_cpp_program_reports_bad_input(cpp_program, sine, tmp_path):
    (tmp_path / "bad.bin").write_bytes(b"not a tensor file")
    result = subprocess.run([str(cpp_program), str(sine.directory), str(tmp_path / "bad.bin")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "is not a tensor file" in result.stderr
    result = subprocess.run([str(cpp_program)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage:" in result.stderr


def run_program(program: Path, directory: Path, task: dict, tmp_path: Path):
    file = tmp_path / "task.bin"
    tensor_file.save(file, task)
    return subprocess.run([str(program), str(directory), str(file)], capture_output=True,
                          text=True, timeout=120)


def test_cpp_program_refuses_a_modified_adapter_file(cpp_program, omniglot, tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(omniglot.directory, copy)
    with open(copy / "predict.ts", "ab") as f:
        f.write(b"x")
    result = run_program(cpp_program, copy, make_task(omniglot.meta, 1, 2, 5), tmp_path)
    assert result.returncode == 1
    assert "predict.ts does not match its sha256 in adapter.json" in result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""

    (copy / "adapter.json").unlink()
    result = run_program(cpp_program, copy, make_task(omniglot.meta, 1, 2, 5), tmp_path)
    assert result.returncode == 1 and "has no adapter.json" in result.stderr


def test_cpp_program_checks_the_task_like_the_python_runtime(cpp_program, omniglot, sine,
                                                            tmp_path):
    """Each bad task is one `error:` line, worded as serve/validation.py words it."""
    good = make_task(omniglot.meta, 2, 2, 6)
    n = omniglot.meta["n_way"]
    cases = [
        (omniglot, {**good, "support_y": good["support_y"] + 2}, f"outside [0, {n})"),
        (omniglot, {**good, "support_y": np.zeros(n, np.int64)}, "class 1 has no support example"),
        (omniglot, {**good, "query_x": good["query_x"][:, :, :10]},
         f"query_x has shape ({2 * n}, 1, 10, 28), expected (N, 1, 28, 28)"),
        (omniglot, {**good, "support_x": np.where(good["support_x"] > 0.5, np.nan,
                                                  good["support_x"]).astype(np.float32)},
         "support_x has"),
        (omniglot, {**good, "support_y": good["support_y"][:-1]},
         f"support_x has {2 * n} examples but support_y has {2 * n - 1}"),
        (sine, good, f"support_x has shape ({2 * n}, 1, 28, 28), expected (N, 1)"),
    ]
    for adapter, task, message in cases:
        result = run_program(cpp_program, adapter.directory, task, tmp_path)
        assert result.returncode == 1, (message, result.stdout)
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and result.stdout == ""
