"""Serving in a background thread (tests, notebooks) and binding the listening socket."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import threading
from typing import TYPE_CHECKING

from engine.openmp import release_openmp_pool

if TYPE_CHECKING:
    from engine.server.app import OpenAIServer

logger = logging.getLogger(__name__)

__all__ = ["ServerThread", "bind_socket", "free_port"]


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); port 0 picks a free one (see getsockname())."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise ValueError(f"cannot resolve host {host!r}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for ports it hands to sockets bound without one (Linux default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(part) for part in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now; nothing holds it after this returns.

    It is drawn from outside the kernel's ephemeral range, so that sockets opened meanwhile
    without a port (a TCPStore's or gloo's connections, HTTP clients) cannot take it before the
    caller binds it; only when no such port binds does the OS pick one from the range.
    """
    low, high = _ephemeral_port_range()
    candidates = [*range(10000, min(low, 65536)), *range(max(high + 1, 10000), 65536)]
    for port in random.sample(candidates, min(64, len(candidates))):
        try:
            with bind_socket(host, port):
                return port
        except OSError:
            continue
    with bind_socket(host, 0) as sock:
        return int(sock.getsockname()[1])


class ServerThread:
    """Runs an OpenAIServer on its own event loop in a background thread (tests, notebooks).

    `start()` returns the base URL once the server listens; `stop()` shuts it down cleanly.
    """

    def __init__(self, server: OpenAIServer, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = server
        self._sock = bind_socket(host, port)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="server-loop", daemon=True)
        self.url = ""

    def start(self, timeout: float = 60.0) -> str:
        # The caller usually loaded the model: free its OpenMP team (see engine/openmp.py).
        release_openmp_pool()
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the server did not start")
        if self._error is not None:
            raise RuntimeError("the server failed to start") from self._error
        return self.url

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(url: str) -> None:
                self.url = url
                self._ready.set()

            await self.server.serve(self._sock, stop=self._stop, ready=ready)

        try:
            asyncio.run(run())
        except BaseException as e:
            self._error = e
            logger.exception("server thread failed")
        finally:
            self._ready.set()
