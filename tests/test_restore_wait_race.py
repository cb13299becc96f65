"""The waiter of a restore with loader recovery must not report a destination
failure that is its loader's loss, which the recovery watcher acts on, just
because the loader had not been reaped yet when the failure arrived (CI
2026-12-01: `fastsnap restore` with its loader killed in the package failed
with "migration failed while waiting for the guest running" instead of
restarting).  Stubbed destination and watcher, a real loader process."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest

from pytest_fastsnap.restore.strategies import RestoredGuest, RestoreFailed

FAILED = {"event": "MIGRATION", "data": {"status": "failed"},
          "timestamp": {"seconds": 0, "microseconds": 0}}


class _Events:
    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    def events_since(self, mark: int) -> list[dict[str, Any]]:
        return list(self.events[mark:])


class _Vm:
    """A destination whose incoming migration has failed; still running."""

    def __init__(self) -> None:
        self.qmp_connection = _Events([FAILED])
        self.name = "stub-dst"
        self.exitcode = None

    def is_running(self) -> bool:
        return True

    def qmp(self, *_a: Any, **_k: Any) -> dict[str, Any]:
        return {"status": "failed"}

    def log_tail(self, _n: int) -> str:
        return "load of migration failed: Resource temporarily unavailable"


class _Watcher:
    """Acts on the loader's loss as BridgeRecovery does: once the loader has
    exited non-zero, handle() 'restarts' (here: the guest's RESUME appears)."""

    def __init__(self, guest: RestoredGuest) -> None:
        self.guest = guest
        self.active = True
        self.restarted = False

    def handle(self) -> bool:
        loader = self.guest.loader
        assert loader is not None
        if loader.poll() not in (None, 0):
            self.restarted = True
            self.guest.vm.qmp_connection.events.append(
                {"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 0}})
            return True
        return False


def _guest(loader_cmd: str) -> RestoredGuest:
    loader = subprocess.Popen(["sh", "-c", loader_cmd])
    g = RestoredGuest("loader-bridge", _Vm(), t0_wall=0.0, event_mark=0,   # type: ignore[arg-type]
                      paused=False, launch_seconds=0.0, loader=loader)
    return g


def test_a_loss_reported_before_the_loader_is_reaped_goes_to_the_watcher() -> None:
    # the destination's failure is there at once; the loader exits 0.3 s later
    g = _guest("sleep 0.3; exit 9")
    watcher = _Watcher(g)
    g.recovery = watcher    # type: ignore[assignment]
    try:
        assert g.wait_running(timeout=10) == 1.0
        assert watcher.restarted
    finally:
        g.loader.kill()     # type: ignore[union-attr]
        g.loader.wait()     # type: ignore[union-attr]


def test_a_failure_with_the_loader_alive_is_reported_after_the_grace() -> None:
    g = _guest("sleep 30")
    watcher = _Watcher(g)
    g.recovery = watcher    # type: ignore[assignment]
    t0 = time.monotonic()
    try:
        with pytest.raises(RestoreFailed, match="migration failed while waiting for the "
                                                "guest running"):
            g.wait_running(timeout=10)
        assert 1.5 < time.monotonic() - t0 < 8, "reported without the grace, or never"
        assert not watcher.restarted
    finally:
        g.loader.kill()     # type: ignore[union-attr]
        g.loader.wait()     # type: ignore[union-attr]


def test_without_a_watcher_the_failure_is_reported_at_once() -> None:
    g = _guest("sleep 30")
    t0 = time.monotonic()
    try:
        with pytest.raises(RestoreFailed, match="migration failed while waiting"):
            g.wait_running(timeout=10)
        assert time.monotonic() - t0 < 1.5
    finally:
        g.loader.kill()     # type: ignore[union-attr]
        g.loader.wait()     # type: ignore[union-attr]
