"""Drive the adapter service from several concurrent clients on loopback, for a bounded time.

    python scripts/load_test.py --adapter runs/adapter            # starts `python -m serve`
    python scripts/load_test.py --url http://127.0.0.1:8000       # an already running service
    python scripts/load_test.py --adapter runs/adapter --replicas 2 \\
        --task-store redis://127.0.0.1:6379/0                      # kills one replica mid-run

Each client loops over one task's life: adapt (POST /v1/tasks), `--predicts` predictions with it,
one stateless adapt+predict (POST /v1/predict), and DELETE. Random inputs are shaped from
GET /v1/adapter (N-way K-shot for a classifier). Every answer is checked (status and number of
predictions); anything else counts as an error. Prints requests/s and p50 / p90 / p99 latency per
operation and the errors, writes them as JSON with `--json-out`, and exits 1 on any error.

With `--replicas N` (N >= 2) the script starts N services (each with `--task-store`) and sends
every client's requests round-robin over them, as a load balancer would: a task is created on
one replica and predicted on the others. A connection that is refused is retried on the next
replica, which is then left out (a balancer's passive health check). `--kill-after` seconds in
(default: half of `--duration`) one replica is killed with SIGKILL. Tasks created before the kill
are kept (up to 16 a client) and predicted and deleted after it. The report says, per replica,
requests sent and answered, and sorts the errors: `in_flight` (the connection of a request in
flight on the killed replica broke: the expected, clean error), `after_kill` (a request sent to
the dead replica once it was gone), `connection` (on a surviving replica), `lost` (a task created
before the kill answered 404 after it), `not_shared` (a 404 for a task another replica holds:
the memory store), `http` (any other unexpected status), `no_replica`. The target is that
nothing is lost beyond `in_flight`; the exit status is 1 otherwise.

Only loopback addresses are accepted (the services, and the Redis of `--task-store`): this is a
local measurement, not a load generator for other people's machines.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maml.arguments import Parser, writable_file  # noqa: E402
from maml.errors import UsageError, exit_status, gist  # noqa: E402

OPS = ("adapt", "predict", "stateless", "delete")
KINDS = ("in_flight", "after_kill", "connection", "lost", "not_shared", "http", "no_replica")
MAX_REPLICAS, MAX_CLIENTS, MAX_SECONDS = 8, 256, 3600.0


def is_loopback_host(host: str) -> bool:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


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
    for name in ("clients", "k_shot", "q_query", "server_threads", "replicas"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.replicas > MAX_REPLICAS or args.clients > MAX_CLIENTS:
        raise UsageError(f"--replicas is at most {MAX_REPLICAS} and --clients at most "
                         f"{MAX_CLIENTS} (got {args.replicas}, {args.clients})")
    if args.predicts < 0:
        raise UsageError(f"--predicts must be >= 0, got {args.predicts}")
    if not 0 < args.duration <= MAX_SECONDS:
        raise UsageError(f"--duration must be a number of seconds > 0 and <= {MAX_SECONDS:.0f}, "
                         f"got {args.duration}")
    if args.url is not None and (args.replicas > 1 or args.task_store is not None):
        raise UsageError("--replicas and --task-store start services: use them with --adapter, "
                         "not --url")
    if args.kill_after is not None:
        if args.replicas < 2:
            raise UsageError("--kill-after kills one of the replicas: it needs --replicas >= 2")
        if not 0 < args.kill_after < args.duration:
            raise UsageError(f"--kill-after must be between 0 and --duration ({args.duration}) "
                             f"seconds, got {args.kill_after}")
    if args.task_store not in (None, "memory"):
        parsed = urlparse(args.task_store)
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
            raise UsageError(f"--task-store {args.task_store}: give memory or "
                             "redis://127.0.0.1:PORT/DB")
        if not is_loopback_host(parsed.hostname):
            raise UsageError(f"--task-store {args.task_store} is not a loopback address; this "
                             "script only drives local services")
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


def start_servers(adapter: str, backend: str, threads: int, count: int,
                  task_store: str | None) -> list[tuple[subprocess.Popen, str]]:
    """`count` processes of `python -m serve` on free loopback ports, started side by side;
    returns each process and its URL.

    The children run in the project folder, so `adapter` is resolved against this process's
    current folder first."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "serve", "--adapter", str(Path(adapter).resolve()),
           "--backend", backend, "--port", "0", "--threads", str(threads), "--no-access-log",
           "--log-level", "warning"]
    if task_store is not None:
        cmd += ["--task-store", task_store]
    procs = [subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(root)})
             for _ in range(count)]
    started = []
    for proc in procs:
        line = proc.stdout.readline() if proc.stdout else ""
        if " at http://" not in line:
            for other in procs:
                other.kill()
                other.wait()
            raise UsageError(f"the service did not start ({line.strip() or 'no output'}); see "
                             "its message above")
        started.append((proc, line.rsplit(" at ", 1)[1].strip()))
    return started


