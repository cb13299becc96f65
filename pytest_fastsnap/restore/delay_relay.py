"""A TCP relay that adds a fixed delay to every byte, each way: a stand-in
for ``tc netem delay`` on kernels without sch_netem (this machine's), used by
the transport benchmark only.

    with DelayRelay(("127.0.0.1", qemu_port), rtt_ms=10) as relay:
        loader --to tcp:127.0.0.1:{relay.port}

Each accepted connection gets its own upstream connection, in accept order
(so the bridge's main and preempt channels keep their order).  Bytes are
held rtt/2 in each direction; at most ``window`` bytes wait per direction,
so the sender still feels back-pressure like a socket buffer on a real link.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time
from types import TracebackType


class _Pipe:
    """One direction: reader thread -> delayed queue -> writer thread."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, window: int) -> None:
        self.src, self.dst, self.delay, self.window = src, dst, delay, window
        self.q: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.eof = False
        self.cv = threading.Condition()
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._write, daemon=True)]
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.src.recv(256 << 10):
                with self.cv:
                    while self.queued >= self.window:
                        self.cv.wait()
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
                    while not self.q and not self.eof:
                        self.cv.wait()
                    if not self.q:
                        break
                    due, data = self.q[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.dst.sendall(data)
                with self.cv:
                    self.q.popleft()
                    self.queued -= len(data)
                    self.cv.notify_all()
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)


class DelayRelay:
    def __init__(self, upstream: tuple[str, int], rtt_ms: float, *, host: str = "127.0.0.1",
                 window: int = 4 << 20) -> None:
        self.upstream, self.delay, self.window = upstream, rtt_ms / 2000, window
        self.lsock = socket.create_server((host, 0))
        self.port = int(self.lsock.getsockname()[1])
        self.socks: list[socket.socket] = []
        self._stop = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                down, _ = self.lsock.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            for s in (down, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks += [down, up]
            _Pipe(down, up, self.delay, self.window)
            _Pipe(up, down, self.delay, self.window)

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.lsock.shutdown(socket.SHUT_RDWR)
        self.lsock.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def __enter__(self) -> DelayRelay:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
