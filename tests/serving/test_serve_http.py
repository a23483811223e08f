"""The HTTP service, started for real (`python -m serve` on a free loopback port) and driven over
HTTP: results equal to the library's, every kind of bad request, eviction, a concurrent burst."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serve_helpers import ROOT, make_task

import serve

MAX_BODY = 1_000_000


@pytest.fixture(scope="module")
def image_service(omniglot, server_factory):
    """The Omniglot adapter on onnxruntime, in a process where torch cannot be imported."""
    server = server_factory(omniglot.directory, "--max-body-bytes", str(MAX_BODY),
                            "--max-support", "40", "--max-query", "30", block_torch=True)
    return server.url


@pytest.fixture(scope="module")
def library(omniglot):
    return serve.load(omniglot.directory)


def post(url: str, body: object, **kw) -> httpx.Response:
    return httpx.post(url, json=body, timeout=60, **kw)


def as_json(task: dict[str, np.ndarray]) -> dict[str, list]:
    return {k: v.tolist() for k, v in task.items()}


def test_metadata_health_index_and_schema(image_service, omniglot):
    health = httpx.get(image_service + "/healthz").json()
    assert health["status"] == "ok" and health["backend"] == "onnx"
    info = httpx.get(image_service + "/v1/adapter").json()
    assert info["metadata"] == omniglot.meta
    assert info["limits"]["max_support"] == 40 and info["limits"]["max_body_bytes"] == MAX_BODY
    assert 'src="page.js"' in httpx.get(image_service + "/").text  # the drawing page
    paths = httpx.get(image_service + "/openapi.json").json()["paths"]
    assert {"/v1/tasks", "/v1/tasks/{task_id}/predict", "/v1/predict"} <= set(paths)
    body_schema = paths["/v1/tasks"]["post"]["requestBody"]["content"]["application/json"]
    assert set(body_schema["schema"]["required"]) == {"support_x", "support_y"}


def test_task_life_cycle_equals_the_library(image_service, library, omniglot):
    task = make_task(omniglot.meta, 2, 3, seed=10)
    support = {"support_x": task["support_x"].tolist(), "support_y": task["support_y"].tolist()}
    created = post(image_service + "/v1/tasks", support)
    assert created.status_code == 201, created.text
    task_id = created.json()["task_id"]
    assert created.json()["n_support"] == 10
    answer = post(f"{image_service}/v1/tasks/{task_id}/predict",
                  {"query_x": task["query_x"].tolist()})
    assert answer.status_code == 200, answer.text
    out = answer.json()
    expected = library.adapt(task["support_x"], task["support_y"]).predict(task["query_x"])
    np.testing.assert_allclose(out["logits"], expected, atol=1e-5)
    assert out["predictions"] == expected.argmax(-1).tolist()
    np.testing.assert_allclose(out["probabilities"], serve.softmax(expected), atol=1e-6)
    np.testing.assert_allclose(np.sum(out["probabilities"], axis=1), 1.0, atol=1e-6)

    stateless = post(image_service + "/v1/predict", as_json(task))
    assert stateless.status_code == 200, stateless.text
    np.testing.assert_allclose(stateless.json()["logits"], expected, atol=1e-4)

    assert httpx.delete(f"{image_service}/v1/tasks/{task_id}").status_code == 204
    gone = post(f"{image_service}/v1/tasks/{task_id}/predict",
                {"query_x": task["query_x"].tolist()})
    assert gone.status_code == 404 and "no task" in gone.json()["error"]
    assert httpx.delete(f"{image_service}/v1/tasks/{task_id}").status_code == 404


def test_base64_images_equal_arrays(image_service, library):
    from PIL import Image

    from maml.images import preprocess_grayscale

    rng = np.random.default_rng(11)
    drawings = [(rng.random((40, 40)) > 0.3).astype(np.uint8) * 255 for _ in range(8)]
    encoded = []
    for i, d in enumerate(drawings):
        buf = io.BytesIO()
        Image.fromarray(d).save(buf, format="PNG")
        text = base64.b64encode(buf.getvalue()).decode()
        encoded.append(f"data:image/png;base64,{text}" if i % 2 else text)  # both forms
    labels = list(range(5))
    answer = post(image_service + "/v1/predict",
                  {"support_x": encoded[:5], "support_y": labels, "query_x": encoded[5:]})
    assert answer.status_code == 200, answer.text
    arrays = np.stack([preprocess_grayscale(d, 28)[None] for d in drawings])
    expected = library.adapt_predict(arrays[:5], labels, arrays[5:])
    np.testing.assert_allclose(answer.json()["logits"], expected, atol=1e-4)


def test_bad_requests_get_4xx_with_a_json_error(image_service, omniglot):
    task = as_json(make_task(omniglot.meta, 1, 2, seed=12))
    url = image_service + "/v1/predict"
    sx, sy, qx = task["support_x"], task["support_y"], task["query_x"]
    nan = json.dumps({**task, "query_x": [[[[float("nan")] * 28] * 28]] * 2})  # NaN tokens
    huge = json.dumps({**task, "query_x": [[[[7.125] * 28] * 28]] * 2}).replace("7.125", "1e999")
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe{}", 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
        (b"[" * 100_000, 400, "nested too deeply"),
        (nan.encode(), 422, "non-finite"),
        (huge.encode(), 422, "non-finite"),  # 1e999 parses as infinity
        (json.dumps({**task, "query_x": [[[[1e39] * 28] * 28]] * 2}).encode(), 422, "non-finite"),
        (b"[1, 2]", 422, "must be a JSON object"),
        (json.dumps({"support_x": sx, "support_y": sy}).encode(), 422, "lacks query_x"),
        (json.dumps({**task, "extra": 1}).encode(), 422, "unknown extra"),
        (json.dumps({**task, "query_x": [row[0] for row in qx]}).encode(), 422,
         "query_x has shape (10, 28, 28), expected (N, 1, 28, 28)"),
        (json.dumps({**task, "support_y": [y + 1 for y in sy]}).encode(), 422, "label 5 outside"),
        (json.dumps({**task, "support_y": [0] * 5}).encode(), 422, "has no support example"),
        (json.dumps({**task, "support_y": [str(y) for y in sy]}).encode(), 422, "integer"),
        (json.dumps({**task, "query_x": []}).encode(), 422, "query_x is empty"),
        (json.dumps({**task, "query_x": qx * 4}).encode(), 422, "more than the limit of 30"),
        (json.dumps({**task, "query_x": ["bm90IGFuIGltYWdl"]}).encode(), 422,
         "not a readable PNG or JPEG"),
        (json.dumps({**task, "query_x": ["%%% not base64"]}).encode(), 422, "not base64"),
        (json.dumps({**task, "query_x": ["bm90IGFuIGltYWdl", *qx[1:]]}).encode(), 422,
         "query_x mixes base64 images and arrays"),
        (json.dumps({**task, "query_x": ["/etc/passwd"]}).encode(), 422, "not"),
        (json.dumps({**task, "support_y": [False, True, 2, 3, 4]}).encode(), 422,
         "support_y must hold integer class indices 0..4, got boolean values"),
        (json.dumps({**task, "query_x": [[[[True] + row[1:] for row in qx[0][0]]], *qx[1:]]})
         .encode(), 422, "query_x must hold real numbers, got boolean values"),
    ]
    for body, status, message in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"},
                       timeout=60)
        assert r.status_code == status, (body[:80], r.text)
        assert message in r.json()["error"], (message, r.json())
    big = b'{"query_x": [' + b"0.5, " * (MAX_BODY // 5) + b"0.5]}"
    json_type = {"content-type": "application/json"}
    r = httpx.post(url, content=big, headers=json_type, timeout=60)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    r = httpx.post(url, content=(b"0.5, " * 1000 for _ in range(400)), headers=json_type,
                   timeout=60)  # chunked
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    r = post(image_service + "/v1/tasks/unknown/predict", {"query_x": qx})
    assert r.status_code == 404 and "no task 'unknown'" in r.json()["error"]
    r = httpx.get(image_service + "/v1/predict")
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(image_service + "/healthz").status_code == 200  # still serving


def test_concurrent_burst_is_answered_correctly(image_service, library, omniglot):
    tasks = [make_task(omniglot.meta, 1, 2, seed=100 + i) for i in range(24)]

    def one(task):
        r = post(image_service + "/v1/predict", as_json(task))
        return r.status_code, r.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, tasks))
    for task, (status, body) in zip(tasks, answers, strict=True):
        assert status == 200, body
        expected = library.adapt_predict(task["support_x"], task["support_y"], task["query_x"])
        np.testing.assert_allclose(body["logits"], expected, atol=1e-4)


def test_torchscript_backend_serves_regression(sine, server_factory):
    server = server_factory(sine.directory, "--backend", "torchscript")
    task = make_task(sine.meta, 5, 4, seed=13)
    answer = post(server.url + "/v1/predict", as_json(task))
    assert answer.status_code == 200, answer.text
    expected = serve.load(sine.directory, "torchscript").adapt_predict(
        task["support_x"], task["support_y"], task["query_x"])
    np.testing.assert_allclose(answer.json()["predictions"], expected, atol=1e-5)
    assert "probabilities" not in answer.json()
    r = post(server.url + "/v1/predict", {**as_json(task), "support_y": [1.0] * 5})
    assert r.status_code == 422 and "expected (N, 1)" in r.json()["error"]
    # finite but far out of range: the adaptation diverges, and no dead task is stored
    wild = {"support_x": [[1e10]], "support_y": [[1e10]]}
    r = post(server.url + "/v1/tasks", wild)
    assert r.status_code == 422 and "non-finite weights" in r.json()["error"], r.text
    assert httpx.get(server.url + "/healthz").json()["tasks"] == 0


def test_tasks_are_evicted_by_count_and_idle_time(sine, server_factory, tmp_path):
    (tmp_path / "index.html").write_text("<h1>draw here</h1>")
    by_count = server_factory(sine.directory, "--max-tasks", "2", "--static", str(tmp_path))
    assert httpx.get(by_count.url + "/").text == "<h1>draw here</h1>"  # the page hook
    by_time = server_factory(sine.directory, "--task-ttl", "0.5")
    task = as_json(make_task(sine.meta, 3, 2, seed=14))
    support = {"support_x": task["support_x"], "support_y": task["support_y"]}
    query = {"query_x": task["query_x"]}
    ids = [post(by_count.url + "/v1/tasks", support).json()["task_id"] for _ in range(3)]
    codes = [post(f"{by_count.url}/v1/tasks/{i}/predict", query).status_code for i in ids]
    assert codes == [404, 200, 200]  # the least recently used was evicted to keep 2
    assert httpx.get(by_count.url + "/healthz").json()["tasks"] == 2
    idle = post(by_time.url + "/v1/tasks", support).json()["task_id"]
    time.sleep(0.8)  # idle over 0.5 s (that tasks live until then: test_serve_validation.py)
    assert post(f"{by_time.url}/v1/tasks/{idle}/predict", query).status_code == 404
    assert httpx.get(by_time.url + "/healthz").json()["tasks"] == 0


def test_command_line_errors_are_one_line(tmp_path, sine):
    adapter = ["--adapter", str(sine.directory)]
    for args, message in (
        (["--adapter", str(tmp_path / "missing")], "does not exist"),
        (["--adapter", str(tmp_path)], "has no adapter.json"),
        ([*adapter, "--threads", "0"], "must be >= 1"),
        ([*adapter, "--intra-op-threads", "-1"], "--intra-op-threads must be >= 0"),
        ([*adapter, "--port", "99999"], "pick another --port"),
        ([*adapter, "--task-ttl", "inf"], "--task-ttl must be a positive, finite number"),
        ([*adapter, "--task-ttl", "nan"], "--task-ttl must be a positive, finite number"),
        ([*adapter, "--max-taks", "3"], "unknown option --max-taks; did you mean --max-tasks?"),
        ([*adapter, "--port", "http"], "argument --port: invalid int value: 'http'"),
    ):
        result = subprocess.run([sys.executable, "-m", "serve", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    wrong = subprocess.run([sys.executable, "-m", "serve", *adapter, "--log-level", "loud"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "invalid choice: 'loud'" in wrong.stderr  # was a KeyError
    assert len(wrong.stderr.strip().splitlines()) == 1


def test_load_test_script_reports_no_errors(sine, tmp_path):
    out = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, "scripts/load_test.py", "--adapter", str(sine.directory),
         "--clients", "2", "--duration", "1", "--json-out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["errors"] == 0, result.stdout
    for op in ("adapt", "predict", "stateless", "delete"):
        assert report["operations"][op]["requests"] > 0, result.stdout
    assert "p99 ms" in result.stdout
    refused = subprocess.run([sys.executable, "scripts/load_test.py", "--url",
                              "http://192.0.2.1:8000"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and "not a loopback address" in refused.stderr


def test_load_test_script_resolves_a_relative_adapter_from_the_callers_folder(sine):
    """The service it starts runs in the project folder; the path is the caller's."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load_test.py"), "--adapter",
         sine.directory.name, "--clients", "1", "--duration", "0.5"],
        cwd=sine.directory.parent, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "p99 ms" in result.stdout


def test_listening_socket_disables_nagle():
    """asyncio sets TCP_NODELAY on accepted sockets only when the listener says proto=TCP;
    without it each keep-alive answer waited ~40 ms for the client's delayed ACK."""
    import socket

    from serve.__main__ import listen

    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        sock.close()
