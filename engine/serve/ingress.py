"""`OpenAIIngress`: the Ray Serve ingress in front of the engine replicas.

Ray Serve's HTTP proxy hands each request to this deployment as a Starlette `Request`. The
ingress reads the body (bounded by `max_request_body_bytes`), computes the prefix routing key
(`engine.serve.routing`), and calls the engine deployment with `routing_key=` so that the
`PrefixAffinityRouter` can place it; the replica relays it to its own `OpenAIServer` and streams
the response back (a JSON answer in one piece, SSE chunk by chunk). So every route of
`python -m engine.server` works unchanged, with the same bodies, errors and SSE framing; each
response names the replica that served it in the `x-engine-replica` header.

* `GET /metrics` is answered here: every live replica's exposition, each series labelled
  `replica` (`engine.serve.metrics`), plus `engine_serve_replicas` (how many answered).
* A replica that dies before sending a response head (killed, node lost) costs a retry on
  another replica (`max_attempts` in all); one that dies mid-stream ends an SSE stream with an
  error event and `data: [DONE]`, as the server does for a failed step.
* A client that hangs up: Serve's proxy cancels the request, and with it the pending call
  through which this replica's `receive()` fetches the client's messages, so `receive()` raises
  that call's `TaskCancelledError` instead of returning `http.disconnect`. Mid-stream
  `_SSEResponse`, and mid-upload the body read, take it for the disconnect it is: escaping into
  Serve's handler task, which nobody awaits once the request is cancelled, it was logged as
  "Task exception was never retrieved" (or "Future exception ...") with a traceback.
* More requests waiting for a replica than the engine deployment's `max_queued_requests` (the
  server's `--max-waiting-requests`): 503 with `Retry-After`, as the plain server answers.

Invariants: a request is answered with the replica's status, headers and bytes, or with OpenAI's
error JSON (400 client gone before its body arrived, 408 body too slow, 413 body too large, 503 no
replica could take it); an early client disconnect cancels the replica call, which aborts the
engine request, and leaves no exception in Serve's handler task.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive

from engine.serve.metrics import merge_replica_metrics
from engine.serve.routing import DEFAULT_PREFIX_CHARS, ROUTED_PATHS, routing_key
from engine.server.protocol import APIError

logger = logging.getLogger(__name__)

__all__ = ["REPLICA_HEADER", "IngressConfig", "OpenAIIngress"]

REPLICA_HEADER = "x-engine-replica"
# Errors that mean "this replica is gone, unreachable or failed to relay" (RayTaskError: its
# loopback server did not answer): safe to retry before any byte was sent.
_REPLICA_GONE = (RayActorError, ActorUnavailableError, DeploymentUnavailableError, RayTaskError)
# Response headers Starlette sets itself.
_DROPPED_RESPONSE_HEADERS = frozenset({"date", "server", "content-length", "transfer-encoding"})
_PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Bodies parsed for a routing key on the event loop (json.loads holds the GIL: a thread would not
# help); a larger body (a prompt of about a million characters) is routed without one.
_MAX_ROUTED_BODY_BYTES = 4 * 2**20


@dataclass(frozen=True, slots=True)
class IngressConfig:
    prefix_chars: int = DEFAULT_PREFIX_CHARS
    max_request_body_bytes: int = 32 * 2**20
    request_body_timeout: float | None = 60.0  # seconds the body has to arrive (None: no limit)
    max_attempts: int = 3  # replicas tried for one request when replicas die before answering
    metrics_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.prefix_chars < 1:
            raise ValueError(f"prefix_chars must be at least 1, got {self.prefix_chars}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")


def _error(error: APIError) -> Response:
    return Response(
        json.dumps(error.body()),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )


def _sse_error(message: str) -> bytes:
    event = {"error": {"message": message, "type": "InternalServerError", "param": None,
                       "code": 500}}  # fmt: skip
    return f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()


class _SSEResponse(StreamingResponse):
    """Starlette's `StreamingResponse` for a relayed SSE stream, where a cancelled `receive()`
    (Ray's `TaskCancelledError`, or Serve's `RequestCancelledError`, its subclass) counts as
    the client's disconnect: the body iterator is then cancelled as on `http.disconnect` (its
    `finally` cancels the replica call), and the response ends without an exception. Any other
    error from `receive()` still propagates."""

    async def listen_for_disconnect(self, receive: Receive) -> None:
        try:
            await super().listen_for_disconnect(receive)
        except TaskCancelledError:
            logger.debug("the client went away: Serve cancelled the request's receive call")


def _route_path(request: Request) -> str:
    """The path below the application's route prefix (`serve.run(..., route_prefix="/a")`
    serves this app's `/v1/models` at `/a/v1/models`)."""
    path: str = request.scope["path"]
    root: str = request.scope.get("root_path", "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    return path or "/"


class OpenAIIngress:
    """A Serve deployment class; `engine` is a handle to the `EngineReplica` deployment."""

    def __init__(self, engine: DeploymentHandle, config: IngressConfig | None = None) -> None:
        self.engine = engine
        self.config = config or IngressConfig()
        self._streaming = engine.options(stream=True)

    async def __call__(self, request: Request) -> Response:
        path = _route_path(request)
        if path == "/metrics" and request.method == "GET":
            return await self.metrics(request.headers.get("authorization"))
        timeout = self.config.request_body_timeout
        try:
            body = await asyncio.wait_for(self._read_body(request), timeout)
        except APIError as e:
            return _error(e)
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
            message = f"The request body did not arrive within {timeout:g} s"
            return _error(APIError(message, status=408))
        except (ClientDisconnect, TaskCancelledError):  # as in `_SSEResponse`; no one reads this
            message = "The client disconnected before the request body arrived"
            return _error(APIError(message, status=400))
        key = self._routing_key(request.method, path, body)
        target = path + (f"?{request.url.query}" if request.url.query else "")
        headers = list(request.headers.items())
        last_error: BaseException | None = None
        for _ in range(self.config.max_attempts):
            try:
                stream: DeploymentResponseGenerator = self._streaming.handle_http.remote(
                    request.method, target, headers, body, routing_key=key
                )
                head = await stream.__anext__()
            except _REPLICA_GONE as e:
                logger.warning("a replica failed before answering %s; retrying: %s", path, e)
                last_error = e
                continue
            except BackPressureError as e:
                return _error(APIError(str(e), status=503, headers={"Retry-After": "1"}))
            return await self._respond(head, stream)
        return _error(
            APIError(f"No engine replica could take the request: {last_error}", status=503)
        )

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_request_body_bytes
        too_large = APIError(
            f"The request body is too large: this server accepts at most {limit} bytes "
            "(--max-request-body-bytes)",
            status=413,
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _routing_key(self, method: str, path: str, body: bytes) -> str | None:
        if method != "POST" or path not in ROUTED_PATHS:
            return None
        if len(body) > _MAX_ROUTED_BODY_BYTES:
            return None  # parsing would stall this event loop; the least loaded replica takes it
        try:
            parsed: Any = json.loads(body)
        except (ValueError, RecursionError):
            return None  # the replica answers the 400
        return routing_key(path, parsed, self.config.prefix_chars)

    async def _respond(self, head: dict[str, Any], stream: DeploymentResponseGenerator) -> Response:
        headers = {k: v for k, v in head["headers"] if k.lower() not in _DROPPED_RESPONSE_HEADERS}
        headers[REPLICA_HEADER] = head["replica"]
        status = head["status"]
        if "body" in head:  # a whole JSON answer
            return Response(head["body"], status_code=status, headers=headers)
        return _SSEResponse(self._relay_sse(stream), status_code=status, headers=headers)

    async def _relay_sse(self, stream: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
        finished = False
        try:
            async for chunk in stream:
                yield chunk
            finished = True
        except _REPLICA_GONE as e:
            logger.warning("a replica failed mid-stream: %s", e)
            yield _sse_error(f"The engine replica failed: {e}")
            finished = True
        finally:
            if not finished:  # the client went away: abort the request on the replica
                stream.cancel()

    async def metrics(self, authorization: str | None) -> Response:
        """Every live replica's metrics in one exposition (label `replica`)."""
        try:
            results = await self.engine.broadcast("metrics", authorization).results_async(
                timeout_s=self.config.metrics_timeout_s, return_exceptions=True
            )
        except (TimeoutError, asyncio.TimeoutError):
            return _error(APIError("The engine replicas did not answer in time", status=503))
        scrapes = []
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("a replica's metrics are missing: %s", result)
                continue
            name, status, body = result
            if status != 200:  # 401 without the API key: the replica's own answer
                return Response(body, status_code=status, media_type="application/json")
            scrapes.append((name, body.decode("utf-8")))
        if not scrapes:
            return _error(APIError("No engine replica is running", status=503))
        count = (
            "# HELP engine_serve_replicas Engine replicas whose series this scrape holds.\n"
            "# TYPE engine_serve_replicas gauge\n"
            f"engine_serve_replicas {len(scrapes)}\n"
        )
        text = merge_replica_metrics(sorted(scrapes), extra_families=[count])
        return Response(text, media_type=_PROMETHEUS_TYPE)
