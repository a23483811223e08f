"""`python -m serve --adapter DIR`: serve an exported adapter over HTTP with uvicorn.

The listening socket is bound here, before uvicorn starts, so `--port 0` picks a free port and
the first line on standard output names the address actually served (tests read it). Bad options
or a bad export directory end with one line, `error: ...`, and exit status 2.

Binding an address other than loopback needs `--auth-token-file` (or, on purpose,
`--insecure-no-auth`): see docs/serving-security.md. uvicorn runs with
`serve.protocol.GuardedH11Protocol`, which bounds the time to receive a request's headers and body
and closes the longest-idle connection when `--max-connections` are open.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path

from maml.arguments import Parser, program_name
from maml.errors import UsageError


def parser() -> argparse.ArgumentParser:
    p = Parser(prog=program_name("serve", "maml-serve"), description=__doc__.splitlines()[0])
    p.add_argument("--adapter", required=True, help="export directory (python -m export --out)")
    p.add_argument("--backend", choices=("onnx", "torchscript"), default="onnx",
                   help="run the adapter with onnxruntime, or with libtorch (TorchScript)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--max-tasks", type=int, default=256, help="adapted tasks kept at most")
    p.add_argument("--task-ttl", type=float, default=600.0,
                   help="seconds an adapted task may stay idle before it is evicted")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                   help="largest request body accepted (413 above it)")
    p.add_argument("--max-support", type=int, default=1000, help="examples per support set")
    p.add_argument("--max-query", type=int, default=1000, help="examples per query set")
    p.add_argument("--threads", type=int, default=4, help="inference worker threads")
    p.add_argument("--intra-op-threads", type=int, default=1,
                   help="threads per inference call (0: the backend's default, all cores)")
    p.add_argument("--max-connections", type=int, default=1000,
                   help="open connections at most; one more closes the longest idle one (503 "
                        "only when all are busy)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds to receive a request's headers (408 after)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds to receive a request's body once its headers arrived (408)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle kept-alive connection stays open")
    p.add_argument("--max-inflight-mb", type=int, default=1024,
                   help="estimated memory of the inference work in flight; a request that does "
                        "not fit beside the others gets 503 with Retry-After")
    p.add_argument("--task-store", default="memory",
                   help="where adapted tasks live: memory (this process) or redis://host:port/db "
                        "(kept over restarts, shared by replicas)")
    p.add_argument("--auth-token-file", type=Path, default=None,
                   help="file of bearer tokens, one a line: /v1/ requests need "
                        "'Authorization: Bearer TOKEN' (required off loopback)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without --auth-token-file (behind a proxy "
                        "that authenticates)")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="an origin (https://host:port) given CORS permission; repeatable; "
                        "default none")
    p.add_argument("--static", type=Path, default=None,
                   help="folder served at / (default serve/static/ when it has an index.html)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug", "trace"),
                   help="uvicorn's log level")
    p.add_argument("--no-access-log", action="store_true", help="no line per request")
    return p


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port`."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say so, and
        # without it every keep-alive response waits ~40 ms for the client's delayed ACK
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc}); pick another --port") from None
    sock.set_inheritable(True)
    return sock


def read_tokens(path: Path) -> tuple[str, ...]:
    """The bearer tokens of `--auth-token-file`: one a line, `#` comments and blank lines
    skipped, each at least 16 characters."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--auth-token-file {path} cannot be read ({exc})") from None
    tokens = tuple(t.strip() for t in lines if t.strip() and not t.strip().startswith("#"))
    if not tokens:
        raise UsageError(f"--auth-token-file {path} has no token; write one a line, e.g. "
                         "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    short = [i for i, t in enumerate(tokens) if len(t) < 16 or any(c.isspace() for c in t)]
    if short:
        raise UsageError(f"--auth-token-file {path}: token {short[0] + 1} is shorter than 16 "
                         "characters or has spaces; use secrets.token_urlsafe(32)")
    return tokens


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import uvicorn

        from serve.adapter import load
        from serve.app import Settings, create_app
        from serve.validation import Limits

        if args.threads < 1 or args.max_body_bytes < 1 or args.max_connections < 1:
            raise UsageError("--threads, --max-body-bytes and --max-connections must be >= 1")
        timeouts = (args.header_timeout, args.body_timeout, args.keep_alive_timeout)
        if not all(0 < t < float("inf") for t in timeouts) or args.max_inflight_mb < 1:
            raise UsageError("--header-timeout, --body-timeout and --keep-alive-timeout must be "
                             "positive, finite seconds, and --max-inflight-mb >= 1")
        tokens = read_tokens(args.auth_token_file) if args.auth_token_file else ()
        if not tokens and not args.insecure_no_auth and not is_loopback(args.host):
            raise UsageError(f"--host {args.host} is not a loopback address: anyone who can "
                             "reach it could use the service; give --auth-token-file FILE (or "
                             "--insecure-no-auth behind a proxy that authenticates)")
        if args.intra_op_threads < 0:
            raise UsageError(f"--intra-op-threads must be >= 0 (0: all cores), "
                             f"got {args.intra_op_threads}")
        if args.static is not None and not (args.static / "index.html").is_file():
            raise UsageError(f"--static {args.static} has no index.html")
        adapter = load(args.adapter, args.backend, threads=args.intra_op_threads,
                       limits=Limits(args.max_support, args.max_query))
        settings = Settings(args.max_tasks, args.task_ttl, args.max_body_bytes, args.threads,
                            args.static, auth_tokens=tokens,
                            cors_origins=tuple(args.cors_origin),
                            max_inflight_bytes=args.max_inflight_mb << 20,
                            task_store=args.task_store)
        app = create_app(adapter, settings)
        if hasattr(app.state.store, "check"):
            app.state.store.check()  # a Redis that does not answer: refuse to start
        sock = listen(args.host, args.port)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {adapter.task_kind} adapter {args.adapter} ({args.backend}) at "
          f"http://{shown}:{port}", flush=True)
    from serve.protocol import guarded_protocol

    protocol = guarded_protocol(args.header_timeout, args.body_timeout, args.max_connections)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=not args.no_access_log,
                            http=protocol, timeout_keep_alive=args.keep_alive_timeout,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
