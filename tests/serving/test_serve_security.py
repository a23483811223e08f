"""The HTTP service under attack: each test reproduces a failure measured in an adversarial run
(issue 25) against a real `python -m serve` on a free loopback port, with real sockets.

Everything stays on 127.0.0.1 and is bounded in count and time."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from serve_helpers import ROOT, make_task

TOKEN = "a-test-token-0123456789abcdef"


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def raw(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data` on a fresh connection and read the answer until the server closes it."""
    with socket.create_connection(address(url), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            chunks.append(b"<reset>")
        return b"".join(chunks)


def sine_task(meta: dict) -> dict:
    return {k: v.tolist() for k, v in make_task(meta, 5, 3, seed=3).items()}


@pytest.fixture(scope="module")
def service(sine, server_factory):
    """The sinusoid adapter with short deadlines, so slow clients are cut off quickly."""
    return server_factory(sine.directory, "--header-timeout", "2", "--body-timeout", "2")


@pytest.fixture(scope="module")
def guarded(sine, server_factory, tmp_path_factory):
    """The same with bearer tokens and one CORS origin."""
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"# tokens\n{TOKEN}\nanother-token-0123456789\n")
    return server_factory(sine.directory, "--auth-token-file", str(tokens),
                          "--cors-origin", "http://allowed.example")


# -- finding 5: protocol details ----------------------------------------------------------------
def test_every_405_names_the_allowed_methods(service):
    for method, path, allowed in [("GET", "/v1/predict", "POST"), ("PUT", "/v1/tasks", "POST"),
                                  ("GET", "/v1/tasks/x", "DELETE")]:
        r = httpx.request(method, service.url + path)
        assert r.status_code == 405 and "error" in r.json()
        assert r.headers.get("allow") == allowed, (method, path, dict(r.headers))


def test_the_schema_bounds_every_array_as_the_service_does(service, sine):
    paths = httpx.get(service.url + "/openapi.json").json()["paths"]
    limits = httpx.get(service.url + "/v1/adapter").json()["limits"]
    for path, fields in [("/v1/tasks", {"support_x": "max_support", "support_y": "max_support"}),
                         ("/v1/tasks/{task_id}/predict", {"query_x": "max_query"}),
                         ("/v1/predict", {"support_x": "max_support", "query_x": "max_query"})]:
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["additionalProperties"] is False
        for name, limit in fields.items():
            prop = schema["properties"][name]
            assert (prop["minItems"], prop["maxItems"]) == (1, limits[limit]), (path, name)
    body = {**sine_task(sine.meta), "query_x": []}
    assert httpx.post(service.url + "/v1/predict", json=body).status_code == 422


def test_a_client_leaving_mid_body_logs_one_line_not_a_traceback(service):
    before = service.log.read_text().count("\n")
    for _ in range(3):
        with socket.create_connection(address(service.url), timeout=5) as sock:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                         b"\r\ncontent-length: 1000\r\n\r\n{\"support_x\": [")
            time.sleep(0.2)
    time.sleep(0.5)
    log = service.log.read_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log, log[-3000:]
    assert log.count("\n") - before <= 3, log[-3000:]


def test_a_long_unknown_task_id_is_not_echoed_whole(service):
    task_id = "x" * 10_000  # (100 KB: over the 16 KB request line, 414 below)
    r = httpx.delete(f"{service.url}/v1/tasks/{task_id}")
    assert r.status_code == 404 and "(10000 chars)" in r.json()["error"]
    assert len(r.content) < 1000


