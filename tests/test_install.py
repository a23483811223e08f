"""A real install: the wheel, installed (not editable) into fresh virtual environments, run from
outside the repository.

- the full install (`maml-toolkit[train]`): `maml train` -> `maml-export` -> the `serve`
  library's predictions, and `maml-serve` serving the drawing page from the wheel's package data;
- the serving runtime alone (`maml-toolkit`, the `serve` part): no torch at all, yet it serves
  the exported ONNX adapter, and `maml` says in one line which extra it lacks.

Nothing is downloaded: the wheel is built without build isolation, and each fresh environment
sees the packages of the environment running the tests through a folder of links that leaves
this project out and holds only what the wheel's declared requirements reach (with `[train]` for
the first, without for the second), so that pip installs the wheel alone, `--no-index`, and
`pip check` proves the wheel's declared requirements are met by exactly that set: a package
missing from them fails the run.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"maml", "export", "serve", "tests"}
pytestmark = pytest.mark.slow

STATIC = {"index.html", "page.js", "strokes.js", "style.css"}


def _top_level(dist: importlib.metadata.Distribution) -> set[str]:
    """The entries a distribution installed at the top of site-packages."""
    return {f.parts[0] for f in dist.files or () if f.parts and f.parts[0] != ".."}


def _ours(name: str) -> bool:
    lowered = name.lower()
    return (name in PROJECT or lowered.startswith(("maml_toolkit", "__editable__"))
            or lowered.endswith(".pth"))


def wheel_requirements(wheel: Path, extra: str = "") -> list[str]:
    """The wheel's declared requirements: its base ones, plus those of `extra` (marker dropped)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        metadata = next(z.read(n).decode() for n in z.namelist() if n.endswith("/METADATA"))
    wanted = []
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                req.marker = None
                wanted.append(str(req))
    return wanted


