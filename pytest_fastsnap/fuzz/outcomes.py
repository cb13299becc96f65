"""Load one file into a fresh ``-incoming defer`` QEMU and classify what happened.

=============== ==============================================================
refused         the load failed and QEMU exited or reported ``failed`` cleanly
same_memory     the load completed; guest memory equals the unmutated load's
wrong_memory    the load completed with other memory, though every edit was
                one that cannot legitimately change memory (headers, framing)
changed_memory  completed with other memory after an edit that may change it
                (bitmap bytes, device state): not a finding
signal          QEMU was killed by a signal (SIGSEGV, SIGFPE, SIGABRT, ...)
hang            neither completed nor failed within the time limit
internal_error  QEMU printed an assertion / internal error text
=============== ==============================================================
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.migration import MigrationFailed, load_snapshot

__all__ = ["FINDING_CLASSES", "OUTCOMES", "LoadResult", "load_once", "mask_numbers"]

OUTCOMES = ("refused", "same_memory", "wrong_memory", "changed_memory", "signal", "hang",
            "internal_error")
FINDING_CLASSES = frozenset({"wrong_memory", "signal", "hang", "internal_error"})
INTERNAL_ERROR = re.compile(r"internal error|assertion|\*\*ERROR\*\*|code should not be reached|"
                            r"GLib-ERROR|Bail out|failed to allocate|Cannot allocate|"
                            r"out of memory|double free|corrupted", re.IGNORECASE)


@dataclass(frozen=True)
class LoadResult:
    outcome: str
    signal: str | None
    exit_code: int | None
    reason: str
    log: str
    seconds: float

    @property
    def finding(self) -> bool:
        return self.outcome in FINDING_CLASSES


def mask_numbers(text: str) -> str:
    return re.sub(r"0x[0-9a-fA-F]+|\d+", "N", text)


def stderr_lines(log: str) -> list[str]:
    """QEMU's own output lines (the log starts with ``# command line``)."""
    return [ln for ln in log.splitlines() if ln.strip() and not ln.startswith("# ")]


def internal_error_line(log: str) -> str | None:
    for line in stderr_lines(log):
        if INTERNAL_ERROR.search(line):
            return line
    return None


def _classify_exit(vm: QemuMachine, reason: str, started: float) -> LoadResult:
    code = vm.exitcode if not vm.is_running() else None
    if code is None and not vm.is_running():
        code = vm.wait_exit(2)
    log = vm.log_tail(400)
    took = time.monotonic() - started
    if code is not None and code < 0 and -code != signal.SIGKILL:
        return LoadResult("signal", signal.Signals(-code).name, code, reason, log, took)
    if code is not None and code < 0:  # SIGKILL: not ours (we only kill after this)
        return LoadResult("signal", "SIGKILL", code, reason, log, took)
    if internal_error_line(log):
        return LoadResult("internal_error", None, code, reason, log, took)
    return LoadResult("refused", None, code, reason, log, took)


def load_once(binary: str, device_args: Sequence[str], path: Path, workdir: Path, *,
              name: str = "fuzz", offset: int = 0, timeout: float = 15.0,
              digests: Mapping[str, str] | None = None,
              ranges: Sequence[tuple[int, int]] = (), memory_safe: bool = True) -> LoadResult:
    """Load *path* into a fresh paused destination and classify the outcome.

    *digests* (``QemuMachine.memory_digests(ranges)`` of the unmutated load)
    decide same/wrong memory; the QEMU process is gone when this returns.
    Raises QemuError when QEMU does not come up (before it saw the input).
    """
    vm = QemuMachine(binary, workdir, name=name, incoming="defer", paused=True,
                     device_args=device_args, qmp_timeout=max(timeout, 10.0))
    vm.log_path.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        vm.launch()  # QemuError: the binary or the guest definition is unusable, not the input
        try:
            load_snapshot(vm, path, offset=offset, timeout=timeout)
        except MigrationFailed as err:
            if "still" in err.reason and "after" in err.reason and vm.is_running():
                return LoadResult("hang", None, None, err.reason, vm.log_tail(400),
                                  time.monotonic() - started)
            return _classify_exit(vm, err.reason, started)
        took = time.monotonic() - started
        if digests is None:
            return LoadResult("same_memory", None, None, "completed", vm.log_tail(400), took)
        try:
            same = vm.memory_digests(ranges) == dict(digests)
        except Exception as err:
            return _classify_exit(vm, f"died while memory was read: {err!r}", started)
        bad = "wrong_memory" if memory_safe else "changed_memory"
        outcome = "same_memory" if same else bad
        return LoadResult(outcome, None, None, "completed", vm.log_tail(400), took)
    finally:
        vm.kill()