def test_a_megabyte_request_line_gets_an_http_answer_not_a_reset(service):
    answer = raw(service.url, b"GET /" + b"a" * 1_000_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 414 "), answer[:200]
    headers = b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"b" * 1_000_000 + b"\r\n\r\n"
    assert raw(service.url, headers).startswith(b"HTTP/1.1 431 ")
    assert httpx.get(service.url + "/healthz").status_code == 200


# -- finding 3: content type, CORS, authentication ----------------------------------------------
def test_json_endpoints_take_only_application_json(service, sine):
    body = json.dumps(sine_task(sine.meta))
    for content_type in ["text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", None]:
        headers = {"content-type": content_type} if content_type else {}
        r = httpx.post(service.url + "/v1/predict", content=body, headers=headers)
        assert r.status_code == 415, (content_type, r.text)
        assert "Content-Type: application/json" in r.json()["error"]
    r = httpx.post(service.url + "/v1/predict", content=body,
                   headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_no_cross_origin_permission_unless_named(service, guarded):
    origin = {"origin": "http://evil.example"}
    r = httpx.get(service.url + "/v1/adapter", headers=origin)
    assert "access-control-allow-origin" not in r.headers
    preflight = {**origin, "access-control-request-method": "POST",
                 "access-control-request-headers": "content-type"}
    r = httpx.options(service.url + "/v1/predict", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.options(guarded.url + "/v1/predict", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    allowed = {**preflight, "origin": "http://allowed.example",
               "access-control-request-headers": "authorization, content-type"}
    r = httpx.options(guarded.url + "/v1/predict", headers=allowed)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://allowed.example"


def test_bearer_tokens_guard_the_api(guarded, sine):
    url = guarded.url
    body = sine_task(sine.meta)
    for headers in [{}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN},
                    {"authorization": f"Basic {TOKEN}"}, {"authorization": f"Bearer {TOKEN}x"}]:
        r = httpx.post(url + "/v1/predict", json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer" and "bearer token" in r.json()["error"]
        assert httpx.get(url + "/v1/adapter", headers=headers).status_code == 401
    for token in [TOKEN, "another-token-0123456789"]:
        r = httpx.post(url + "/v1/predict", json=body, headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
    assert httpx.get(url + "/healthz").status_code == 200  # liveness stays open
    assert httpx.get(url + "/openapi.json").status_code == 200


def test_a_public_address_needs_tokens(sine, tmp_path):
    def start(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "serve", "--adapter", str(sine.directory),
                               "--port", "0", *options], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    result = start("--host", "0.0.0.0")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "not a loopback address" in result.stderr and "--auth-token-file" in result.stderr
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    result = start("--auth-token-file", str(empty))
    assert result.returncode == 2 and "has no token" in result.stderr
    short = tmp_path / "short"
    short.write_text("abc\n")
    result = start("--auth-token-file", str(short))
    assert result.returncode == 2 and "shorter than 16" in result.stderr


# -- finding 2: slow and idle clients -----------------------------------------------------------
def test_idle_and_slow_connections_do_not_lock_out_clients(service, sine):
    """500 idle connections and 50 with partial headers: a normal client is still answered."""
    host, port = address(service.url)
    held = []
    try:
        for i in range(550):
            sock = socket.create_connection((host, port), timeout=5)
            if i >= 500:
                sock.sendall(b"POST /v1/predict HTTP/1.1\r\nhost: x\r\n")
            held.append(sock)
        body = sine_task(sine.meta)
        for _ in range(3):
            start = time.monotonic()
            assert httpx.get(service.url + "/healthz", timeout=10).status_code == 200
            assert httpx.post(service.url + "/v1/predict", json=body, timeout=10).status_code == 200
            assert time.monotonic() - start < 2.0
        time.sleep(3)  # past --header-timeout 2: the server has closed them all
        held[0].settimeout(2)
        assert held[0].recv(1000).startswith(b"HTTP/1.1 408 ")
        assert held[-1].recv(1000).startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in held:
            sock.close()


def test_a_body_shorter_than_declared_is_cut_off(service):
    start = time.monotonic()
    with socket.create_connection(address(service.url), timeout=10) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n" + b"{" * 20)
        answer = sock.recv(10000)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert time.monotonic() - start < 5


# -- finding 1 over HTTP ------------------------------------------------------------------------
@pytest.mark.omniglot
def test_an_extreme_image_is_a_422_not_a_500(omniglot, server_factory):
    import base64

    from PIL import Image

    server = server_factory(omniglot.directory)
    buf = io.BytesIO()
    Image.new("L", (16_777_216, 1), 255).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    r = httpx.post(server.url + "/v1/tasks", json={"support_x": [image] * 5,
                                                   "support_y": [0, 1, 2, 3, 4]}, timeout=30)
    assert r.status_code == 422 and "at most 16384 pixels on a side" in r.json()["error"]


# -- finding 4: admission control ---------------------------------------------------------------
def test_work_beyond_the_memory_budget_waits_its_turn_with_503(sine, server_factory):
    server = server_factory(sine.directory, "--max-inflight-mb", "1", "--max-query", "20000")
    rng = np.random.default_rng(0)
    body = {**sine_task(sine.meta), "query_x": rng.uniform(-5, 5, (20000, 1)).tolist()}
    alone = httpx.post(server.url + "/v1/predict", json=body, timeout=60)
    assert alone.status_code == 200  # any request the limits allow runs when nothing else does
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: httpx.post(server.url + "/v1/predict", json=body,
                                                     timeout=60), range(12)))
    codes = sorted(r.status_code for r in answers)
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]
