"""Drive the adapter service from several concurrent clients on loopback, for a bounded time.

    python scripts/load_test.py --adapter runs/adapter            # starts `python -m serve`
    python scripts/load_test.py --url http://127.0.0.1:8000       # an already running service

Each client loops over one task's life: adapt (POST /v1/tasks), `--predicts` predictions with it,
one stateless adapt+predict (POST /v1/predict), and DELETE. Random inputs are shaped from
GET /v1/adapter (N-way K-shot for a classifier). Every answer is checked (status and number of
predictions); anything else counts as an error. Prints requests/s and p50 / p99 latency per
operation and the error count, writes them as JSON with `--json-out`, and exits 1 on any error.
Only loopback addresses are accepted: this is a local measurement, not a load generator for
other people's machines.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maml.arguments import Parser, writable_file  # noqa: E402
from maml.errors import UsageError, exit_status, gist  # noqa: E402

OPS = ("adapt", "predict", "stateless", "delete")


def loopback_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"--url {url} needs http:// and a host, such as http://127.0.0.1:8000")
    try:
        host, _ = parsed.hostname, parsed.port  # .port raises on a port out of range
    except ValueError as exc:
        raise UsageError(f"--url {url}: {exc}; give http://HOST:PORT") from None
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise UsageError(f"cannot resolve {host!r} (--url {url}); give a loopback address, "
                         "such as http://127.0.0.1:8000") from None
    if not addresses or not all(ipaddress.ip_address(a).is_loopback for a in addresses):
        raise UsageError(f"{url} is not a loopback address; this script only drives local "
                         "services")
    return url.rstrip("/")


def check_args(args: argparse.Namespace) -> None:
    """Refuse what would only show as a run full of errors, or a report lost at the end."""
    if (args.url is None) == (args.adapter is None):
        raise UsageError("pass exactly one of --url (a running service) and --adapter (an "
                         "export directory to serve)")
    for name in ("clients", "k_shot", "q_query", "server_threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.predicts < 0:
        raise UsageError(f"--predicts must be >= 0, got {args.predicts}")
    if not 0 < args.duration < float("inf"):
        raise UsageError(f"--duration must be a number of seconds > 0, got {args.duration}")
    if args.adapter is not None:  # what the service would refuse at its start, said here
        from serve import metadata

        folder, backend = metadata.locate(args.adapter, args.backend)
        metadata.entry_files(metadata.read(folder), folder, backend)
    if args.json_out is not None:
        writable_file(args.json_out, "--json-out")


def adapter_info(url: str, started: bool) -> dict:
    """The service's adapter metadata (GET /v1/adapter), or a one-line reason there is none."""
    try:
        answer = httpx.get(url + "/v1/adapter", timeout=30)
    except httpx.ConnectError as exc:
        if started:
            raise UsageError(f"the service started at {url} does not answer ({gist(exc)})") \
                from None
        raise UsageError(f"no service at {url} ({gist(exc)}); start python -m serve --adapter "
                         "DIR --port PORT first, or use --adapter DIR") from None
    except httpx.HTTPError as exc:
        raise UsageError(f"{url}/v1/adapter failed ({gist(exc, typed=True)}); is it the "
                         "adapter service (python -m serve)?") from None
    try:
        return answer.json()["metadata"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{url}/v1/adapter answered HTTP {answer.status_code} without adapter "
                         "metadata; is it the adapter service (python -m serve)?") from None


def try_task(url: str, task: dict) -> None:
    """One stateless adapt+predict before the clients start: a task the service refuses (too
    many examples for its limits, say) is one error line, not a run full of them."""
    try:
        answer = httpx.post(url + "/v1/predict", content=json.dumps(task), timeout=60,
                            headers={"content-type": "application/json"})
    except httpx.HTTPError as exc:
        raise UsageError(f"{url}/v1/predict failed ({gist(exc, typed=True)})") from None
    if answer.status_code != 200:
        try:
            reason = answer.json()["error"]
        except (ValueError, KeyError, TypeError):
            reason = answer.text[:200]
        raise UsageError(f"the service refuses this load's task (HTTP {answer.status_code}: "
                         f"{reason}); change --k-shot / --q-query")


def start_server(adapter: str, backend: str, threads: int) -> tuple[subprocess.Popen, str]:
    """`python -m serve` on a free loopback port; returns the process and its URL.

    The child runs in the project folder, so `adapter` is resolved against this process's
    current folder first."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "serve", "--adapter", str(Path(adapter).resolve()),
           "--backend", backend, "--port", "0", "--threads", str(threads), "--no-access-log",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    line = proc.stdout.readline() if proc.stdout else ""
    if " at http://" not in line:
        proc.kill()
        raise UsageError(f"the service did not start ({line.strip() or 'no output'}); see its "
                         "message above")
    return proc, line.rsplit(" at ", 1)[1].strip()


def make_task(meta: dict, k_shot: int, q_query: int, rng: np.random.Generator) -> dict:
    """Random support / query sets of the adapter's shapes."""
    shape = meta["input"]["shape"]
    if meta["task"] == "classification":
        n = meta["n_way"]
        sy = np.repeat(np.arange(n), k_shot)
        sx, qx = rng.random((n * k_shot, *shape)), rng.random((n * q_query, *shape))
    else:
        sx = rng.uniform(-5, 5, (k_shot, *shape))
        sy = np.sin(sx.reshape(k_shot, -1)[:, :1]).reshape(k_shot, *meta["target"]["shape"])
        qx = rng.uniform(-5, 5, (q_query, *shape))
    rnd = lambda a: np.round(a, 4).tolist()  # noqa: E731 - shorter JSON, same shapes
    return {"support_x": rnd(sx), "support_y": sy.tolist(), "query_x": rnd(qx)}


