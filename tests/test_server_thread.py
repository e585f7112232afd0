"""engine/server/thread.py's socket helpers: the ports tests, benches and the Ray CLI pick."""

from __future__ import annotations

import socket

from engine.server import thread
from engine.server.thread import bind_socket, free_port


def test_free_port_is_outside_the_ephemeral_range_and_binds():
    """CI once lost a torchrun test to a race: the HTTP port free_port returned was taken by one
    of gloo's connections (bound without a port, so from the ephemeral range) before the server
    bound it. Ports from outside that range cannot be handed out that way."""
    low, high = thread._ephemeral_port_range()
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # drawn, not one fixed port every caller would share
    for port in ports:
        assert not low <= port <= high and 10000 <= port <= 65535
        with bind_socket("127.0.0.1", port) as sock:
            assert sock.getsockname()[1] == port


def test_free_port_falls_back_to_the_os_when_nothing_outside_the_range_binds(monkeypatch):
    monkeypatch.setattr(thread, "_ephemeral_port_range", lambda: (10000, 65535))
    port = free_port()
    assert 10000 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_free_port_skips_ports_in_use(monkeypatch):
    """A drawn port that is already bound is skipped, not returned."""
    with bind_socket("127.0.0.1", free_port()) as held:
        taken = held.getsockname()[1]
        held.listen()
        other = taken + 1 if taken < 65535 else taken - 1
        monkeypatch.setattr(thread.random, "sample", lambda population, k: [taken, other])
        assert free_port() != taken
