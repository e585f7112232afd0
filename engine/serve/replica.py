"""`EngineReplica`: one engine and its OpenAI server inside a Ray Serve replica actor.

The replica reuses `engine.server` whole: it builds `OpenAIServer(LLMEngine(args), config)` and
serves it (`OpenAIServer.serve`) on a loopback port from its own thread and event loop, then relays
HTTP requests the ingress hands it over Ray to that port with aiohttp, chunk by chunk.
Routes, validation, errors, limits, SSE framing and metrics are therefore exactly those of
`python -m engine.server`; nothing is re-implemented here.

`handle_http` is an async generator (called with `handle.options(stream=True)`): its first item is
the response head `{"status", "headers", "replica"}`. A JSON answer comes whole in the head
(`"body"`); an SSE stream follows as body chunks, as the loopback server wrote them. Closing the
generator early (client gone) closes the loopback request, which aborts the engine request and
frees its KV blocks, as a disconnect does.

The server's loop is a plain asyncio `SelectorEventLoop`, not the process's default: Ray Serve
installs uvloop's policy in replicas, and the server's connection guard needs asyncio's own
transports (`engine/server/connections.py` asserts `asyncio.Transport`).

Threads: `num_threads` bounds torch's intra-op threads (and OMP_NUM_THREADS, which Ray also sets
to the actor's `num_cpus`); the replica's own event loop only relays bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import torch

from engine.config import EngineArgs
from engine.openmp import release_openmp_pool
from engine.server import OpenAIServer, ServerConfig
from engine.server.thread import bind_socket

logger = logging.getLogger(__name__)

__all__ = ["EngineReplica", "ResponseHead"]

# {"status": int, "headers": [(name, value)...], "replica": str[, "body": bytes]}
ResponseHead = dict[str, Any]

# Headers that belong to one connection (RFC 9110 7.6.1) or that aiohttp recomputes.
_HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length",
    }
)  # fmt: skip


def forwardable(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The end-to-end headers of a request or response (hop-by-hop ones dropped)."""
    return [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]


def _replica_name() -> str:
    """This replica's Ray Serve id (its `unique_id`); the process id outside Serve (tests)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a Serve replica
        return f"pid{os.getpid()}"


class EngineReplica:
    """A Serve deployment class: one `LLMEngine` served by `OpenAIServer` on 127.0.0.1."""

    def __init__(
        self,
        engine_args: EngineArgs,
        server_config: ServerConfig,
        num_threads: int | None = None,
    ) -> None:
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be at least 1, got {num_threads}")
            os.environ["OMP_NUM_THREADS"] = str(num_threads)
            torch.set_num_threads(num_threads)
        from engine.engine import LLMEngine

        # The proxy owns the public address; the replica listens on loopback only.
        config = dataclasses.replace(server_config, host="127.0.0.1", port=0)
        self.name = _replica_name()
        self.server = OpenAIServer(LLMEngine(engine_args), config)
        self._loopback = _LoopbackServer(self.server)
        self.url = self._loopback.start()
        self._session: aiohttp.ClientSession | None = None
        logger.info("engine replica %s serving on %s", self.name, self.url)

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, on the replica's event loop (Serve runs async methods there).
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
            )
        return self._session

    async def handle_http(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        routing_key: str | None = None,  # read by the router; unused here
    ) -> AsyncIterator[ResponseHead | bytes]:
        """Relays one HTTP request to the loopback server; yields the head, then body chunks."""
        async with self._client().request(
            method,
            self.url + target,
            headers=forwardable(headers),
            data=body or None,
            allow_redirects=False,
        ) as response:
            head: ResponseHead = {
                "status": response.status,
                "headers": forwardable(list(response.headers.items())),
                "replica": self.name,
            }
            if response.content_type != "text/event-stream":
                head["body"] = await response.read()  # one Ray item for a whole JSON answer
                yield head
                return
            yield head
            async for chunk in response.content.iter_any():
                yield chunk

    async def metrics(self, authorization: str | None = None) -> tuple[str, int, bytes]:
        """(replica name, status, body) of this replica's GET /metrics."""
        headers = {"Authorization": authorization} if authorization else {}
        async with self._client().get(self.url + "/metrics", headers=headers) as response:
            return self.name, response.status, await response.read()

    def num_threads(self) -> tuple[int, str | None]:
        """(torch's intra-op threads, OMP_NUM_THREADS) in this replica's process."""
        return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    async def check_health(self) -> None:
        """Serve's periodic health probe: the loopback server's GET /health (503 once the engine
        has stopped; no answer if the server thread died). Raising makes Serve replace us."""
        try:
            async with self._client().get(
                self.url + "/health", timeout=aiohttp.ClientTimeout(total=10)
            ) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError, asyncio.TimeoutError) as e:
            raise RuntimeError(f"engine replica {self.name}: no health answer ({e})") from e
        if status != 200:
            raise RuntimeError(f"engine replica {self.name}: /health answered {status}")

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown: finish in-flight requests, stop the engine.
        loopback = getattr(self, "_loopback", None)
        if loopback is not None:
            loopback.stop(timeout=self.server.config.shutdown_timeout + 5)


class _LoopbackServer:
    """Runs `OpenAIServer.serve` on 127.0.0.1 (a free port) in a daemon thread, on a plain
    asyncio loop (see the module docstring); `start()` returns its URL once it listens."""

    def __init__(self, server: OpenAIServer) -> None:
        self.server = server
        self._sock = bind_socket("127.0.0.1", 0)
        self._ready = threading.Event()
        self._loop = asyncio.SelectorEventLoop()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="replica-server", daemon=True)
        self.url = ""

    def start(self, timeout: float = 120.0) -> str:
        release_openmp_pool()  # the loading thread's OpenMP team (see engine/openmp.py)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the replica's server did not start")
        if self._error is not None:
            raise RuntimeError("the replica's server failed to start") from self._error
        return self.url

    def stop(self, timeout: float) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def _main(self) -> None:
        async def run() -> None:
            self._stop = asyncio.Event()

            def ready(url: str) -> None:
                self.url = url
                self._ready.set()

            await self.server.serve(self._sock, stop=self._stop, ready=ready)

        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(run())
        except BaseException as e:
            self._error = e
            logger.exception("the replica's server failed")
        finally:
            self._ready.set()
            self._loop.close()