def shared_site(folder: Path, requirements: list[str]) -> Path:
    """A folder of links to the packages of this environment that `requirements` reach, without
    this project (nor any .pth file). Only those: a package installed here beside them (a peer
    library for the benchmarks, say) must not make `pip check` fail, nor hide a missing one."""
    from packaging.requirements import Requirement

    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir(parents=True)
    names, todo, seen = set(), [Requirement(r) for r in requirements], set()
    while todo:
        req = todo.pop()
        key = (req.name.lower().replace("_", "-"), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = importlib.metadata.distribution(req.name)
        names |= _top_level(dist)
        for dep in map(Requirement, dist.requires or []):  # with the extras asked of `dist`
            if dep.marker is None or any(dep.marker.evaluate({"extra": e})
                                         for e in ("", *req.extras)):
                todo.append(dep)
    names = {n for n in names if not _ours(n)}
    for name in names:
        if (site / name).exists():
            (folder / name).symlink_to(site / name)
    return folder


def fresh_env(where: Path, shared: Path) -> Path:
    """A virtual environment made from the base interpreter, without pip, seeing `shared`."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(where)
    python = where / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_shared_packages.pth").write_text(f"{shared}\n")
    return python


def pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "--no-input",
                           "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=300)


def clean_env(home: Path, venv_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "MAML_DATA", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HOME=str(home), PATH=f"{venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               XDG_CACHE_HOME=str(home / ".cache"))
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the checkout that has a (git-ignored) page runtime in
    serve/static/vendor/ as a checkout with `scripts/setup_browser.sh` run does."""
    work = tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "runs", "out",
                                  "node_modules", "__pycache__", ".pytest_cache", ".ruff_cache",
                                  ".gpu")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=skip, symlinks=True)
    vendor = source / "serve" / "static" / "vendor" / "onnxruntime-web"
    vendor.mkdir(parents=True, exist_ok=True)
    (vendor / "ort-wasm-simd-threaded.wasm").write_bytes(b"\0asm")
    started = time.perf_counter()
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                            "--no-build-isolation", "-q", "-w", str(work / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    print(f"wheel built in {time.perf_counter() - started:.1f} s")
    (found,) = (work / "dist").glob("maml_toolkit-*.whl")
    return found


def test_the_wheel_holds_the_code_the_page_and_the_commands(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {n.split("/")[0] for n in names if not n.startswith("maml_toolkit")} == \
        {"maml", "export", "serve"}  # no tests, scripts or benchmarks
    assert {n.split("/")[-1] for n in names if n.startswith("serve/static/")} == STATIC
    assert not [n for n in names if "vendor" in n]  # built by npm per machine: not shipped
    for command in ("maml = maml.console:maml", "maml-export = maml.console:export",
                    "maml-serve = maml.console:serve"):
        assert command in entry_points
    base = [line for line in metadata.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert base and not [line for line in base if re.search(r"\b(torch|higher|fire)\b", line)]
    assert 'Requires-Dist: torch>=2.4; extra == "train"' in metadata


def start_server(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    match = re.search(r"at (http://\S+)", line)
    if match is None:
        server.kill()
        raise AssertionError(f"no address from {command}: {line!r} {server.stderr.read()[-2000:]}")
    return server, match[1]


def serve_page_and_predict(python: Path, adapter: Path, cwd: Path, env: dict[str, str]) -> None:
    """The library adapts and predicts; `maml-serve` answers with the drawing page and a
    prediction over HTTP."""
    script = (
        "import json, numpy as np, serve\n"
        f"a = serve.load({str(adapter)!r})\n"
        "x = np.linspace(-5, 5, 10, dtype=np.float32)[:, None]\n"
        "q = np.linspace(-4, 4, 7, dtype=np.float32)[:, None]\n"
        "p = a.adapt(x, 2 * np.sin(x + 1)).predict(q)\n"
        "assert p.shape == (7, 1) and np.isfinite(p).all(), p\n"
        "import maml, serve as s\n"
        "print(json.dumps([maml.__file__, s.__file__]))\n"
    )
    done = subprocess.run([python, "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    prefix = str(python.parent.parent) + os.sep
    assert all(f.startswith(prefix) for f in json.loads(done.stdout)), done.stdout
    server, url = start_server(["maml-serve", "--adapter", str(adapter), "--port", "0",
                                "--no-access-log"], cwd, env)
    try:
        with urllib.request.urlopen(url + "/", timeout=30) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        with urllib.request.urlopen(url + "/page.js", timeout=30) as script_file:
            assert script_file.status == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def full_install(wheel, tmp_path_factory):
    """`pip install maml-toolkit[train]` from the wheel in a fresh environment."""
    work = tmp_path_factory.mktemp("full")
    python = fresh_env(work / "venv", shared_site(work / "shared",
                                                  wheel_requirements(wheel, "train")))
    started = time.perf_counter()
    done = pip(python, "install", "--no-index", f"{wheel}[train]")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "maml-toolkit" in done.stdout or "maml_toolkit" in done.stdout, done.stdout
    print(f"installed in {time.perf_counter() - started:.1f} s")
    checked = pip(python, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return work, python


@pytest.fixture(scope="module")
def exported(full_install):
    """`maml train` (sinusoid, 30 iterations) then `maml-export` (ONNX), from outside the
    repository with the installed commands: the adapter's folder."""
    work, python = full_install
    outside, home = work / "outside", work / "home"
    outside.mkdir()
    run = dict(cwd=outside, env=clean_env(home, python.parent.parent), capture_output=True,
               text=True, timeout=300)
    trained = subprocess.run(["maml", "train", "--iterations", "30", "--meta-batch-size", "4",
                              "--val-every", "15", "--log-every", "15", "--val-tasks", "4",
                              "--checkpoint", "run/sine.pt", "--quiet"], **run)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "trained 30 of 30 iterations" in trained.stdout
    done = subprocess.run(["maml-export", "--checkpoint", "run/sine.pt", "--out", "run/adapter",
                           "--formats", "onnx", "--tasks", "1"], **run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any((outside / "run" / "adapter").glob("*.onnx"))
    return outside / "run" / "adapter"


def test_the_full_install_trains_exports_and_serves_from_outside_the_repository(full_install,
                                                                               exported):
    work, python = full_install
    outside, home = work / "outside", work / "home"
    env = clean_env(home, python.parent.parent)
    run = dict(cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    for command in ("maml", "maml-export", "maml-serve"):
        shown = subprocess.run([command, "--help"], **run)
        assert shown.returncode == 0 and shown.stdout.startswith(f"usage: {command} "), shown
    serve_page_and_predict(python, exported, outside, env)
    missing = subprocess.run(["maml", "data"], **run)  # the default folder: in this HOME's cache
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert f"no Omniglot under {home / '.cache' / 'maml-toolkit' / 'omniglot'}" in missing.stderr
    assert not (home / ".cache" / "maml-toolkit").exists()  # nothing left in the cache


def test_the_serving_runtime_installs_and_serves_without_torch(wheel, exported, tmp_path_factory):
    """The base install is the `serve` runtime: onnxruntime, numpy, Pillow, FastAPI, uvicorn."""
    work = tmp_path_factory.mktemp("runtime")
    python = fresh_env(work / "venv", shared_site(work / "shared", wheel_requirements(wheel)))
    done = pip(python, "install", "--no-index", "--no-deps", str(wheel))
    assert done.returncode == 0, done.stderr[-2000:]
    checked = pip(python, "check")  # the wheel's own requirements, met without torch
    assert checked.returncode == 0, checked.stdout + checked.stderr
    outside, home = work / "outside", work / "home"
    outside.mkdir()
    env = clean_env(home, python.parent.parent)
    no_torch = subprocess.run([python, "-c", "import torch"], cwd=outside, env=env,
                              capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    serve_page_and_predict(python, exported, outside, env)
    for command in ("maml", "maml-export"):
        refused = subprocess.run([command, "train"], cwd=outside, env=env, capture_output=True,
                                 text=True, timeout=60)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused
        assert lines[0].startswith(f"error: `{command}` needs the training packages (torch")
        assert lines[0].endswith("install them with pip install 'maml-toolkit[train]'")
