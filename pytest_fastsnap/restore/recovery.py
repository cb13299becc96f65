"""Recovery of a ``loader-bridge`` restore whose loader died or lost its connection.

A watcher thread follows the loader of a restored guest.  When the loader
exits with an error (killed, crashed, connection dropped), what the
destination did next decides:

* ``postcopy-paused`` (the destination had processed RUN: QEMU pauses a
  postcopy it cannot finish instead of failing it): **resume**.  QMP
  ``migrate-recover`` with a new unix socket, then ``fastsnap-loader serve
  --resume`` on it, which learns the pages the destination has from
  RECV_BITMAP, resumes (POSTCOPY_RESUME / RESUME_ACK), serves the requests
  the destination re-sends first and streams the rest, each page once.
  With ``preempt`` the resumed loader has ``--preempt`` too: it reopens the
  postcopy-preempt channel before POSTCOPY_RESUME (the destination waits
  for it) and answers the re-sent requests there.  A resumed loader lost
  before it connects leaves the destination ``postcopy-paused`` (QEMU's
  destination never reports ``postcopy-recover-setup``, a source state), so
  the next attempt's ``migrate-recover`` replaces the unused listener.
  A destination still ``postcopy-active`` PAUSE_AFTER s after its loader is
  gone kept a connection that never ended on its side (a network partition,
  a relay holding it): QMP ``migrate-pause`` shuts it, the destination
  pauses, and it is resumed like the rest (the attempt's cause says so).
* gone or failed before the guest ever ran, after the loader itself was
  lost (killed, crashed, an error of its own; the loader died before RUN:
  QEMU 10.0 fails such an incoming migration and exits): **restart**.  If
  instead the loader exited because the destination closed or refused the
  stream, that failure is reported as without recovery.  No
  guest instruction ran, so a new destination restores from scratch; this
  is done by the thread waiting on the guest (``wait_running`` /
  ``wait_loaded``), which owns the QEMU handle.

A loader that stopped on its input (exit 2, or ``E_FILE_SHORT``: the file
shrank under it) is not recovered: a new loader would fail the same way, so
the waiting call reports that loader's own error, as without recovery.
Every attempt of either kind counts against the guest's bound
(``recover_attempts``).  When they are used up, or the loader refuses its
input (exit 2: e.g. the snapshot was removed), the destination and loader
are killed, the socket directory removed, and the waiting call raises one
:class:`RecoveryFailed` naming each loss and attempt.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_fastsnap.qemu import process

if TYPE_CHECKING:
    from pytest_fastsnap.restore.strategies import RestoredGuest

DEFAULT_RECOVER_ATTEMPTS = 3
SETTLE_TIMEOUT = 15.0       # s for a destination to pause, fail or exit after a loss
# s a destination may stay postcopy-active after its loader is gone before it
# is told to pause (QMP migrate-pause): a connection that never ends on its
# side (a network partition, a relay that keeps it open) never pauses it.
PAUSE_AFTER = 1.0
POLL = 0.005
# Run-time loader errors about its input, not a lost loader or connection.
INPUT_ERRORS = ("E_FILE_SHORT",)
# Loader errors that say the destination went away or refused: a restart only
# follows a loader that was lost (killed, crashed, an error of its own).
DEST_ERRORS = ("E_DEST_GONE", "E_DEST_FAILED", "E_DEST_STALLED", "E_DEST_PROTOCOL",
               "E_TIMEOUT")


@dataclass
class RecoveryAttempt:
    """One recovery: what was lost, what was done, and when (wall clock)."""

    number: int
    kind: str                   # "resume" or "restart"
    cause: str                  # how the previous loader ended, and the destination's state
    t_lost: float               # time.time() when the loss was seen
    stats_file: Path | None = None
    error: str = ""

    def loader_stats(self) -> dict[str, Any]:
        """The resumed loader's --json stats ({} until it has finished)."""
        if self.stats_file is None:
            return {}
        with contextlib.suppress(OSError, ValueError):
            stats: dict[str, Any] = json.loads(self.stats_file.read_text())
            return stats
        return {}

    @property
    def resume_ack_at(self) -> float | None:
        """Wall time of the destination's RESUME_ACK (resume only, once finished)."""
        t = self.loader_stats().get("resume_ack_unix_s")
        return float(t) if t else None


