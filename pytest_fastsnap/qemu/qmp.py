"""Synchronous QMP facade over qemu.qmp, driven by one background event loop.

qemu.qmp is asyncio-only.  Tests are synchronous, so every client of a process
lives on one private loop in a daemon thread, and calls cross over with
``run_coroutine_threadsafe``.  A persistent listener per connection keeps every
event, so nothing emitted between two calls is lost.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

T = TypeVar("T")

_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _event_loop() -> asyncio.AbstractEventLoop:
    """Return the process-wide QMP loop, starting its thread on first use."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            loop.set_exception_handler(_quiet_disconnects)
            thread = threading.Thread(
                target=loop.run_forever, name="fastsnap-qmp-loop", daemon=True
            )
            thread.start()
            _loop = loop
        return _loop


_BENIGN = (EOFError, ConnectionResetError, BrokenPipeError)


def _quiet_disconnects(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """QEMU closing the monitor after `quit` (or dying on purpose in a test) makes
    qemu.qmp's background tasks end in EOF/reset errors nobody awaits: not news."""
    if isinstance(context.get("exception"), _BENIGN):
        return
    loop.default_exception_handler(context)


def _stop_loop() -> None:
    if _loop is not None and _loop.is_running():
        async def _cancel_all() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_all(), _loop).result(5)
        _loop.call_soon_threadsafe(_loop.stop)


atexit.register(_stop_loop)


def run_sync(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Run *coro* on the QMP loop and wait at most *timeout* seconds for it."""
    future = asyncio.run_coroutine_threadsafe(coro, _event_loop())
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise


class QMPCommandError(Exception):
    """QEMU answered a command with an error; ``desc`` is QEMU's own text."""

    def __init__(self, command: str, args: Mapping[str, Any] | None, desc: str, klass: str):
        self.command = command
        self.args = dict(args or {})
        self.desc = desc
        self.error_class = klass
        super().__init__(f"{command} failed: {desc} ({klass})")


class QMPConnectionError(Exception):
    """The QMP connection is gone (QEMU exited or closed the monitor)."""


def _match(event: Mapping[str, Any], match: Mapping[str, Any]) -> bool:
    """Recursive sub-dict match, in the spirit of QEMUMachine.event_match."""
    for key, want in match.items():
        if key not in event:
            return False
        got = event[key]
        if isinstance(want, Mapping):
            if not isinstance(got, Mapping) or not _match(got, want):
                return False
        elif got != want:
            return False
    return True


class Transcript(list[str]):
    """QMP traffic, one line per command, reply and event: kept in memory (for
    failure reports) and, given a *path*, appended to that file as it happens
    (so it is among the kept artifacts of a failed test, even of a crash)."""

    def __init__(self, path: Path | None = None) -> None:
        super().__init__()
        self.path = path

    def append(self, line: str) -> None:
        super().append(line)
        if self.path is not None:
            with contextlib.suppress(OSError), open(self.path, "a") as out:
                out.write(line + "\n")


class QMPConnection:
    """One QMP session with a QEMU process, used synchronously.

    Every command and reply is kept in ``transcript`` (for failure reports),
    and written to *transcript_path* when given.
    """

    def __init__(self, name: str, sock: socket.socket, timeout: float = 30.0,
                 transcript_path: Path | None = None) -> None:
        self.name = name
        self.timeout = timeout
        self.transcript = Transcript(transcript_path)
        self._events: list[dict[str, Any]] = []
        self._client = QMPClient(name)
        self._listener = EventListener()
        self._client.register_listener(self._listener)
        self._pump: asyncio.Task[None] | None = None
        self._cond = threading.Condition()
        run_sync(self._connect(sock), timeout)

    async def _connect(self, sock: socket.socket) -> None:
        await self._client.connect(sock)
        self._pump = asyncio.get_running_loop().create_task(self._pump_events())

    async def _pump_events(self) -> None:
        async for event in self._listener:
            with self._cond:
                self._events.append(dict(event))
                self.transcript.append(f"{_stamp()} <- event {dict(event)}")
                self._cond.notify_all()

    @property
    def connected(self) -> bool:
        return self._client.runstate.name == "RUNNING"

    def cmd(self, command: str, args: Mapping[str, Any] | None = None,
            timeout: float | None = None) -> Any:
        """Execute *command*; return its ``return`` value or raise QMPCommandError."""
        self.transcript.append(f"{_stamp()} -> {command} {dict(args or {})}")
        try:
            result = run_sync(self._client.execute(command, args), timeout or self.timeout)
        except ExecuteError as err:
            self.transcript.append(f"{_stamp()} <- error {err.error_class}: {err.error.error.desc}")
            raise QMPCommandError(command, args, err.error.error.desc, err.error_class) from None
        except (QMPError, EOFError, ConnectionError) as err:
            self.transcript.append(f"{_stamp()} <- connection lost: {err!r}")
            raise QMPConnectionError(f"{self.name}: QMP connection lost during "
                                     f"{command}: {err!r}") from err
        self.transcript.append(f"{_stamp()} <- {result!r}"[:2000])
        return result

    def events_since(self, mark: int = 0) -> list[dict[str, Any]]:
        """Events received since index *mark* (``len(events_since())`` is a mark)."""
        with self._cond:
            return list(self._events[mark:])

    def event_mark(self) -> int:
        with self._cond:
            return len(self._events)

    def wait_event(self, name: str, match: Mapping[str, Any] | None = None,
                   timeout: float = 30.0, since: int = 0,
                   alive: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Wait for an event named *name* whose data matches *match*.

        Events already received since *since* count.  *alive* is polled so a
        dead QEMU ends the wait at once instead of at the timeout.
        """
        deadline = time.monotonic() + timeout
        seen = since
        with self._cond:
            while True:
                for event in self._events[seen:]:
                    if event.get("event") == name and _match(event.get("data", {}), match or {}):
                        return event
                seen = len(self._events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no {name} event {match or ''} "
                                       f"within {timeout:.1f}s")
                if alive is not None and not alive():
                    raise QMPConnectionError(f"{self.name}: QEMU exited while waiting "
                                             f"for {name}")
                self._cond.wait(min(left, 0.2))

    def quit(self, timeout: float) -> None:
        """Send `quit` and disconnect in one step, so the EOF that follows is
        consumed by our own disconnect rather than reported as unretrieved."""
        async def _quit() -> None:
            with contextlib.suppress(QMPError, EOFError, ConnectionError, OSError):
                await self._client.execute("quit")
            if self._pump is not None:
                self._pump.cancel()
            with contextlib.suppress(QMPError, EOFError, ConnectionError, OSError):
                await self._client.disconnect()

        self.transcript.append(f"{_stamp()} -> quit")
        with contextlib.suppress(TimeoutError, RuntimeError):
            run_sync(_quit(), timeout)

    def close(self) -> None:
        """Disconnect cleanly; a connection QEMU already dropped is fine."""
        async def _close() -> None:
            if self._pump is not None:
                self._pump.cancel()
            with contextlib.suppress(QMPError, EOFError, ConnectionError, OSError):
                await self._client.disconnect()

        with contextlib.suppress(TimeoutError, RuntimeError):
            run_sync(_close(), 10)


def _stamp() -> str:
    return time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"


# qemu.qmp logs an "exception was never retrieved" EOFError when QEMU closes the
# monitor after `quit`; the facade handles that disconnect, so keep it quiet.
logging.getLogger("qemu.qmp.protocol").setLevel(logging.CRITICAL)