def client(url: str, task: dict, predicts: int, deadline: float,
           latencies: dict[str, list[float]], errors: list[str], lock: threading.Lock) -> None:
    # bodies are encoded once: the clients share the CPU with the service, so they should not
    # spend it re-encoding the same JSON
    support = json.dumps({"support_x": task["support_x"], "support_y": task["support_y"]})
    query = json.dumps({"query_x": task["query_x"]})
    both = json.dumps(task)
    q = len(task["query_x"])
    mine: dict[str, list[float]] = defaultdict(list)
    problems: list[str] = []

    def timed(op: str, method: str, path: str, body: str | None, status: int) -> dict | None:
        start = time.perf_counter()
        try:
            r = http.request(method, url + path, content=body,
                             headers={"content-type": "application/json"} if body else None)
        except httpx.HTTPError as exc:
            problems.append(f"{op}: {type(exc).__name__} {exc}")
            return None
        mine[op].append(time.perf_counter() - start)
        if r.status_code != status:
            problems.append(f"{op}: HTTP {r.status_code} {r.text[:200]}")
            return None
        return r.json() if r.content else {}

    # TCP_NODELAY: httpx writes headers and body separately; without it Nagle's algorithm and the
    # server's delayed ACK add ~40 ms to every request with a body (DELETE would not show it)
    nodelay = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    with httpx.Client(timeout=60, transport=nodelay) as http:
        while time.perf_counter() < deadline:
            created = timed("adapt", "POST", "/v1/tasks", support, 201)
            if created is None:
                continue
            path = f"/v1/tasks/{created['task_id']}"
            for _ in range(predicts):
                out = timed("predict", "POST", path + "/predict", query, 200)
                if out is not None and len(out["predictions"]) != q:
                    problems.append("predict: wrong number of predictions")
            out = timed("stateless", "POST", "/v1/predict", both, 200)
            if out is not None and len(out["predictions"]) != q:
                problems.append("stateless: wrong number of predictions")
            timed("delete", "DELETE", path, None, 204)
    with lock:
        for op, values in mine.items():
            latencies[op] += values
        errors += problems


def parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running service (loopback only)")
    p.add_argument("--adapter", help="export directory: start `python -m serve` on it")
    p.add_argument("--backend", default="onnx")
    p.add_argument("--server-threads", type=int, default=4)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--q-query", type=int, default=5)
    p.add_argument("--predicts", type=int, default=3, help="predictions per adapted task")
    p.add_argument("--json-out", type=Path)
    return p


def run(args: argparse.Namespace) -> list[str]:
    """The load test; returns the errors the clients met."""
    check_args(args)
    proc = None
    if args.adapter:
        proc, url = start_server(args.adapter, args.backend, args.server_threads)
    else:
        url = loopback_url(args.url)
    try:
        meta = adapter_info(url, started=proc is not None)
        rng = np.random.default_rng(0)
        task = make_task(meta, args.k_shot, args.q_query, rng)
        try_task(url, task)
        latencies: dict[str, list[float]] = defaultdict(list)
        errors: list[str] = []
        lock = threading.Lock()
        deadline = time.perf_counter() + args.duration
        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(url, task, args.predicts, deadline,
                                                         latencies, errors, lock))
                   for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    rows = {}
    for op in OPS:
        ms = np.array(latencies.get(op, [])) * 1000
        rows[op] = {"requests": int(ms.size), "per_s": ms.size / elapsed,
                    "p50_ms": float(np.percentile(ms, 50)) if ms.size else None,
                    "p99_ms": float(np.percentile(ms, 99)) if ms.size else None}
    total = sum(r["requests"] for r in rows.values())
    print(f"{meta['task']} adapter, {args.clients} clients, {elapsed:.1f} s, support "
          f"{len(task['support_x'])}, query {len(task['query_x'])}")
    print(f"{'operation':<10} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for op, r in rows.items():
        p50 = f"{r['p50_ms']:8.1f}" if r["p50_ms"] is not None else f"{'-':>8}"
        p99 = f"{r['p99_ms']:8.1f}" if r["p99_ms"] is not None else f"{'-':>8}"
        print(f"{op:<10} {r['requests']:>9} {r['per_s']:>8.1f} {p50} {p99}")
    print(f"{'all':<10} {total:>9} {total / elapsed:>8.1f}")
    print(f"errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "task": meta["task"], "clients": args.clients, "seconds": elapsed,
            "support": len(task["support_x"]), "query": len(task["query_x"]),
            "operations": rows, "requests_per_s": total / elapsed, "errors": len(errors),
            "first_errors": errors[:5]}, indent=2))
    return errors


def main() -> int:
    args = parser().parse_args()
    errors: list[str] = []
    # bad input: one line and status 2; errors met under load: the report and status 1
    return exit_status(lambda: errors.extend(run(args))) or (1 if errors else 0)


if __name__ == "__main__":
    sys.exit(main())
