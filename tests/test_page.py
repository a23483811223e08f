"""The drawing page, tested as a person would use it: real pen trajectories, a real browser.

- `maml/strokes.py` and `serve/static/strokes.js` turn the same strokes into the same bitmap and
  (to 1e-6) the same 28x28 input (Node runs the JavaScript);
- the pen radius makes Omniglot's own trajectories look like its published images;
- headless Chromium (Debian's `chromium`, driven by `playwright-core` from `web/`) opens the page
  served by `python -m serve`, replays human drawings from `strokes_background_small1.zip` as
  pointer input (one drawing of each of N meta-test characters on the class pads, another
  person's drawing of one of them on the query pad), presses "learn", and the test checks that
  the page adapted in the browser (onnxruntime-web), that its inputs and prediction equal the
  Python runtime's for the strokes it recorded, that most rounds are right, that many more
  rounds leak no session or tensor, and that the service fallback
  (driven by touch input this time) gives the Python runtime's answer too.

The adapter is `tests/fixtures/page_omniglot_5w1s.pt`, trained with `--norm support` so that the
page predicts each drawing alone (see `scripts/train_page_fixture.sh`: 1000 meta-iterations,
about 4 minutes on a 2-core CPU, too long for a test),
exported here with `python -m export` and cached under the temporary folder, keyed by the
checkpoint and the export sources. `scripts/setup_browser.sh` installs the browser and the npm
packages; without them the browser tests skip, saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from maml.errors import UsageError
from maml.images import ink_from_omniglot, ink_image
from maml.strokes import PEN_RADIUS, parse_omniglot_strokes, rasterise, strokes_to_input
from tests.omniglot_data import OMNIGLOT, STROKES_ZIP, missing_omniglot

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "page_omniglot_5w1s.pt"
WEB = ROOT / "web"
VENDOR = ROOT / "serve" / "static" / "vendor" / "onnxruntime-web"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NODE = shutil.which("node")
_NAME = re.compile(r"/character\d+/(\d{4})_(\d{2})\.txt$")

needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (Node 20 runs "
                                "strokes.js and the browser driver)")


def read_drawings() -> dict[int, dict[int, list[np.ndarray]]]:
    """`{character row: {drawer 0..19: strokes}}` from the strokes archive."""
    out: dict[int, dict[int, list[np.ndarray]]] = {}
    with zipfile.ZipFile(OMNIGLOT / STROKES_ZIP) as archive:
        for name in archive.namelist():
            match = _NAME.search(name)
            if match and "__MACOSX" not in name:
                text = archive.read(name).decode()
                out.setdefault(int(match[1]) - 1, {})[int(match[2]) - 1] = \
                    parse_omniglot_strokes(text)
    return out


@pytest.fixture(scope="module")
def drawings() -> dict[int, dict[int, list[np.ndarray]]]:
    missing = missing_omniglot(STROKES_ZIP)
    if missing:
        pytest.skip(missing)
    return read_drawings()


def random_drawings(count: int) -> list[list[np.ndarray]]:
    """Pen-like random walks: 1-4 strokes of 1-40 points (dots too), some past the edges."""
    rng = np.random.default_rng(5)
    return [[np.cumsum(rng.normal(0, 3, (rng.integers(1, 41), 2)), axis=0)
             + rng.uniform(-10, 115, 2) for _ in range(rng.integers(1, 5))]
            for _ in range(count)]


def as_lists(strokes: list[np.ndarray]) -> list[list[list[float]]]:
    return [s.tolist() for s in strokes]


def test_parse_rejects_a_foreign_file() -> None:
    with pytest.raises(UsageError, match="line 2 .* not 'x,y,t'"):
        parse_omniglot_strokes("START\nhello\n")
    with pytest.raises(UsageError, match="non-finite"):
        rasterise([[[0.0, float("nan")]]])


def test_a_dot_and_a_segment_ink_the_pixels_within_the_pen_radius() -> None:
    dot = rasterise([[[50.0, 40.0]]])
    rows, cols = np.nonzero(dot)
    assert ((rows - 40.0) ** 2 + (cols - 50.0) ** 2 <= PEN_RADIUS**2).all()
    assert dot.sum() == 21  # lattice points within 2.5 of a lattice point
    line = rasterise([[[10.0, 20.0], [30.0, 20.0]]])
    assert line[20, 10:31].all() and line[18:23, 20].all() and not line[17, 20]
    assert not line[20, 7] and line[20, 8]  # round caps
    assert strokes_to_input([[[10.0, 20.0], [30.0, 20.0]]]).shape == (1, 28, 28)


@pytest.mark.needs_omniglot("images_background.npz", STROKES_ZIP)
def test_rendered_trajectories_look_like_the_published_images(drawings) -> None:
    images = np.load(OMNIGLOT / "images_background.npz")["images"]
    rng = random.Random(0)
    ious, ratios, diffs = [], [], []
    for char in rng.sample(sorted(drawings), 25):
        drawer = rng.randrange(20)
        real = ~images[char, drawer]
        mine = rasterise(drawings[char][drawer]) > 0
        ious.append((real & mine).sum() / (real | mine).sum())
        ratios.append(mine.sum() / real.sum())
        diffs.append(np.abs(strokes_to_input(drawings[char][drawer])[0]
                            - ink_image(ink_from_omniglot(images[char, drawer]))).mean())
    assert np.mean(ious) > 0.9, np.mean(ious)
    assert 0.95 < np.mean(ratios) < 1.05, np.mean(ratios)
    assert np.mean(diffs) < 0.02, np.mean(diffs)


@needs_node
def test_javascript_rasterisation_equals_python() -> None:
    picked = random_drawings(60)
    picked.append([np.array([[0.2, 104.9]]), np.array([[-3.0, 50.0], [110.0, 52.5]])])  # edges
    script = ("import {rasterise, strokesToInput} from './strokes.js';"
              "let s='';process.stdin.on('data',d=>s+=d).on('end',()=>{"
              "const ds=JSON.parse(s);process.stdout.write(JSON.stringify(ds.map(d=>"
              "({bitmap:Array.from(rasterise(d)),input:Array.from(strokesToInput(d))}))));});")
    result = subprocess.run([NODE, "--input-type=module", "-e", script],
                            input=json.dumps([as_lists(d) for d in picked]),
                            capture_output=True, text=True, cwd=ROOT / "serve" / "static",
                            timeout=120, check=True)
    for strokes, js in zip(picked, json.loads(result.stdout), strict=True):
        np.testing.assert_array_equal(np.reshape(js["bitmap"], (105, 105)), rasterise(strokes))
        diff = np.abs(np.reshape(js["input"], (1, 28, 28)) - strokes_to_input(strokes)).max()
        assert diff <= 1e-6, diff


# --- the page in a real browser -------------------------------------------------------------

def _sources_key() -> str:
    digest = hashlib.sha256(FIXTURE.read_bytes())
    for path in sorted([*ROOT.glob("export/*.py"), *ROOT.glob("maml/*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def adapter_dir(synthetic_omniglot) -> Path:
    """The fixture checkpoint exported (ONNX), cached across runs by content (export samples
    a task to trace with: from the synthetic Omniglot, whose drawings do not change the files)."""
    if not FIXTURE.is_file():
        pytest.fail(f"{FIXTURE} is missing; run scripts/train_page_fixture.sh")
    out = Path(tempfile.gettempdir()) / "maml-page-test-adapters" / _sources_key()
    if not (out / "adapter.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "export", "--checkpoint", str(FIXTURE), "--out", str(out),
             "--formats", "onnx", "--no-verify", "--data-root", str(synthetic_omniglot)],
            cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"export failed:\n{result.stdout}\n{result.stderr}"
    return out


@pytest.fixture(scope="module")
def service(adapter_dir):
    """`python -m serve --adapter DIR` on a free loopback port; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", "--adapter", str(adapter_dir), "--port", "0",
         "--no-access-log", "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"at (http://\S+)", line)
        assert match, f"the service did not start: {line}{proc.stdout.read() if proc.poll() else ''}"
        yield match[1] + "/"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_service_serves_the_export_files_read_only(service, adapter_dir) -> None:
    import httpx

    meta = httpx.get(service + "v1/adapter/files/adapter.json").json()
    assert meta == json.loads((adapter_dir / "adapter.json").read_text())
    for name in meta["files"]["onnx"].values():
        body = httpx.get(service + f"v1/adapter/files/{name}").content
        assert hashlib.sha256(body).hexdigest() == meta["sha256"][name]
    for name in ("init.npz", "adapt.ts", "nope.onnx", "..%2Fadapter.json", "%2Fetc%2Fpasswd"):
        answer = httpx.get(service + f"v1/adapter/files/{name}")
        assert answer.status_code == 404, (name, answer.status_code)
        if "%" not in name:
            assert "the service offers adapter.json" in answer.json()["error"]
    assert httpx.post(service + "v1/adapter/files/adapt.onnx").status_code == 405
    page = httpx.get(service)
    assert page.status_code == 200 and 'src="page.js"' in page.text


def browser_missing() -> str | None:
    if NODE is None:
        return "node is not installed"
    if not Path(CHROMIUM).is_file():
        return f"no chromium at {CHROMIUM} (bash scripts/setup_browser.sh installs Debian's)"
    if not (WEB / "node_modules" / "playwright-core").is_dir():
        return "web/node_modules lacks playwright-core (bash scripts/setup_browser.sh)"
    if not (VENDOR / "ort.wasm.min.mjs").is_file():
        return f"no onnxruntime-web in {VENDOR} (bash scripts/setup_browser.sh)"
    return None


def drive(url: str, rounds: list[dict], tmp_path: Path, **options) -> dict:
    """Run web/drive_page.mjs on `rounds`; its JSON result."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = {"url": url, "chromium": CHROMIUM, "userDataDir": str(tmp_path / "profile"),
           "rounds": rounds, **options}
    result = subprocess.run([NODE, str(WEB / "drive_page.mjs")], input=json.dumps(job),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert "error" not in out, f"{out['error']}\nbrowser console: {out['console']}"
    return out


def make_rounds(drawings, test_chars: list[int], n_way: int, count: int) -> list[dict]:
    """Rounds of `n_way` meta-test characters: drawer A on the pads, drawer B on the query."""
    rng = random.Random(1)
    rounds = []
    for _ in range(count):
        chars = rng.sample(test_chars, n_way)
        pad_drawer, query_drawer = rng.sample(range(20), 2)
        answer = rng.randrange(n_way)
        rounds.append({"pads": [as_lists(drawings[c][pad_drawer]) for c in chars],
                       "query": as_lists(drawings[chars[answer]][query_drawer]),
                       "answer": answer, "chars": chars,
                       "drawers": [pad_drawer, query_drawer]})
    return rounds


@pytest.fixture(scope="module")
def browser() -> None:
    """Skip (before exporting anything) where there is no browser to drive."""
    missing = browser_missing()
    if missing:
        pytest.skip(f"no browser to test the page in: {missing}")


@pytest.fixture(scope="module")
def browser_run(browser, drawings, adapter_dir, service, tmp_path_factory):
    """Eight rounds on the page, then 20 more learn/predict rounds on the last drawings."""
    import torch

    meta = json.loads((adapter_dir / "adapter.json").read_text())
    split = torch.load(FIXTURE, weights_only=True)["split"]["test"].tolist()
    test_chars = sorted(set(split) & set(drawings))  # characters never seen in meta-training
    assert len(test_chars) >= 20, len(test_chars)
    rounds = make_rounds(drawings, test_chars, meta["n_way"], 8)
    tmp = tmp_path_factory.mktemp("page")
    shot = Path(os.environ.get("PAGE_SCREENSHOT", tmp / "page.png")).resolve()
    out = drive(service, rounds, tmp, repeat=20, screenshot=str(shot))
    return {"meta": meta, "rounds": rounds, "out": out, "tmp": tmp, "screenshot": shot}


def check_round(sent: dict, seen: dict, runtime, n: int, atol: float) -> tuple[int, float]:
    """Assert the page's inputs and prediction are the Python runtime's; the class shown and
    the largest logit difference."""
    assert seen["shown"]["error"] is None, seen["shown"]
    # the page recorded the replayed pen positions (to the screen's pixel grid)
    for want, got in zip([*sent["pads"], sent["query"]],
                         [*seen["strokes"]["pads"], seen["strokes"]["query"]], strict=True):
        assert [len(s) for s in got] == [len(s) for s in want]
        gap = max(np.abs(np.array(g) - np.array(w)).max() for g, w in zip(got, want))
        assert gap <= 0.5, gap
    # its inputs are maml.strokes' for the strokes it recorded
    support = np.stack([strokes_to_input(s) for s in seen["strokes"]["pads"]])
    query = strokes_to_input(seen["strokes"]["query"])[None]
    assert np.abs(np.reshape(seen["support"], support.shape) - support).max() <= 1e-6
    assert np.abs(np.reshape(seen["prediction"]["input"], query.shape) - query).max() <= 1e-6
    # and its prediction is the Python runtime's for the query alone (a support-mode adapter),
    # or for the batch the page sends a transductive one (query, then examples)
    # (onnxruntime-web's WebAssembly kernels round differently from onnxruntime's: on most tasks
    # the logits agree to 1e-6, on a few the three SGD steps grow that to about 1e-3; measured
    # on the same inputs, so it is the runtimes, not the page)
    batch = query if runtime.norm != "transductive" else np.concatenate([query, support])
    logits = runtime.adapt(support, np.arange(n)).predict(batch)
    np.testing.assert_allclose(seen["prediction"]["logits"], logits[0], atol=atol)
    shown = int(seen["shown"]["class"])
    assert shown == seen["prediction"]["class"] == int(logits[0].argmax())
    assert seen["shown"]["text"].startswith(f"class {shown + 1} ")
    return shown, float(np.abs(np.array(seen["prediction"]["logits"]) - logits[0]).max())


def test_the_page_adapts_in_the_browser_and_recognises_drawings(browser_run, adapter_dir):
    import serve

    out, rounds = browser_run["out"], browser_run["rounds"]
    assert out["backend"] == "browser", out["status"]
    assert "onnxruntime-web" in out["status"]
    runtime = serve.load(adapter_dir)
    right, diffs = 0, []
    for sent, seen in zip(rounds, out["rounds"], strict=True):
        assert seen["pointerTypes"] == ["mouse"]
        shown, diff = check_round(sent, seen, runtime, browser_run["meta"]["n_way"], atol=1e-2)
        right += shown == sent["answer"]
        diffs.append(diff)
    assert np.median(diffs) <= 1e-5, diffs
    assert right >= 0.6 * len(rounds), f"{right} of {len(rounds)} rounds right"


def test_many_rounds_leak_no_session_or_tensor(browser_run):
    out = browser_run["out"]
    meta = browser_run["meta"]
    n_state = len(meta["parameters"]) + len(meta.get("norm", {}).get("moments", []))
    repeats = out["repeats"]
    assert len(repeats) == 20
    assert out["stats"]["sessions"] == 2  # adapt and predict, created once
    assert out["stats"]["rounds"] == len(browser_run["rounds"]) + 20
    for r in repeats:  # the adapted state (weights, moments) is all that lives between rounds
        assert r["stats"]["liveTensors"] == n_state
        assert r["class"] == repeats[0]["class"]
        np.testing.assert_allclose(r["logits"], repeats[0]["logits"], rtol=0, atol=1e-6)


def test_the_screenshot_shows_the_page(browser_run):
    shot = browser_run["screenshot"]
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape[0] >= 600 and image.shape[1] >= 1000
    assert (image < 64).mean() > 0.005  # ink and text, not a blank page


def test_the_service_fallback_with_touch_input(browser_run, service, adapter_dir):
    import serve

    sent = browser_run["rounds"][0]
    out = drive(service + "?backend=service", [sent], browser_run["tmp"] / "fallback",
                pointer="touch")
    assert out["backend"] == "service"
    assert "/v1/tasks" in out["status"] and "?backend=service" in out["status"]
    seen = out["rounds"][0]
    assert seen["pointerTypes"] == ["touch"] and seen["stats"]["sessions"] == 0
    check_round(sent, seen, serve.load(adapter_dir), browser_run["meta"]["n_way"], atol=1e-4)
