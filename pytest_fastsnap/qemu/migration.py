"""Save and load mapped-ram snapshots through QMP (`migrate file:` / `migrate-incoming`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_fastsnap.qemu.machine import QemuMachine, _signal_name
from pytest_fastsnap.qemu.qmp import QMPCommandError, QMPConnectionError


class MigrationFailed(Exception):
    """A save or load did not complete; ``reason`` is QEMU's own error text."""

    def __init__(self, what: str, reason: str, vm: QemuMachine) -> None:
        self.what = what
        self.reason = reason
        self.exitcode = vm.exitcode
        super().__init__(f"{what} failed on {vm.name}: {reason}")


@dataclass(frozen=True)
class SavedSnapshot:
    """A snapshot file and how it was made (what a loader must repeat)."""

    path: Path
    offset: int
    capabilities: Mapping[str, bool]
    parameters: Mapping[str, Any]
    device_args: tuple[str, ...]
    binary: str
    live: bool
    save_seconds: float
    stats: Mapping[str, Any] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return file_uri(self.path, self.offset)


def file_uri(path: Path | str, offset: int = 0) -> str:
    return f"file:{path}" + (f",offset={offset:#x}" if offset else "")


def set_capabilities(vm: QemuMachine, capabilities: Mapping[str, bool]) -> None:
    """Set all *capabilities* in one `migrate-set-capabilities` call."""
    if capabilities:
        vm.qmp("migrate-set-capabilities", capabilities=[
            {"capability": name, "state": state} for name, state in capabilities.items()])


def set_parameters(vm: QemuMachine, parameters: Mapping[str, Any]) -> None:
    if parameters:
        vm.qmp("migrate-set-parameters", **dict(parameters))


def wait_migration(vm: QemuMachine, what: str, timeout: float,
                   done: frozenset[str] = frozenset({"completed"})) -> dict[str, Any]:
    """Poll `query-migrate` until a state in *done*, `failed` or QEMU's death."""
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while True:
        if not vm.is_running():
            raise MigrationFailed(what, f"QEMU exited ({_signal_name(vm.exitcode)}); "
                                  f"log:\n{vm.log_tail(20)}", vm)
        try:
            info = vm.qmp("query-migrate")
        except QMPConnectionError:
            vm.wait_exit(2)
            raise MigrationFailed(what, f"QMP connection lost ({_signal_name(vm.exitcode)}); "
                                  f"log:\n{vm.log_tail(20)}", vm) from None
        status = info.get("status", "none")
        if status in done:
            return info
        if status in ("failed", "cancelled"):
            reason = info.get("error-desc") or _last_error_line(vm) or status
            raise MigrationFailed(what, reason, vm)
        if time.monotonic() > deadline:
            raise MigrationFailed(what, f"still {status!r} after {timeout:.0f}s", vm)
        time.sleep(0.02)


def _last_error_line(vm: QemuMachine) -> str:
    lines = [ln for ln in vm.log_tail(30).splitlines() if "qemu-system" in ln or "error" in ln]
    return lines[-1] if lines else ""


def save_snapshot(vm: QemuMachine, path: Path, *, offset: int = 0,
                  capabilities: Mapping[str, bool] | None = None,
                  parameters: Mapping[str, Any] | None = None, live: bool = False,
                  timeout: float = 120.0) -> SavedSnapshot:
    """Save *vm* to *path* with mapped-ram (plus *capabilities*).

    Stopped by default (each page written once); ``live=True`` migrates a
    running guest, so dirty pages are rewritten at their fixed offsets.
    """
    caps = {"mapped-ram": True, **(capabilities or {})}
    params = dict(parameters or {})
    set_capabilities(vm, caps)
    set_parameters(vm, params)
    if not live:
        vm.qmp("stop")
    start = time.monotonic()
    try:
        vm.qmp("migrate", uri=file_uri(path, offset))
    except QMPCommandError as err:
        raise MigrationFailed("save", err.desc, vm) from None
    info = wait_migration(vm, "save", timeout)
    return SavedSnapshot(path=Path(path), offset=offset, capabilities=caps, parameters=params,
                         device_args=tuple(vm.device_args), binary=vm.binary, live=live,
                         save_seconds=time.monotonic() - start, stats=info.get("ram", {}))


def load_snapshot(vm: QemuMachine, path: Path, *, offset: int = 0,
                  capabilities: Mapping[str, bool] | None = None,
                  parameters: Mapping[str, Any] | None = None,
                  timeout: float = 120.0) -> float:
    """Load *path* into *vm* (launched with ``incoming="defer"``); return seconds taken.

    Raises MigrationFailed carrying QEMU's own error text, or the signal that
    killed QEMU, so a test can tell a clean refusal from a crash.
    """
    caps = {"mapped-ram": True, **(capabilities or {})}
    start = _start_incoming(vm, "load", path, offset, caps, parameters or {})
    wait_migration(vm, "load", timeout)
    return time.monotonic() - start


def _start_incoming(vm: QemuMachine, what: str, path: Path, offset: int,
                    caps: Mapping[str, bool], params: Mapping[str, Any]) -> float:
    """Set up *vm* and issue `migrate-incoming file:`; return the start time.
    A refusal raises MigrationFailed with QEMU's text."""
    try:
        set_capabilities(vm, caps)
        set_parameters(vm, params)
    except QMPCommandError as err:
        raise MigrationFailed(f"{what} set-up", err.desc, vm) from None
    start = time.monotonic()
    try:
        vm.qmp("migrate-incoming", uri=file_uri(path, offset))
    except QMPCommandError as err:
        raise MigrationFailed(what, err.desc, vm) from None
    return start


def fast_load_snapshot(vm: QemuMachine, path: Path, *, offset: int = 0,
                       timeout: float = 120.0) -> float:
    """Upstream fast snapshot load: mapped-ram + postcopy-ram on an incoming
    `file:` migration.  Returns the seconds until the guest could run (the
    migration left the setup phase: postcopy-active or completed); the eager
    load may still be going on.  :func:`wait_migration` waits for the rest.

    On a binary without the feature this raises MigrationFailed with QEMU's
    "Mapped-ram migration is incompatible with postcopy".
    """
    start = _start_incoming(vm, "fast load", path, offset,
                            {"mapped-ram": True, "postcopy-ram": True}, {})
    wait_migration(vm, "fast load", timeout,
                   done=frozenset({"postcopy-active", "postcopy-paused", "completed"}))
    return time.monotonic() - start
