"""`python -m serve --adapter DIR`: serve an exported adapter over HTTP with uvicorn.

The listening socket is bound here, before uvicorn starts, so `--port 0` picks a free port and
the first line on standard output names the address actually served (tests read it). Bad options
or a bad export directory end with one line, `error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--max-connections", type=int, default=128,
                   help="concurrent connections before answering 503")
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import uvicorn

        from serve.adapter import load
        from serve.app import Settings, create_app
        from serve.validation import Limits

        if args.threads < 1 or args.max_body_bytes < 1 or args.max_connections < 1:
            raise UsageError("--threads, --max-body-bytes and --max-connections must be >= 1")
        if args.intra_op_threads < 0:
            raise UsageError(f"--intra-op-threads must be >= 0 (0: all cores), "
                             f"got {args.intra_op_threads}")
        if args.static is not None and not (args.static / "index.html").is_file():
            raise UsageError(f"--static {args.static} has no index.html")
        adapter = load(args.adapter, args.backend, threads=args.intra_op_threads,
                       limits=Limits(args.max_support, args.max_query))
        settings = Settings(args.max_tasks, args.task_ttl, args.max_body_bytes, args.threads,
                            args.static)
        app = create_app(adapter, settings)
        sock = listen(args.host, args.port)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {adapter.task_kind} adapter {args.adapter} ({args.backend}) at "
          f"http://{shown}:{port}", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=not args.no_access_log,
                            limit_concurrency=args.max_connections, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