def start_server(adapter: str, backend: str, threads: int) -> tuple[subprocess.Popen, str]:
    """`python -m serve` on a free loopback port; returns the process and its URL."""
    return start_servers(adapter, backend, threads, 1, None)[0]


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


@dataclass
class Replica:
    index: int
    url: str
    process: subprocess.Popen | None = None
    sent: int = 0  # requests that reached it (answered or broken), refused connections apart
    answered: int = 0
    answered_after_kill: int = 0
    refused: int = 0


@dataclass
class Kill:
    """The replica to kill and when: `started` just before SIGKILL, `dead` once reaped (its
    sockets closed). Both are time.perf_counter() values; infinity until they happen."""
    replica: Replica | None = None
    started: float = math.inf
    dead: float = math.inf
    done: threading.Event = field(default_factory=threading.Event)


class Balancer:
    """Round-robin over the replicas, leaving out one whose connection failed (a load balancer
    with passive health checks)."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas, self.down, self.lock = replicas, set(), threading.Lock()

    def pick(self, turn: int) -> Replica | None:
        with self.lock:
            live = [r for r in self.replicas if r.index not in self.down]
        return live[turn % len(live)] if live else None

    def mark_down(self, replica: Replica) -> None:
        with self.lock:
            self.down.add(replica.index)


@dataclass
class Tally:
    """What the clients met, merged under `lock`."""
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)
    lost: set[str] = field(default_factory=set)  # tasks created before the kill, 404 after
    created_before_kill: int = 0
    checked_after_kill: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client(number: int, balancer: Balancer, task: dict, predicts: int, deadline: float,
           hold: int, kill: Kill, tally: Tally) -> None:
    # bodies are encoded once: the clients share the CPU with the service, so they should not
    # spend it re-encoding the same JSON
    support = json.dumps({"support_x": task["support_x"], "support_y": task["support_y"]})
    query = json.dumps({"query_x": task["query_x"]})
    both = json.dumps(task)
    q = len(task["query_x"])
    mine: dict[str, list[float]] = defaultdict(list)
    problems: list[tuple[str, str]] = []
    counts: Counter = Counter()  # (replica index, "sent" / "answered" / ...) -> requests
    created_at: dict[str, float] = {}  # task id -> when its 201 arrived
    lost: set[str] = set()
    checked: set[str] = set()
    turn = number  # client i starts on replica i: the clients are spread over the replicas

    def timed(op: str, method: str, path: str, body: str | None, status: int,
              task_id: str | None = None) -> dict | None:
        nonlocal turn
        for _ in range(len(balancer.replicas)):
            replica = balancer.pick(turn)
            turn += 1
            if replica is None:
                break
            start = time.perf_counter()
            if task_id is not None and created_at[task_id] < kill.started <= start:
                checked.add(task_id)
            try:
                r = http.request(method, replica.url + path, content=body,
                                 headers={"content-type": "application/json"} if body else None)
            except httpx.ConnectError:  # nothing was sent: the balancer tries the next replica
                balancer.mark_down(replica)
                counts[replica.index, "refused"] += 1
                continue
            except httpx.TransportError as exc:  # sent, and the connection broke
                counts[replica.index, "sent"] += 1
                balancer.mark_down(replica)
                if replica is kill.replica and time.perf_counter() >= kill.started:
                    kind = "in_flight" if start < kill.dead else "after_kill"
                else:
                    kind = "connection"
                problems.append((kind, f"{op} on replica {replica.index}: "
                                       f"{type(exc).__name__} {exc}"))
                return None
            except httpx.HTTPError as exc:
                counts[replica.index, "sent"] += 1
                problems.append(("http", f"{op}: {type(exc).__name__} {exc}"))
                return None
            end = time.perf_counter()
            mine[op].append(end - start)
            counts[replica.index, "sent"] += 1
            counts[replica.index, "answered"] += 1
            if start >= kill.started:
                counts[replica.index, "answered_after_kill"] += 1
            if r.status_code == 404 and task_id is not None:
                if created_at[task_id] < kill.started <= start:
                    lost.add(task_id)
                    problems.append(("lost", f"{op} on replica {replica.index}: task created "
                                             "before the kill not found after it"))
                elif len(balancer.replicas) > 1:
                    problems.append(("not_shared", f"{op} on replica {replica.index}: 404 for "
                                                   "a task created on another replica"))
                else:
                    problems.append(("http", f"{op}: HTTP 404 {r.text[:200]}"))
                return None
            if r.status_code != status:
                problems.append(("http", f"{op}: HTTP {r.status_code} {r.text[:200]}"))
                return None
            if op in ("predict", "stateless") and len(r.json()["predictions"]) != q:
                problems.append(("http", f"{op}: wrong number of predictions"))
                return None
            return r.json() if r.content else {}
        problems.append(("no_replica", f"{op}: no replica accepts connections"))
        return None

    def predict_and_delete(task_id: str, predicts: int) -> None:
        path = f"/v1/tasks/{task_id}"
        for _ in range(predicts):
            timed("predict", "POST", path + "/predict", query, 200, task_id)
        if task_id not in lost:
            timed("delete", "DELETE", path, None, 204, task_id)

    held: deque[str] = deque()  # tasks created before the kill, used again after it

    # TCP_NODELAY: httpx writes headers and body separately; without it Nagle's algorithm and the
    # server's delayed ACK add ~40 ms to every request with a body (DELETE would not show it)
    nodelay = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    with httpx.Client(timeout=60, transport=nodelay) as http:
        while time.perf_counter() < deadline:
            if held and kill.done.is_set():
                while held:
                    predict_and_delete(held.popleft(), 1)
            created = timed("adapt", "POST", "/v1/tasks", support, 201)
            if created is None:
                continue
            task_id = created["task_id"]
            created_at[task_id] = time.perf_counter()
            path = f"/v1/tasks/{task_id}"
            for _ in range(predicts):
                timed("predict", "POST", path + "/predict", query, 200, task_id)
            timed("stateless", "POST", "/v1/predict", both, 200)
            if hold and not kill.done.is_set() and created_at[task_id] < kill.started:
                held.append(task_id)  # deleted after the kill, or now if there are too many
                if len(held) > hold:
                    predict_and_delete(held.popleft(), 0)
            elif task_id not in lost:
                timed("delete", "DELETE", path, None, 204, task_id)
        if held and kill.done.wait(timeout=60):
            while held:
                predict_and_delete(held.popleft(), 1)
    with tally.lock:
        for (index, name), n in counts.items():
            setattr(balancer.replicas[index], name,
                    getattr(balancer.replicas[index], name) + n)
        for op, values in mine.items():
            tally.latencies[op] += values
        tally.problems += problems
        tally.lost |= lost
        tally.checked_after_kill |= checked
        tally.created_before_kill += sum(t < kill.started for t in created_at.values())


def parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running service (loopback only)")
    p.add_argument("--adapter", help="export directory: start `python -m serve` on it")
    p.add_argument("--backend", default="onnx")
    p.add_argument("--server-threads", type=int, default=4)
    p.add_argument("--replicas", type=int, default=1,
                   help=f"services to start (at most {MAX_REPLICAS}); 2 or more: requests go "
                        "round-robin over them and one is killed at --kill-after")
    p.add_argument("--task-store", default=None,
                   help="passed to every service: memory or redis://127.0.0.1:PORT/DB")
    p.add_argument("--kill-after", type=float, default=None,
                   help="seconds into the run to kill -9 one replica (default: half of "
                        "--duration with --replicas >= 2)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--q-query", type=int, default=5)
    p.add_argument("--predicts", type=int, default=3, help="predictions per adapted task")
    p.add_argument("--json-out", type=Path)
    return p


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {f"p{p}_ms": float(np.percentile(ms, p)) if ms.size else None for p in (50, 90, 99)}


def report(args: argparse.Namespace, meta: dict, task: dict, elapsed: float,
           replicas: list[Replica], kill: Kill, start: float, tally: Tally,
           load: tuple[list[float], list[float]]) -> list[str]:
    """Print the tables, write --json-out; return the errors beyond the target (in-flight
    requests on the killed replica are the expected ones)."""
    rows = {}
    for op in OPS:
        values = tally.latencies.get(op, [])
        rows[op] = {"requests": len(values), "per_s": len(values) / elapsed,
                    **percentiles(values)}
    total = sum(r["requests"] for r in rows.values())
    cell = lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8}"  # noqa: E731
    store = args.task_store or "memory"
    print(f"{meta['task']} adapter, {args.clients} clients, {elapsed:.1f} s, support "
          f"{len(task['support_x'])}, query {len(task['query_x'])}"
          + (f", {len(replicas)} replicas, task store {store}" if len(replicas) > 1 else ""))
    print(f"{'operation':<10} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} "
          f"{'p99 ms':>8}")
    for op, r in rows.items():
        print(f"{op:<10} {r['requests']:>9} {r['per_s']:>8.1f} {cell(r['p50_ms'])} "
              f"{cell(r['p90_ms'])} {cell(r['p99_ms'])}")
    print(f"{'all':<10} {total:>9} {total / elapsed:>8.1f}")
    kinds = Counter(kind for kind, _ in tally.problems)
    killed = kill.replica is not None and kill.done.is_set()
    if len(replicas) > 1:
        print(f"{'replica':<8} {'url':<24} {'sent':>7} {'answered':>9} {'after kill':>11} "
              f"{'refused':>8}")
        for r in replicas:
            mark = " (killed)" if r is kill.replica else ""
            print(f"{r.index:<8} {r.url.removeprefix('http://'):<24} {r.sent:>7} "
                  f"{r.answered:>9} {r.answered_after_kill:>11} {r.refused:>8}{mark}")
    if killed:
        print(f"killed replica {kill.replica.index} (SIGKILL) at {kill.started - start:.1f} s, "
              f"gone {1000 * (kill.dead - kill.started):.0f} ms later; tasks created before "
              f"the kill: {tally.created_before_kill}, used after it: "
              f"{len(tally.checked_after_kill)}, not found: {len(tally.lost)}")
    print(f"errors: {len(tally.problems)}"
          + (" (" + ", ".join(f"{k} {kinds[k]}" for k in KINDS if kinds[k]) + ")"
             if tally.problems else "")
          + (f"; first: {tally.problems[0][1]}" if tally.problems else ""))
    beyond = [message for kind, message in tally.problems if not (killed and kind == "in_flight")]
    if killed:
        print("target met: nothing lost beyond the in-flight requests" if not beyond else
              f"target missed: {len(beyond)} errors beyond the in-flight requests "
              f"({len(tally.lost)} lost tasks)")
    print(f"load average (1 min) {load[0][0]:.2f} at the start, {load[1][0]:.2f} at the end, "
          f"{os.cpu_count()} CPUs")
    if args.json_out:
        out = {
            "task": meta["task"], "clients": args.clients, "seconds": elapsed,
            "support": len(task["support_x"]), "query": len(task["query_x"]),
            "operations": rows, "requests_per_s": total / elapsed,
            "errors": len(tally.problems), "first_errors": [m for _, m in tally.problems[:5]],
            "errors_by_kind": {k: kinds[k] for k in KINDS},
            "errors_beyond_in_flight": len(beyond),
            "task_store": store,
            "replicas": [{"index": r.index, "url": r.url, "sent": r.sent, "answered": r.answered,
                          "answered_after_kill": r.answered_after_kill, "refused": r.refused,
                          "killed": r is kill.replica} for r in replicas],
            "load_average": {"start": load[0], "end": load[1], "cpus": os.cpu_count()},
        }
        if killed:
            out["kill"] = {"replica": kill.replica.index, "at_s": kill.started - start,
                           "gone_ms": 1000 * (kill.dead - kill.started)}
            out["tasks_created_before_kill"] = tally.created_before_kill
            out["tasks_used_after_kill"] = len(tally.checked_after_kill)
            out["lost_tasks"] = len(tally.lost)
        args.json_out.write_text(json.dumps(out, indent=2))
    return beyond


def run(args: argparse.Namespace) -> list[str]:
    """The load test; returns the errors the clients met (beyond the in-flight requests of a
    killed replica)."""
    check_args(args)
    if args.replicas > 1 and args.kill_after is None:
        args.kill_after = args.duration / 2
    started = []
    if args.adapter:
        started = start_servers(args.adapter, args.backend, args.server_threads, args.replicas,
                                args.task_store)
        replicas = [Replica(i, url, proc) for i, (proc, url) in enumerate(started)]
    else:
        replicas = [Replica(0, loopback_url(args.url))]
    try:
        for r in replicas:
            meta = adapter_info(r.url, started=bool(started))
        rng = np.random.default_rng(0)
        task = make_task(meta, args.k_shot, args.q_query, rng)
        try_task(replicas[0].url, task)
        kill = Kill(replicas[0] if args.kill_after is not None else None)
        # tasks kept past the kill, a few per client, well inside the store's default 256
        hold = max(1, min(16, 200 // args.clients - 1)) if kill.replica else 0
        tally = Tally()
        balancer = Balancer(replicas)
        load_start = list(os.getloadavg())
        start = time.perf_counter()
        deadline = start + args.duration
        threads = [threading.Thread(target=client, args=(i, balancer, task, args.predicts,
                                                         deadline, hold, kill, tally))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        if kill.replica is not None:
            time.sleep(max(0.0, start + args.kill_after - time.perf_counter()))
            kill.started = time.perf_counter()
            kill.replica.process.kill()
            kill.replica.process.wait()
            kill.dead = time.perf_counter()
            kill.done.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        load_end = list(os.getloadavg())
    finally:
        for proc, _ in started:
            proc.terminate()
        for proc, _ in started:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return report(args, meta, task, elapsed, replicas, kill, start, tally,
                  (load_start, load_end))


def main() -> int:
    args = parser().parse_args()
    errors: list[str] = []
    # bad input: one line and status 2; errors met under load: the report and status 1
    return exit_status(lambda: errors.extend(run(args))) or (1 if errors else 0)


if __name__ == "__main__":
    sys.exit(main())
