"""The delaying TCP relay (pytest_fastsnap/restore/delay_relay.py) on its own,
over loopback: it closes a connection whose upstream is unreachable and goes
on relaying, leaves no descriptor or thread behind, and holds bytes for the
delay it was given (a lower bound: physics, not a speed goal)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pytest_fastsnap.restore.delay_relay import DelayRelay


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def echo_server() -> Iterator[socket.socket]:
    """A bound socket that is not listening yet: connections to it are refused
    until the test calls listen() (then :func:`echo_once` serves one)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    yield srv
    srv.close()


def echo_once(srv: socket.socket) -> threading.Thread:
    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_unreachable_upstream_closes_the_connection_and_relaying_goes_on(
        echo_server: socket.socket) -> None:
    """Regression: when the upstream connect failed, the accepted socket was
    never closed (the client waited forever) and the acceptor thread died, so
    no later connection was relayed either."""
    before = open_fds()
    threads = threading.active_count()
    relay = DelayRelay(echo_server.getsockname(), rtt_ms=0)
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as c:
            c.settimeout(5)
            with contextlib.suppress(ConnectionResetError):     # closed: as good as EOF
                assert c.recv(1) == b"", "the relay sent bytes for an unreachable upstream"
        deadline = time.monotonic() + 5
        while not relay.errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.errors and "Connection refused" in relay.errors[0], relay.errors
        assert relay.socks == [], "sockets of the failed connection kept"
        echo_server.listen(1)
        server = echo_once(echo_server)
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as c:
            c.settimeout(5)
            c.sendall(b"ping")
            assert c.recv(4) == b"ping", "a connection after the failed one was not relayed"
        server.join(5)
    finally:
        relay.close()
    assert open_fds() == before, "descriptors left open by the relay"
    deadline = time.monotonic() + 5
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == threads, "relay threads still running after close()"


@pytest.mark.parametrize("to_upstream", [0.5, 1.0])
def test_round_trip_is_at_least_the_delay(echo_server: socket.socket, to_upstream: float) -> None:
    """Each echoed message comes back no sooner than the relay's round trip
    (20 ms), however the delay is split between the two directions."""
    echo_server.listen(1)
    server = echo_once(echo_server)
    rtts = []
    with DelayRelay(echo_server.getsockname(), rtt_ms=20, to_upstream=to_upstream) as relay, \
            socket.create_connection(("127.0.0.1", relay.port), timeout=5) as c:
        c.settimeout(5)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(5):
            t = time.monotonic()
            c.sendall(bytes([i]) * 8)
            got = b""
            while len(got) < 8:
                got += c.recv(8 - len(got))
            rtts.append(time.monotonic() - t)
            assert got == bytes([i]) * 8
        c.shutdown(socket.SHUT_WR)
        assert relay.wait_forwarded_up(40) == 40
    server.join(5)
    print(f"relay 20 ms (to_upstream {to_upstream}): echo round trips "
          + ", ".join(f"{r * 1000:.1f}" for r in rtts) + " ms")
    assert min(rtts) >= 0.020, rtts


def test_to_upstream_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match=r"to_upstream must be within 0\.\.1"):
        DelayRelay(("127.0.0.1", 1), rtt_ms=1, to_upstream=1.5)