class RecoveryFailed(Exception):
    """Raised (as a RestoreFailed subclass, see strategies.py) when a guest
    could not be recovered; ``attempts`` holds what was tried."""


class BridgeRecovery:
    """Watches one restored guest's loader and recovers it (module docstring)."""

    def __init__(self, guest: RestoredGuest, max_attempts: int,
                 spawn_resume: Callable[[str, str], Any],
                 relaunch: Callable[[], None],
                 error_type: type[Exception] = RecoveryFailed) -> None:
        self.guest = guest
        self.max_attempts = max_attempts
        self.attempts: list[RecoveryAttempt] = []
        self.error: Exception | None = None
        self.restart_cause: str | None = None
        self.finished = False
        self.not_a_loss: str | None = None
        self.paused_by_us = False       # the last loss needed a migrate-pause
        self._spawn_resume = spawn_resume   # (to, tag) -> spawns the --resume loader
        self._relaunch = relaunch           # new destination + loader from scratch
        self._error_type = error_type
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the watcher thread ------------------------------------------------------

    def watch(self) -> None:
        """Start following the guest's current loader."""
        self.finished = False
        self._stop.clear()
        # in the caller's context: a loader fixed by use_loader() stays the
        # one the resumed and relaunched loaders run
        ctx = contextvars.copy_context()
        self._thread = threading.Thread(target=ctx.run, args=(self._run,),
                                        name="fastsnap-recovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    @property
    def active(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            loader = self.guest.loader
            rc = loader.poll() if loader is not None else 0
            if rc is None:
                self._stop.wait(POLL)
                continue
            if rc == 0:
                self.finished = True
                return
            t_lost = time.time()
            cause = self._cause(rc)
            error_name = self._loader_error()
            if not self.attempts and (rc == 2 or error_name in INPUT_ERRORS):
                self.not_a_loss = cause     # the waiter reports the loader's own error
                return
            outcome = self._settle()
            if self._stop.is_set():
                return
            if self.paused_by_us:
                cause += f"; destination still postcopy-active {PAUSE_AFTER:.0f} s later: " \
                    "migrate-pause"
            if outcome == "completed":     # the loader died after its last page
                self.finished = True
                return
            if outcome != "postcopy-paused":
                if rc > 0 and error_name in DEST_ERRORS:
                    self.not_a_loss = f"{cause}; destination {outcome}"
                    return      # the destination refused the stream: not ours to redo
                self.restart_cause = f"{cause}; destination {outcome}"
                return
            if rc == 2 and self.attempts:
                self.give_up(f"{cause}: the loader refused its input, not retried")
                return
            if len(self.attempts) >= self.max_attempts:
                self.give_up(f"{cause}; all {self.max_attempts} recovery attempts used")
                return
            self._resume(cause, t_lost)

    def _loader_error(self) -> str | None:
        """The E_* name the current (exited) loader wrote to its stats file."""
        g = self.guest
        if g.out_dir is None:
            return None
        with contextlib.suppress(OSError, ValueError):
            name = json.loads((g.out_dir / g.stats_file).read_text()).get("error_name")
            return str(name) if name else None
        return None

    def _cause(self, rc: int) -> str:
        err = self.guest._loader_stderr().strip().splitlines()
        return f"loader exited with {rc}" + (f" ({err[-1]})" if err else "")

    def _settle(self) -> str:
        """What the destination does without its source: 'postcopy-paused',
        'completed', 'failed', 'exited', or 'still <status>'.  A destination
        still postcopy-active PAUSE_AFTER s after the loss has a connection
        that did not end on its side: QMP migrate-pause shuts it, once."""
        vm = self.guest.vm
        start = time.monotonic()
        deadline = start + SETTLE_TIMEOUT
        status = "?"
        self.paused_by_us = False
        while time.monotonic() < deadline and not self._stop.is_set():
            if not vm.is_running():
                return f"exited ({vm.exitcode})"
            try:
                status = vm.qmp("query-migrate", timeout=5).get("status", "none")
            except Exception:   # QMP gone: the process is exiting
                self._stop.wait(POLL)
                continue
            if status in ("postcopy-paused", "completed", "failed", "cancelled"):
                return status
            if status in ("none", "setup"):     # nobody connected: it will wait forever
                return f"still {status!r} (no source connected)"
            if status == "postcopy-active" and not self.paused_by_us \
                    and time.monotonic() - start > PAUSE_AFTER:
                self.paused_by_us = True
                with contextlib.suppress(Exception):    # judged by the state it leads to
                    vm.qmp("migrate-pause", timeout=5)
            self._stop.wait(POLL)
        return f"still {status!r} after {SETTLE_TIMEOUT:.0f}s"

    def _resume(self, cause: str, t_lost: float) -> None:
        n = len(self.attempts) + 1
        sock_dir = self.guest.sock_dir
        assert sock_dir is not None
        attempt = RecoveryAttempt(n, "resume", cause, t_lost,
                                  stats_file=sock_dir / f"loader-r{n}.json")
        self.attempts.append(attempt)
        sock = sock_dir / f"r{n}.sock"
        try:
            self.guest.vm.qmp("migrate-recover", uri=f"unix:{sock}", timeout=10)
        except Exception as err:    # counted; the next round retries if attempts remain
            attempt.error = f"migrate-recover: {err}"
            return
        self._spawn_resume(f"unix:{sock}", f"r{n}")

    # -- giving up and restarting (any thread) -------------------------------------

    def give_up(self, why: str) -> None:
        """Kill everything of the guest and keep one error naming what happened."""
        tried = "; ".join(f"#{a.number} {a.kind} after {a.cause}"
                          + (f" failed: {a.error}" if a.error else "") for a in self.attempts)
        g = self.guest
        if g.loader is not None:
            process.kill(g.loader)
        g.vm.kill()
        if g.sock_dir is not None:
            shutil.rmtree(g.sock_dir, ignore_errors=True)
        # Set last: the waiter raises it, and by then everything is gone.
        self.error = self._error_type(
            f"{self.guest.strategy}: guest not recovered: {why}"
            + (f"; attempts: {tried}" if tried else "")
            + "; destination and loader killed")

    def handle(self) -> bool:
        """For the thread waiting on the guest: raise if recovery gave up,
        restart from scratch if that is what is needed; True while a recovery
        is (or may be) underway, so the waiter keeps waiting."""
        # Read before the outcome: the watcher sets error or restart_cause,
        # then ends, so a watcher seen alive here has set neither yet or we
        # see it below; read last, a watcher that ended in between lost both.
        active = self.active
        if self.error is not None:
            raise self.error
        if self.restart_cause is not None:
            self._restart()
            return True
        loader = self.guest.loader
        lost = (loader is not None and loader.poll() not in (None, 0)) or \
            not self.guest.vm.is_running()
        return lost and active

    def owns_failure(self, grace: float) -> bool:
        """The destination failed or died: is that a loss this watcher acts
        on?  True if it already decided (handle() acts next), or if it still
        follows a loader that exits non-zero within *grace* s: the loader's
        exit can lag the destination's report (a killed loader closes its
        sockets before it is reaped, and ``Popen.poll()`` answers None while
        the watcher's own poll holds the reaping lock)."""
        active = self.active    # first, as in handle()
        if self.error is not None or self.restart_cause is not None:
            return True
        loader = self.guest.loader
        if not active or loader is None:
            return False
        try:
            return loader.wait(grace) != 0
        except subprocess.TimeoutExpired:
            return False

    def _restart(self) -> None:
        cause, self.restart_cause = self.restart_cause or "", None
        g = self.guest
        if g.time_to_running is not None or g._event("RESUME") is not None:
            self.give_up(f"{cause}, after the guest had run: its state is lost")
            raise self.error  # type: ignore[misc]
        if len(self.attempts) >= self.max_attempts:
            self.give_up(f"{cause}; all {self.max_attempts} recovery attempts used")
            raise self.error  # type: ignore[misc]
        self.attempts.append(RecoveryAttempt(len(self.attempts) + 1, "restart", cause,
                                             time.time()))
        if g.loader is not None:
            process.kill(g.loader)
        g.vm.kill()
        if g.sock_dir is not None:
            shutil.rmtree(g.sock_dir, ignore_errors=True)
            g.sock_dir = None
        self._relaunch()

    def wait_finished(self, timeout: float) -> None:
        """Until the last loader exited 0 (recovering on the way); raises the
        recovery error, or TimeoutError."""
        deadline = time.monotonic() + timeout
        while not self.finished:
            self.handle()
            if not self.active and not self.finished and self.restart_cause is None \
                    and self.error is None:
                return      # not watching (stopped): the caller checks the loader
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.01)
