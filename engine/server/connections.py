"""Connection-level protection: a cap on open connections, a deadline for request headers,
rate-limited logging of socket errors, and aborting what is left at shutdown.

aiohttp has no header timeout and no connection limit, so a client that opens thousands of
connections and never finishes their headers keeps every file handle until the process can
accept nothing (slowloris). `GuardedSockSite` serves aiohttp's handler through a thin protocol
wrapper that:

* answers `503` when `max_connections` are already open, then half-closes and drains the
  request for at most `_REJECT_LINGER_S` (no reset that could destroy the reply);
* closes a connection whose request headers have not all arrived `header_timeout` seconds after
  it opened (or after the first byte of a later request on a kept-alive connection); aiohttp's
  keep-alive timeout closes connections idle between requests;
* answers a request aiohttp cannot parse (an unknown method, a malformed line) with OpenAI's
  error JSON rather than aiohttp's text;
* is registered in a `ConnectionGuard`, which the server uses to mark requests started and
  finished (from a middleware: a request reaches it once its headers are parsed) and to abort
  every connection still open when its shutdown deadline has passed.

Body read time is bounded by the handlers (`read_body`). Invariant: the guard's count equals the
number of open accepted connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["ConnectionGuard", "GuardedSockSite", "RateLimitFilter", "install_log_rate_limits"]

logger = logging.getLogger(__name__)

_BUSY_BODY = (
    b'{"error": {"message": "Too many open connections; retry later", '
    b'"type": "ServiceUnavailableError", "param": null, "code": 503}}'
)
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
    + str(len(_BUSY_BODY)).encode()
    + b"\r\n\r\n"
    + _BUSY_BODY
)
# How long a connection refused over the cap may stay half-open, draining the client's request.
_REJECT_LINGER_S = 0.5


class ConnectionGuard:
    """Open connections of one server (event-loop thread only)."""

    def __init__(self, max_connections: int | None, header_timeout: float | None) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self._open: dict[asyncio.BaseTransport, _GuardedProtocol] = {}
        self.num_rejected = 0
        self.num_timed_out = 0

    @property
    def num_open(self) -> int:
        return len(self._open)

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        protocol = self._open.get(transport) if transport is not None else None
        if protocol is not None:
            protocol.headers_done()

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        protocol = self._open.get(transport) if transport is not None else None
        if protocol is not None:
            protocol.wait_for_next_request()

    def abort_all(self) -> int:
        """Aborts every open connection (shutdown); returns how many."""
        transports = list(self._open)
        for transport in transports:
            transport.abort()  # type: ignore[attr-defined]
        return len(transports)

    def _admit(self, transport: asyncio.BaseTransport, protocol: _GuardedProtocol) -> bool:
        if self.max_connections is not None and len(self._open) >= self.max_connections:
            self.num_rejected += 1
            return False
        self._open[transport] = protocol
        return True

    def _release(self, transport: asyncio.BaseTransport) -> None:
        self._open.pop(transport, None)


class _GuardedProtocol(asyncio.Protocol):
    """Forwards everything to aiohttp's RequestHandler; adds the cap and the header deadline."""

    def __init__(self, inner: Any, guard: ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._between_requests = False
        self._rejected = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport: asyncio's own, or uvloop's (which does not subclass
        # asyncio.Transport, hence no isinstance check here).
        transport = cast(asyncio.Transport, transport)
        if not self._guard._admit(transport, self):
            self._rejected = True
            transport.write(_BUSY_RESPONSE)
            # Half-close after the reply and discard what the client still sends until it closes
            # (or _REJECT_LINGER_S): closing with unread bytes in the receive buffer makes the
            # kernel send a reset, which can destroy the 503 before the client has read it.
            if transport.can_write_eof():
                transport.write_eof()
            asyncio.get_running_loop().call_later(_REJECT_LINGER_S, transport.close)
            return
        self._transport = transport
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        if self._between_requests:  # the first byte of the next request: its headers are due
            self._between_requests = False
            self._arm()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._rejected:
            return None
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._rejected:
            return
        self._disarm()
        if self._transport is not None:
            self._guard._release(self._transport)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self._rejected:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if not self._rejected:
            self._inner.resume_writing()

    # ---- header deadline -----------------------------------------------------------------

    def headers_done(self) -> None:
        self._between_requests = False
        self._disarm()

    def wait_for_next_request(self) -> None:
        self._between_requests = True

    def _arm(self) -> None:
        self._disarm()
        timeout = self._guard.header_timeout
        if timeout is not None and self._transport is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(timeout, self._headers_timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_timed_out(self) -> None:
        self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            self._guard.num_timed_out += 1
            logger.debug("closing a connection whose request headers did not arrive in time")
            self._transport.abort()


class _JSONErrorRequestHandler(RequestHandler):  # type: ignore[type-arg]
    """aiohttp's handler, answering requests it cannot parse (a bad method, a malformed header)
    in OpenAI's error JSON instead of text, and logging them at debug level only (clients
    control them)."""

    __slots__ = ()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        logger.debug("malformed HTTP request: %s", exc)
        if request.writer.output_size > 0:
            raise ConnectionError("the response was already started")
        text = "Malformed HTTP request" if status == 400 else _phrase(status)
        body = {
            "error": {
                "message": text,
                "type": "BadRequestError" if status < 500 else "InternalServerError",
                "param": None,
                "code": status,
            }
        }
        response = web.json_response(body, status=status)
        response.force_close()
        return response


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _make_handler(server: web.Server) -> Any:
    try:  # aiohttp's own Server.__call__, with our subclass
        return _JSONErrorRequestHandler(server, loop=server._loop, **server._kwargs)
    except (AttributeError, TypeError):  # another aiohttp version: its plain handler
        return server()


class GuardedSockSite(web.SockSite):
    """`web.SockSite` whose connections go through a `ConnectionGuard`."""

    __slots__ = ("_guard",)

    def __init__(self, runner: web.BaseRunner, sock: Any, guard: ConnectionGuard) -> None:
        super().__init__(runner, sock)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        guard = self._guard

        def factory() -> _GuardedProtocol:
            return _GuardedProtocol(_make_handler(server), guard)

        self._server = await asyncio.get_running_loop().create_server(
            factory, sock=self._sock, backlog=self._backlog
        )


class RateLimitFilter(logging.Filter):
    """Lets one record per (logger, message template) through every `interval` seconds; the
    next one that passes says how many were dropped. Keeps a socket-error storm (accept()
    failing for every connection) from writing gigabytes of tracebacks."""

    def __init__(self, interval: float = 10.0, max_keys: int = 1024) -> None:
        super().__init__()
        self.interval = interval
        self.max_keys = max_keys
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        last, dropped = self._seen.get(key, (float("-inf"), 0))
        if now - last < self.interval:
            self._seen[key] = (last, dropped + 1)
            return False
        if len(self._seen) >= self.max_keys:
            self._seen.clear()
        self._seen[key] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} similar messages dropped)"
        return True


_RATE_LIMITED_LOGGERS = ("asyncio", "aiohttp.server", "aiohttp.web")


def install_log_rate_limits(interval: float = 10.0) -> None:
    """Adds a RateLimitFilter to the loggers that report socket and protocol errors (once)."""
    for name in _RATE_LIMITED_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in target.filters):
            target.addFilter(RateLimitFilter(interval))
