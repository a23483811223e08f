"""uvicorn's HTTP/1.1 protocol (h11) with deadlines, so idle or slow clients cannot hold the server.

uvicorn alone has no time limit on receiving a request's headers or body, and its
`limit_concurrency` counts open connections: 127 idle TCP connections made every other client
get 503, and a request that declared `Content-Length: 100` and sent 20 bytes was held forever.
`guarded_protocol` returns an `H11Protocol` subclass (passed to `uvicorn.Config(http=...)`) that:

- gives each request `header_timeout` seconds from its first byte (or from the connection's
  opening) to complete its headers, and `body_timeout` seconds more for its body; past either
  the client gets `408` and the connection is closed (the application sees a disconnect);
- keeps at most `max_connections` open: one more closes the connection idle the longest (one
  with no request in progress), so idle connections cannot lock out new clients; only when
  every connection is busy is the newcomer answered `503`;
- answers a request line or header block over h11's limit (16 KB) with `414` / `431` and reads
  (and discards) what the client is still sending for a moment before closing, so the client
  reads the answer rather than a connection reset.

Idle keep-alive connections are closed after uvicorn's `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

LINGER_S = 1.0  # how long an answered oversized request is drained before closing


def raw_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    """A complete `connection: close` JSON error response, written without h11 (which cannot
    answer a request it has not parsed)."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """See the module docstring; the limits are class attributes set by `guarded_protocol`."""

    header_timeout = 10.0
    body_timeout = 30.0
    max_connections = 1000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = ""  # "headers" or "body": what the deadline is waiting for
        self._opened = time.monotonic()
        self._draining = False

    # -- deadlines --------------------------------------------------------------------------
    def _arm(self, phase: str, seconds: float) -> None:
        if self._phase == phase:
            return
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, ""

    def _expired(self) -> None:
        phase, self._deadline, self._phase = self._phase, None, ""
        if self.transport.is_closing():
            return
        answered = self.cycle is not None and self.cycle.response_started
        if not answered:
            limit = self.header_timeout if phase == "headers" else self.body_timeout
            self.transport.write(raw_response(
                408, "Request Timeout", f"the request's {phase} took over {limit:g} s; send "
                "the whole request at once"))
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the application's receive() sees a disconnect
            self.cycle.message_event.set()
        self.transport.close()

    def _follow(self) -> None:
        """Arm the deadline that fits where the current request is."""
        if self.transport.is_closing():
            self._disarm()
        elif self.conn.their_state is h11.IDLE:
            self._arm("headers", self.header_timeout)
        elif self.conn.their_state is h11.SEND_BODY:
            self._arm("body", self.body_timeout)
        else:
            self._disarm()

    def _idle(self) -> bool:
        return self.conn.their_state is h11.IDLE and (
            self.cycle is None or self.cycle.response_complete)

    # -- uvicorn's hooks --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers", self.header_timeout)
        if len(self.connections) <= self.max_connections:
            return
        idle = [c for c in self.connections
                if c is not self and isinstance(c, GuardedH11Protocol) and c._idle()]
        if idle:
            victim = min(idle, key=lambda c: c._opened)
            victim._disarm()
            victim.transport.close()
        else:
            self._disarm()
            transport.write(raw_response(503, "Service Unavailable", "every connection is busy; "
                                         "retry in a second", "retry-after: 1\r\n"))
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._draining:
            return  # an answered oversized request: discard the rest
        if self.conn.their_state is h11.IDLE and self._phase != "headers":
            self._arm("headers", self.header_timeout)  # a new request on a kept-alive connection
        super().data_received(data)
        if not self._draining:
            self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and self._phase == "headers":
            self._disarm()  # the keep-alive timeout takes over until the next byte

    def send_400_response(self, msg: str) -> None:
        buffered = getattr(self.conn, "_receive_buffer", b"")
        too_long = len(buffered) > getattr(self.conn, "_max_incomplete_event_size", 1 << 62)
        if not too_long:
            self._disarm()
            super().send_400_response(msg)
            return
        if b"\r\n" not in bytes(buffered):
            response = raw_response(414, "URI Too Long", "the request line is over 16 KB; "
                                    "send the input in a JSON body")
        else:
            response = raw_response(431, "Request Header Fields Too Large", "the request's "
                                    "headers are over 16 KB; send fewer or shorter headers")
        self.logger.info("refused an oversized request line or headers")
        self._disarm()
        self._draining = True
        self.transport.write(response)
        self.loop.call_later(LINGER_S, self.transport.close)


def guarded_protocol(header_timeout: float, body_timeout: float,
                     max_connections: int) -> type[GuardedH11Protocol]:
    """`GuardedH11Protocol` with these limits (a subclass, so services in one process differ)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": header_timeout, "body_timeout": body_timeout,
        "max_connections": max_connections})
