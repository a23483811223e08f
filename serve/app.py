"""The HTTP service: an exported adapter behind a small JSON API (FastAPI on uvicorn).

    GET    /healthz                 liveness, and how many tasks are stored
    GET    /v1/adapter              the adapter's metadata (adapter.json) and the service limits
    POST   /v1/tasks                support set in; adapted once; {"task_id": ...} out
    POST   /v1/tasks/{id}/predict   query set in; predictions (and class probabilities) out
    DELETE /v1/tasks/{id}           forget an adapted task
    POST   /v1/predict              stateless: support and query sets in one request
    GET    /v1/adapter/files/{name} adapter.json and the ONNX files (the page adapts in-browser)
    GET    /                        a static page from `static_dir` when there is one
                                    (the hook for a drawing page), else a JSON index

Inputs are JSON arrays (`support_x` of shape `(S, *input_shape)`, `support_y` class indices or
targets, `query_x`) or, for image adapters, lists of base64 PNG / JPEG strings (data URLs too).
Strings are only ever decoded as base64 images, never read as paths on the server.

Every client mistake is a 4xx answer with a JSON body `{"error": "..."}` naming it: 400 malformed
JSON, 404 unknown or evicted task, 413 body over the size limit, 422 anything `serve.validation`
refuses (shapes, dtypes, labels, non-finite numbers, sizes). Bodies are read and parsed here
rather than by FastAPI so that the size limit applies while reading and error bodies stay short;
the OpenAPI schema still documents them. JSON parsing, validation and inference run in a thread
pool (onnxruntime releases the GIL), so the event loop keeps accepting requests meanwhile.

Security (docs/serving-security.md): with `Settings.auth_tokens`, every `/v1/` request needs
`Authorization: Bearer TOKEN` (401 otherwise; compared in constant time); the JSON endpoints take
only `Content-Type: application/json` (415 otherwise), so a web page on another origin cannot
send them as a "simple" request without a CORS preflight, and no CORS permission is given unless
`Settings.cors_origins` names the origin. Admission control bounds the memory of the inference
work in flight (`Settings.max_inflight_bytes`, estimated per request from its size and the
adapter's graphs): a request that does not fit while others run gets 503 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import hashlib
import hmac
import json
import logging
import re
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from maml.errors import UsageError
from serve import tensor_file
from serve.adapter import Adapter, Task, TransductiveWarning, softmax, transductive_warning
from serve.backends import InferenceError
from serve.task_store import RedisTaskStore, StoreUnavailable, TaskStore

T = TypeVar("T")
STATIC_DIR = Path(__file__).parent / "static"
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
log = logging.getLogger("serve")
SHOWN_ID = 64  # characters of an unknown task id echoed in a 404


@dataclass(frozen=True)
class Settings:
    """Service limits; each is a `python -m serve` option."""

    max_tasks: int = 256
    task_ttl_s: float = 600.0
    max_body_bytes: int = 8 * 1024 * 1024
    threads: int = 4
    static_dir: Path | None = None
    auth_tokens: tuple[str, ...] = ()  # bearer tokens; empty: no authentication
    cors_origins: tuple[str, ...] = ()  # origins given CORS permission; empty: none
    max_inflight_bytes: int = 1 << 30  # estimated memory of the inference work in flight
    task_store: str = "memory"  # or redis://host:port/db: tasks shared and kept over restarts


class ApiError(Exception):
    """A client error: its HTTP status and one-line message (and headers, such as Allow)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


X_DOC = ("an array of shape (N, *input.shape), or (image adapters) a list of base64 PNG/JPEG "
         "strings")


class SupportBody(BaseModel):
    support_x: list[Any] = Field(description=X_DOC)
    support_y: list[Any] = Field(description="class indices 0..n_way-1, or regression targets "
                                             "of shape (N, *target.shape)")


class QueryBody(BaseModel):
    query_x: list[Any] = Field(description=X_DOC)


class PredictBody(SupportBody):
    query_x: list[Any] = Field(description=X_DOC)


class TaskCreated(BaseModel):
    task_id: str
    n_support: int
    ttl_s: float


