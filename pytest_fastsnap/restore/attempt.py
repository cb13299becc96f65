"""Try a restore with any strategy and record how it ended, for suites that
feed hostile or unusual files through every strategy.

    with attempt_restore("loader-bridge", path, device_args, vm_factory) as a:
        a.completed            # every page in, guest paused (or local digests taken)
        a.signal               # "SIGFPE" if QEMU or the loader died by a signal
        a.hung                 # neither finished nor failed within the timeout
        a.loader_error         # "E_TRUNCATED" when the native loader refused the file
        a.failure              # the reader's own words when it did not complete
        a.memory_digests(ranges)   # of the restored memory (see below)

Nothing is raised for a failed restore; everything started is gone after the
``with`` block.  ``memory_digests`` reads the destination's memory; for
``loader-local`` (no QEMU) it first proves the loader restored exactly what
the pure-Python reader reads from the file, then digests the file's main RAM
block through that reader.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_fastsnap.restore.local import LocalRestore, file_memory_digests, restore_local
from pytest_fastsnap.restore.strategies import (
    RestoredGuest,
    RestoreFailed,
    RestoreRefused,
    RestoreTimeout,
    restore,
)
from pytest_fastsnap.restore.table import STRATEGY_TABLE
from pytest_fastsnap.snapshot.format import parse


def _signal_name(code: int | None) -> str | None:
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


@dataclass
class Attempt:
    strategy: str
    path: Path
    offset: int
    guest: RestoredGuest | None = None
    local: LocalRestore | None = None
    failure: str | None = None
    signal: str | None = None
    hung: bool = False
    loader_error: str | None = None

    @property
    def completed(self) -> bool:
        return self.failure is None

    def describe(self) -> str:
        how = "completed" if self.completed else f"failed: {self.failure}"
        return f"{self.strategy} {how}"

    def memory_digests(self, ranges: Sequence[tuple[int, int]]) -> dict[str, str]:
        """Digests of the restored memory over guest-physical *ranges* (as
        :meth:`QemuMachine.memory_digests`); only after a completed restore."""
        if not self.completed:
            raise RuntimeError(f"{self.describe()}: no restored memory to read")
        if self.guest is not None:
            return self.guest.vm.memory_digests(ranges)
        assert self.local is not None
        differs = self.local.differs_from_file()
        if differs:
            raise AssertionError(f"loader-local restored blocks {differs} unlike the file")
        main = parse(self.path, offset=self.offset).blocks[0].name
        return file_memory_digests(self.path, main, ranges, self.offset)

    def close(self) -> None:
        if self.guest is not None:
            self.guest.close(kill=True)

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attempt_restore(strategy: str, path: str | Path, device_args: Sequence[str],
                    vm_factory: Any, *, offset: int = 0, timeout: float = 30.0,
                    loader_args: Sequence[str] = ()) -> Attempt:
    """Restore *path* with *strategy* (destinations paused, ``-S``) and wait until
    every page is in or the restore failed; see the module docstring."""
    if strategy not in STRATEGY_TABLE:
        raise ValueError(f"unknown strategy {strategy!r}; one of {sorted(STRATEGY_TABLE)}")
    attempt = Attempt(strategy, Path(path), offset)
    if not STRATEGY_TABLE[strategy].destination:
        _local(attempt, timeout)
        return attempt
    try:
        guest = restore(strategy, path, device_args, vm_factory, offset=offset, paused=True,
                        wait=False, loader_args=loader_args)
    except RestoreRefused as err:  # the loader refused the file before any QEMU ran
        attempt.failure, attempt.loader_error = str(err), err.error_name
        return attempt
    except RestoreFailed as err:  # refused before anything ran (e.g. migrate-incoming)
        attempt.failure = str(err)
        return attempt
    attempt.guest = guest
    try:
        guest.wait_running(timeout)
        guest.wait_loaded(timeout)
    except RestoreTimeout as err:
        attempt.failure, attempt.hung = str(err), True
    except RestoreFailed as err:
        attempt.failure = str(err)
    _inspect(attempt, guest)
    return attempt


def _local(attempt: Attempt, timeout: float) -> None:
    try:
        local = restore_local(attempt.path, attempt.offset, timeout=timeout)
    except subprocess.TimeoutExpired:
        attempt.failure, attempt.hung = f"loader-local still running after {timeout:.0f}s", True
        return
    attempt.local = local
    attempt.signal = _signal_name(local.returncode)
    attempt.loader_error = local.error_name
    if local.returncode != 0:
        attempt.failure = local.describe()


def _inspect(attempt: Attempt, guest: RestoredGuest) -> None:
    """Who died how: the destination's exit signal, the loader's refusal."""
    vm = guest.vm
    if not vm.is_running():
        attempt.signal = _signal_name(vm.wait_exit(2))
    if guest.loader is None:
        return
    rc = guest.loader.poll()
    if rc is not None and rc < 0 and attempt.signal is None:
        attempt.signal = _signal_name(rc)
    if rc == 2 and guest.out_dir is not None:
        with contextlib.suppress(OSError, ValueError):
            out = json.loads((guest.out_dir / "loader.out").read_text())
            attempt.loader_error = out.get("error_name")
