"""Serial console capture: QEMU's COM1 over a socketpair, read by a thread."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from pathlib import Path


class Console:
    """Everything the guest printed on its serial port, plus a way to type.

    The reader thread appends to a buffer and a log file; ``read_until``
    searches the whole buffer from a cursor, so output that arrived before the
    call is never missed.
    """

    def __init__(self, sock: socket.socket, log_path: Path) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._closed = False
        self._cursor = 0
        self.log_path = log_path
        self._log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self._thread = threading.Thread(target=self._reader, name="fastsnap-console",
                                        daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._closed = True
                    self._cond.notify_all()
                    return
                self._buf += data
                self._log.write(data)
                self._cond.notify_all()

    @property
    def text(self) -> str:
        """All console output so far, decoded leniently."""
        with self._cond:
            return self._buf.decode("utf-8", "replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text.splitlines()[-lines:])

    def mark(self) -> int:
        """A cursor at the current end of output; pass it as ``since``."""
        with self._cond:
            return len(self._buf)

    def read_until(self, pattern: str | bytes, timeout: float = 30.0,
                   since: int | None = None) -> str:
        """Wait until *pattern* (a regex) appears after *since* (default: after
        the previous match).  Return the text up to the end of the match."""
        regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            start = self._cursor if since is None else since
            while True:
                found = regex.search(self._buf, start)
                if found:
                    self._cursor = found.end()
                    return self._buf[start:found.end()].decode("utf-8", "replace")
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    why = "console closed" if self._closed else f"{timeout:.1f}s passed"
                    raise TimeoutError(f"{pattern!r} not seen on the console ({why}); "
                                       f"last output:\n{self.tail()}")
                self._cond.wait(min(left, 0.5))

    def write(self, data: bytes) -> None:
        self._sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)
        self._log.close()
