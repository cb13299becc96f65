"""A TCP relay that adds a fixed delay to the bytes it forwards: a stand-in
for ``tc netem delay`` on kernels without sch_netem (this machine's: its
only delaying-capable qdiscs would be netem, fq or etf, none of which it
has), used by the transport benchmark and the namespace tests.

    with DelayRelay(("127.0.0.1", qemu_port), rtt_ms=10) as relay:
        loader --to tcp:127.0.0.1:{relay.port}

Each accepted connection gets its own upstream connection, in accept order
(so the bridge's main and preempt channels keep their order).  By default
bytes are held rtt/2 in each direction; ``to_upstream=1.0`` puts the whole
added round trip on the way to upstream (what ``netem delay`` on the
client's interface does).  At most ``window`` bytes wait per direction, so
the sender still feels back-pressure like a socket buffer on a real link.
``new_socket(family)`` makes the relay's sockets (e.g. inside a network
namespace: :meth:`pytest_fastsnap.netns.VethPair.socket_in`).

A connection whose upstream cannot be reached is closed at once (the error
is kept in :attr:`errors`) and the relay goes on accepting.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

SocketMaker = Callable[[int], socket.socket]


def _plain_socket(family: int) -> socket.socket:
    return socket.socket(family, socket.SOCK_STREAM)


class _Pipe:
    """One direction: reader thread -> delayed queue -> writer thread."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, window: int) -> None:
        self.src, self.dst, self.delay, self.window = src, dst, delay, window
        self.q: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.forwarded = 0
        self.eof = False
        self.stopped = False
        self.cv = threading.Condition()
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._write, daemon=True)]
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.src.recv(256 << 10):
                with self.cv:
                    while self.queued >= self.window and not self.stopped:
                        self.cv.wait()
                    if self.stopped:
                        break
                    self.q.append((time.monotonic() + self.delay, data))
                    self.queued += len(data)
                    self.cv.notify_all()
        with self.cv:
            self.eof = True
            self.cv.notify_all()

    def _write(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                with self.cv:
                    while not self.q and not self.eof and not self.stopped:
                        self.cv.wait()
                    if not self.q or self.stopped:
                        break
                    due, data = self.q[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.dst.sendall(data)
                with self.cv:
                    self.q.popleft()
                    self.queued -= len(data)
                    self.forwarded += len(data)
                    self.cv.notify_all()
        with self.cv:   # a reader waiting for room must not wait for a dead writer
            self.stopped = True
            self.cv.notify_all()
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)

    def stop(self, timeout: float) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
        for t in self.threads:
            t.join(timeout)


class DelayRelay:
    def __init__(self, upstream: tuple[str, int], rtt_ms: float, *, host: str = "127.0.0.1",
                 window: int = 4 << 20, to_upstream: float = 0.5,
                 new_socket: SocketMaker | None = None) -> None:
        if not 0.0 <= to_upstream <= 1.0:
            raise ValueError(f"to_upstream must be within 0..1, not {to_upstream!r}")
        self.upstream, self.window = upstream, window
        self.rtt_ms = rtt_ms
        self.delay_up = rtt_ms * to_upstream / 1000
        self.delay_down = rtt_ms * (1.0 - to_upstream) / 1000
        self._new_socket = new_socket or _plain_socket
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.lsock = self._new_socket(family)
        try:
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.lsock.bind((host, 0))
            self.lsock.listen(16)
        except BaseException:
            self.lsock.close()
            raise
        self.port = int(self.lsock.getsockname()[1])
        self.socks: list[socket.socket] = []
        self.pipes: list[_Pipe] = []
        self.errors: list[str] = []
        self.peers: list[tuple[str, int]] = []     # each relayed connection's upstream peer
        self._lock = threading.Lock()
        self._stop = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def forwarded_up(self) -> int:
        """Bytes delivered to upstream so far (every connection)."""
        return sum(p.forwarded for p in self.pipes[0::2])

    def wait_forwarded_up(self, at_least: int, timeout: float = 5.0) -> int:
        """:attr:`forwarded_up` once it reaches *at_least*, or after *timeout*
        s.  A pipe counts its bytes just after sending them, so the answer to
        them can reach the other end first."""
        deadline = time.monotonic() + timeout
        while (n := self.forwarded_up) < at_least and time.monotonic() < deadline:
            time.sleep(0.005)
        return n

    def _connect_upstream(self) -> socket.socket:
        host, port = self.upstream
        up = self._new_socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            up.settimeout(10)
            up.connect((host, port))
            up.settimeout(None)
        except BaseException:
            up.close()
            raise
        return up

    def _accept(self) -> None:
        while not self._stop:
            try:
                down, _ = self.lsock.accept()
            except OSError:
                return
            try:
                up = self._connect_upstream()
            except OSError as err:
                # The downstream peer sees its connection closed, not a hang.
                self.errors.append(f"upstream {self.upstream[0]}:{self.upstream[1]}: {err}")
                with contextlib.suppress(OSError):
                    down.shutdown(socket.SHUT_RDWR)
                down.close()
                continue
            for s in (down, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.peers.append(up.getpeername()[:2])
            with self._lock:
                if self._stop:
                    down.close()
                    up.close()
                    return
                self.socks += [down, up]
                self.pipes += [_Pipe(down, up, self.delay_up, self.window),
                               _Pipe(up, down, self.delay_down, self.window)]

    def close(self) -> None:
        with self._lock:
            self._stop = True
        with contextlib.suppress(OSError):
            self.lsock.shutdown(socket.SHUT_RDWR)
        self.lsock.close()
        self._acceptor.join(10)
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for p in self.pipes:
            p.stop(10)
        for s in self.socks:
            s.close()

    def __enter__(self) -> DelayRelay:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
