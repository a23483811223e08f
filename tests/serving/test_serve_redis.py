"""`--task-store redis://...`: tasks kept in a real Redis server survive a kill -9 and restart
of the service, are shared by two service processes, stay bounded, and a Redis that is down or
full gives 503 with a clear message. Each test module starts its own `redis-server` on a free
loopback port (and skips, naming what is missing, without one)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from serve_helpers import ROOT, make_task

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server is not installed (apt-get install -y redis-server)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(tmp_path, *options: str) -> tuple[subprocess.Popen, str]:
    pytest.importorskip("redis", reason="the redis package is not installed (pip install redis)")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
                             *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("redis-server did not start")


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    proc, url = start_redis(tmp_path)
    yield url
    proc.kill()
    proc.wait()


def task_body(meta: dict) -> tuple[dict, dict]:
    task = {k: v.tolist() for k, v in make_task(meta, 5, 3, seed=4).items()}
    return ({"support_x": task["support_x"], "support_y": task["support_y"]},
            {"query_x": task["query_x"]})


def test_a_task_survives_kill_9_and_is_shared_by_replicas(sine, server_factory, redis_url):
    support, query = task_body(sine.meta)
    first = server_factory(sine.directory, "--task-store", redis_url)
    second = server_factory(sine.directory, "--task-store", redis_url)
    created = httpx.post(first.url + "/v1/tasks", json=support)
    assert created.status_code == 201, created.text
    task_id = created.json()["task_id"]
    expected = httpx.post(f"{first.url}/v1/tasks/{task_id}/predict", json=query).json()
    # the other replica answers the same task, equally
    assert httpx.post(f"{second.url}/v1/tasks/{task_id}/predict", json=query).json() == expected
    first.process.kill()  # kill -9
    first.process.wait()
    restarted = server_factory(sine.directory, "--task-store", redis_url)
    assert httpx.get(restarted.url + "/healthz").json()["tasks"] == 1
    assert httpx.post(f"{restarted.url}/v1/tasks/{task_id}/predict", json=query).json() == expected
    assert httpx.delete(f"{second.url}/v1/tasks/{task_id}").status_code == 204
    assert httpx.post(f"{restarted.url}/v1/tasks/{task_id}/predict",
                      json=query).status_code == 404


def test_the_shared_store_is_bounded_by_count(sine, server_factory, redis_url):
    support, query = task_body(sine.meta)
    server = server_factory(sine.directory, "--task-store", redis_url, "--max-tasks", "3")
    ids = [httpx.post(server.url + "/v1/tasks", json=support).json()["task_id"]
           for _ in range(5)]
    codes = [httpx.post(f"{server.url}/v1/tasks/{i}/predict", json=query).status_code
             for i in ids]
    assert codes == [404, 404, 200, 200, 200]
    assert httpx.get(server.url + "/healthz").json()["tasks"] == 3


def test_a_redis_down_or_full_is_a_503_never_a_500(sine, server_factory, tmp_path):
    support, query = task_body(sine.meta)
    proc, url = start_redis(tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    try:
        server = server_factory(sine.directory, "--task-store", url, "--max-tasks", "100000")
        codes = []
        for _ in range(1000):  # each task holds ~7 KB: 2 MB fills within a few hundred
            r = httpx.post(server.url + "/v1/tasks", json=support)
            codes.append(r.status_code)
            if r.status_code != 201:
                break
        assert codes[-1] == 503 and set(codes[:-1]) == {201}, codes[-5:]
        assert "cannot store the task" in r.json()["error"] and "OOM" in r.json()["error"]
        assert r.headers["retry-after"] == "1"
    finally:
        proc.kill()
        proc.wait()
    start = time.monotonic()
    for method, path, body in [("POST", "/v1/tasks", support),
                               ("POST", "/v1/tasks/abc/predict", query),
                               ("DELETE", "/v1/tasks/abc", None)]:
        r = httpx.request(method, server.url + path, json=body, timeout=30)
        assert r.status_code == 503, r.text
        assert "the task store 127.0.0.1:" in r.json()["error"]
    assert time.monotonic() - start < 15  # no hang
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok", "tasks": None,
                                                         "backend": "onnx"}
    assert "Traceback" not in server.log.read_text()
    result = subprocess.run([sys.executable, "-m", "serve", "--adapter", str(sine.directory),
                             "--port", "0", "--task-store", url], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "does not answer" in result.stderr
    assert result.stderr.count("\n") == 1


def test_load_test_kills_one_of_two_replicas_and_loses_nothing(sine, redis_url, tmp_path):
    """scripts/load_test.py --replicas 2 --task-store redis://...: one replica is killed with
    SIGKILL mid-run; the only errors are the requests in flight on it (a clean connection
    error), every task created before the kill is still found after it, and the surviving
    replica goes on answering."""
    out = tmp_path / "replicas.json"
    result = subprocess.run(
        [sys.executable, "scripts/load_test.py", "--adapter", str(sine.directory),
         "--replicas", "2", "--task-store", redis_url, "--clients", "3", "--duration", "4",
         "--kill-after", "2", "--server-threads", "2", "--json-out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    killed = [r for r in report["replicas"] if r["killed"]]
    survivors = [r for r in report["replicas"] if not r["killed"]]
    assert len(killed) == 1 and len(survivors) == 1, report["replicas"]
    assert report["lost_tasks"] == 0, result.stdout
    assert report["tasks_used_after_kill"] > 0, result.stdout  # the check checked something
    kinds = report["errors_by_kind"]
    assert report["errors"] == kinds["in_flight"] <= 3, result.stdout  # one per client at most
    assert report["errors_beyond_in_flight"] == 0, result.stdout
    assert all(f"on replica {killed[0]['index']}:" in e for e in report["first_errors"])
    assert survivors[0]["answered_after_kill"] > 0
    assert killed[0]["answered"] > 0  # it served before it was killed
    assert "target met" in result.stdout and "after kill" in result.stdout