class Predictions(BaseModel):
    predictions: list[Any] = Field(description="class indices, or regression outputs")
    probabilities: list[list[float]] | None = Field(None, description="classification only")
    logits: list[list[float]] | None = Field(None, description="classification only")
    warning: str | None = Field(None, description="only from a transductive adapter asked "
                                "about fewer queries than classes: its answers depend on the batch")


class ErrorBody(BaseModel):
    error: str


ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 415, 422, 503)}


def _body_doc(model: type[BaseModel], sizes: dict[str, int]) -> dict[str, Any]:
    """The request body's schema, each array bounded as the service bounds it (`sizes`: the
    most items of each field; at least one)."""
    schema = model.model_json_schema()
    for name, most in sizes.items():
        schema["properties"][name].update(minItems=1, maxItems=most)
    schema["additionalProperties"] = False
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def shown(text: str) -> str:
    """A client-sent string as errors echo it: quoted, and cut to `SHOWN_ID` characters."""
    return repr(text) if len(text) <= SHOWN_ID else f"{text[:SHOWN_ID]!r}... ({len(text)} chars)"


def is_json(content_type: str) -> bool:
    """True for `application/json`, with parameters (`; charset=utf-8`) or without."""
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes, and
    with 415 unless it is declared `application/json`."""
    content_type = request.headers.get("content-type", "")
    if not is_json(content_type):
        raise ApiError(415, f"the body must be sent with Content-Type: application/json, got "
                            f"{shown(content_type) if content_type else 'none'}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {int(declared)} bytes, over the limit of {limit}; "
                            "send fewer or smaller examples")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the body is over the limit of {limit} bytes; send fewer "
                                    "or smaller examples")
            chunks.append(chunk)
    except ClientDisconnect:  # no one to answer; one line in the log, not a traceback
        log.info("client disconnected after %d bytes of the body", size)
        raise ApiError(400, "the client disconnected before the body ended") from None
    return b"".join(chunks)


def token_digest(token: str) -> bytes:
    """What tokens are compared as: fixed-length digests, so the comparison's time tells
    nothing about a token's length or content."""
    return hashlib.sha256(token.encode()).digest()


class Guard:
    """ASGI middleware: bearer-token authentication of every `/v1/` request (401 otherwise).
    Each presented token is compared with every configured one (`hmac.compare_digest` of
    digests, no early exit), so timing reveals neither which token nor how much matched."""

    def __init__(self, app: ASGIApp, tokens: tuple[str, ...]) -> None:
        self.app, self.digests = app, [token_digest(t) for t in tokens]

    def authorised(self, scope: Scope) -> bool:
        header = b""
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                header = value
        scheme, _, token = header.decode("latin-1").partition(" ")
        presented = token_digest(token.strip() if scheme.lower() == "bearer" else "\0invalid")
        ok = False
        for digest in self.digests:
            ok |= hmac.compare_digest(presented, digest)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and self.digests and scope["path"].startswith("/v1/")
                and scope["method"] != "OPTIONS" and not self.authorised(scope)):
            response = _error(401, "missing or wrong bearer token: send the header "
                                   "'Authorization: Bearer TOKEN' with a token of the service's "
                                   "--auth-token-file", {"www-authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _graph_bytes_per_example(path: Path) -> int:
    """An upper bound of the memory one more example costs in an ONNX graph: every
    intermediate tensor with a batch dimension, all at once (0 where it cannot be read)."""
    try:
        import onnx

        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    except Exception:  # no onnx package, no ONNX file (a TorchScript-only export), ...
        return 0
    total = 0
    for value in [*model.graph.value_info, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            n = 1
            for d in dims:
                n *= d.dim_value if d.HasField("dim_value") else 1
            total += 4 * n
    return total


def _trim_memory() -> None:
    """Give freed heap memory back to the system after a large request (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Admission:
    """A bound on the estimated memory of the work in flight. A request is admitted when it
    fits beside the others, or when it runs alone (so any request the limits allow can run);
    otherwise it is refused with 503 and `Retry-After`, rather than queued."""

    TRIM_AT = 64 << 20  # after a request estimated above this, malloc_trim

    def __init__(self, budget: int, adapter: Adapter) -> None:
        self.budget, self.in_flight, self.lock = budget, 0, threading.Lock()
        shape = adapter.metadata["input"]["shape"]
        numbers = 1
        for n in shape:
            numbers *= int(n)
        files = adapter.metadata.get("files", {}).get("onnx", {})
        graphs = {k: _graph_bytes_per_example(Path(adapter.directory) / f)
                  for k, f in files.items()}
        # per example: its JSON (about 20 bytes a number parsed, 12 chars sent), its float32
        # array, and the graph's intermediate tensors (a fallback of 64x the input without them)
        base = numbers * (20 + 4)
        self.support = base + (graphs.get("adapt") or 64 * 4 * numbers)
        self.query = base + (graphs.get("predict") or 64 * 4 * numbers)

    def estimate(self, body_bytes: int, support: int, query: int) -> int:
        return 8 * body_bytes + support * self.support + query * self.query

    def acquire(self, size: int, held: int = 0) -> None:
        """Reserve `size` more bytes for a request already holding `held`, or raise 503."""
        with self.lock:
            if self.in_flight > held and self.in_flight + size > self.budget:
                raise ApiError(503, f"the service is busy (about {self.in_flight >> 20} MB of "
                                    f"work in flight, this request needs {size >> 20} MB of "
                                    f"{self.budget >> 20} MB); retry in a second, or send "
                                    "smaller sets", {"retry-after": "1"})
            self.in_flight += size

    def release(self, size: int) -> None:
        with self.lock:
            self.in_flight -= size
        if size >= self.TRIM_AT:
            _trim_memory()


def parse_json(data: bytes, fields: tuple[str, ...]) -> dict[str, Any]:
    """The body as a JSON object with exactly `fields` (NaN / Infinity tokens are accepted as
    numbers, like Python's json, and then refused by validation as non-finite)."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})") from None
    except RecursionError:
        raise ApiError(400, "the body's JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(422, f"the body must be a JSON object with {', '.join(fields)}")
    missing = [f for f in fields if f not in body]
    extra = sorted(set(body) - set(fields))
    if missing or extra:
        problem = f"lacks {', '.join(missing)}" if missing else f"has unknown {', '.join(extra)}"
        raise ApiError(422, f"the body {problem}; expected the fields {', '.join(fields)}")
    return body


def decode_images(value: Any, name: str) -> Any:
    """A list of base64 strings (or data URLs) becomes a list of bytes; other values pass."""
    if isinstance(value, list) and any(isinstance(v, str) for v in value) and not all(
            isinstance(v, str) for v in value):
        raise UsageError(f"{name} mixes base64 images and arrays; send one kind per field")
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return value
    out = []
    for i, text in enumerate(value):
        try:
            out.append(base64.b64decode(_DATA_URL.sub("", text, count=1), validate=True))
        except (binascii.Error, ValueError):
            raise UsageError(f"{name}[{i}] is a string but not base64-encoded image data; send "
                             "numbers, or base64 PNG/JPEG") from None
    return out


def prediction_body(adapter: Adapter, outputs: np.ndarray) -> dict[str, Any]:
    """The JSON answer for a query set's outputs (finite: the adapter refuses others), with a
    `warning` where a transductive adapter's answers depend on a too-small batch."""
    why = transductive_warning(adapter, len(outputs))
    warning = {} if why is None else {"warning": why}
    if adapter.task_kind == "classification":
        return {"predictions": outputs.argmax(-1).tolist(),
                "probabilities": softmax(outputs.astype(np.float64)).tolist(),
                "logits": outputs.tolist(), **warning}
    return {"predictions": outputs.tolist(), **warning}


class PageMount(Mount):
    """The page's static files at `/`, leaving `/v1/...` to the API: a wrong method on an API
    path stays a 405 (a mount at `/` would otherwise match it in full and answer 404)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            return Match.NONE, {}
        return super().matches(scope)


def task_codec(adapter: Adapter) -> tuple[Callable[[Task], bytes], Callable[[bytes], Task]]:
    """How a shared store holds a task: its state arrays (`p0..`, `m0..`) and support size in
    `serve.tensor_file`'s format (arrays only, never pickle), and back."""
    def encode(task: Task) -> bytes:
        tensors = {f"s{i}": np.asarray(a) for i, a in enumerate(task.state)}
        return tensor_file.encode({**tensors, "n_support": np.asarray([task.n_support],
                                                                      dtype=np.int64)})

    def decode(data: bytes) -> Task:
        tensors = tensor_file.decode(data)
        n_support = int(tensors.pop("n_support").reshape(-1)[0])
        state: tuple[Any, ...] = tuple(tensors[f"s{i}"] for i in range(len(tensors)))
        if adapter.backend.name == "torchscript":
            import torch

            state = tuple(torch.from_numpy(a) for a in state)
        return Task(adapter, state, n_support)

    return encode, decode


def make_store(adapter: Adapter, settings: Settings) -> Any:
    """The task store `settings.task_store` names: in this process, or in Redis."""
    if settings.task_store == "memory":
        return TaskStore(settings.max_tasks, settings.task_ttl_s)
    if not settings.task_store.startswith(("redis://", "rediss://", "unix://")):
        raise UsageError(f"--task-store {settings.task_store!r}: use memory or "
                         "redis://host:port/db")
    digest = hashlib.sha256(json.dumps(adapter.metadata.get("sha256", {}),
                                       sort_keys=True).encode()).hexdigest()[:16]
    encode, decode = task_codec(adapter)
    return RedisTaskStore(settings.task_store, digest, encode, decode, settings.max_tasks,
                          settings.task_ttl_s)


def create_app(adapter: Adapter, settings: Settings | None = None) -> FastAPI:
    """The FastAPI application serving `adapter`."""
    settings = settings or Settings()
    store = make_store(adapter, settings)
    pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="serve")
    limit = settings.max_body_bytes
    meta = adapter.metadata

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        lifespan=lifespan,
        title="maml-toolkit adapter service",
        version=str(meta.get("versions", {}).get("maml", "")),
        description=f"A MAML {meta['task']} adapter: adapt to a support set, then predict. "
                    + ("Each query is answered on its own (batch norm uses the support set's "
                       "statistics)." if adapter.norm != "transductive" else
                       "Batch norm uses the statistics of each query batch (transductive), so "
                       "send a query set together; a smaller batch gets a `warning`."),
    )
    # the answer's `warning` field says it to the client; the log need not, once per request
    warnings.filterwarnings("ignore", category=TransductiveWarning)
    app.state.store, app.state.adapter, app.state.settings = store, adapter, settings
    admission = app.state.admission = Admission(settings.max_inflight_bytes, adapter)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type"])
    if settings.auth_tokens:
        app.add_middleware(Guard, tokens=settings.auth_tokens)  # outermost: before CORS

    def count(value: Any) -> int:
        return len(value) if isinstance(value, list) else 0

    async def in_pool(data: bytes, fields: tuple[str, ...],
                      work: Callable[[dict[str, Any]], T]) -> T:
        """Parse `data` (the JSON object with `fields`) and run `work` on it in the pool, both
        admitted by their estimated memory (503 when they do not fit)."""
        parse_cost = admission.estimate(len(data), 0, 0)
        admission.acquire(parse_cost)

        def run() -> T:
            body = parse_json(data, fields)
            support = count(body.get("support_x"))
            query = count(body.get("query_x"))
            extra = admission.estimate(0, support, query)
            admission.acquire(extra, held=parse_cost)
            try:
                return work(body)
            finally:
                admission.release(extra)

        try:
            return await asyncio.get_running_loop().run_in_executor(pool, run)
        finally:
            admission.release(parse_cost)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(UsageError)
    async def usage_error(_: Request, exc: UsageError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
        return _error(503, str(exc), {"retry-after": "1"})

    @app.exception_handler(InferenceError)
    async def inference_error(_: Request, exc: InferenceError) -> JSONResponse:
        return _error(500, f"inference failed: {exc}")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers)  # a 405's Allow

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness: the service is up and its adapter loaded."""
        try:
            tasks: int | None = await asyncio.to_thread(len, store)
        except StoreUnavailable:
            tasks = None  # the service lives; the task store is what fails
        return {"status": "ok", "tasks": tasks, "backend": adapter.backend.name}

    @app.get("/v1/adapter")
    async def adapter_metadata() -> dict[str, Any]:
        """The adapter's `adapter.json`, plus this service's limits."""
        limits = {**asdict(adapter.limits), "max_body_bytes": limit,
                  "max_tasks": settings.max_tasks, "task_ttl_s": settings.task_ttl_s}
        return {"metadata": meta, "backend": adapter.backend.name, "limits": limits}

    most_support, most_query = adapter.limits.max_support, adapter.limits.max_query
    support_doc = {"support_x": most_support, "support_y": most_support}

    @app.post("/v1/tasks", status_code=201, openapi_extra=_body_doc(SupportBody, support_doc),
              responses={201: {"model": TaskCreated}, **ERRORS})
    async def create_task(request: Request) -> JSONResponse:
        """Adapt to a support set once; later predictions use the returned `task_id`."""
        data = await read_body(request, limit)

        def run(body: dict[str, Any]) -> Task:
            return adapter.adapt(decode_images(body["support_x"], "support_x"),
                                 body["support_y"])

        task = await in_pool(data, ("support_x", "support_y"), run)
        task_id = await asyncio.to_thread(store.add, task)
        return JSONResponse({"task_id": task_id, "n_support": task.n_support,
                             "ttl_s": settings.task_ttl_s}, status_code=201)

    async def lookup(task_id: str) -> Task:
        task = await asyncio.to_thread(store.get, task_id)
        if task is None:
            raise ApiError(404, f"no task {shown(task_id)}: unknown, deleted, or evicted (idle over "
                                f"{settings.task_ttl_s:g} s, or more than {settings.max_tasks} "
                                "tasks); POST /v1/tasks again")
        return task

    @app.post("/v1/tasks/{task_id}/predict",
              openapi_extra=_body_doc(QueryBody, {"query_x": most_query}),
              responses={200: {"model": Predictions}, **ERRORS})
    async def predict_task(task_id: str, request: Request) -> JSONResponse:
        """Predict a query set with an adapted task."""
        task = await lookup(task_id)
        data = await read_body(request, limit)

        def run(body: dict[str, Any]) -> dict[str, Any]:
            return prediction_body(adapter, task.predict(decode_images(body["query_x"],
                                                                       "query_x")))

        return JSONResponse(await in_pool(data, ("query_x",), run))

    @app.delete("/v1/tasks/{task_id}", status_code=204, responses={404: {"model": ErrorBody}})
    async def delete_task(task_id: str) -> Response:
        """Forget an adapted task."""
        if not await asyncio.to_thread(store.delete, task_id):
            await lookup(task_id)  # raises the 404
        return Response(status_code=204)

    @app.post("/v1/predict",
              openapi_extra=_body_doc(PredictBody, {**support_doc, "query_x": most_query}),
              responses={200: {"model": Predictions}, **ERRORS})
    async def predict_stateless(request: Request) -> JSONResponse:
        """Adapt and predict in one request; nothing is stored (for replicated deployments)."""
        data = await read_body(request, limit)

        def run(body: dict[str, Any]) -> dict[str, Any]:
            outputs = adapter.adapt_predict(
                decode_images(body["support_x"], "support_x"), body["support_y"],
                decode_images(body["query_x"], "query_x"))
            return prediction_body(adapter, outputs)

        return JSONResponse(await in_pool(data, ("support_x", "support_y", "query_x"), run))

    @app.get("/v1/adapter/files/{name}", responses={404: {"model": ErrorBody}})
    async def adapter_file(name: str) -> Response:
        """A file of the export (`adapter.json` or one of its ONNX files), read-only, for the
        drawing page, which adapts in the browser."""
        from fastapi.responses import FileResponse

        if name not in ("adapter.json", *meta.get("files", {}).get("onnx", {}).values()):
            raise ApiError(404, f"no adapter file {shown(name)}; the service offers adapter.json and "
                                "the files listed under files.onnx in it")
        return FileResponse(Path(adapter.directory) / name, headers={"cache-control": "no-cache"})

    static = settings.static_dir or STATIC_DIR
    if (static / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        app.router.routes.append(PageMount("/", StaticFiles(directory=static, html=True),
                                           name="static"))
    else:

        @app.get("/")
        async def index() -> dict[str, Any]:
            """What this service offers (a page in `serve/static/` replaces this answer)."""
            return {"service": "maml-toolkit adapter", "task": meta["task"],
                    "docs": "/docs", "openapi": "/openapi.json",
                    "endpoints": ["/healthz", "/v1/adapter", "/v1/tasks",
                                  "/v1/tasks/{task_id}/predict", "/v1/predict"]}

    return app
