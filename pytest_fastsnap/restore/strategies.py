"""Restore strategies: bring a mapped-ram snapshot back as a running guest.

    guest = restore("loader-bridge", snap_path, device_args, vm_factory, offset=0)
    guest.time_to_running          # s from migrate-incoming to the guest running
    guest.wait_loaded()            # s until every page is in; collects loader stats
    guest.close()                  # loader and QEMU gone, socket dir removed

Strategies:

- ``qemu-precopy``: stock full load (``-incoming defer`` + mapped-ram +
  ``migrate-incoming file:``), then ``cont``.
- ``qemu-fast``: QEMU's own fast snapshot load (mapped-ram + postcopy-ram on
  the destination); only where the binary accepts the pair, otherwise
  :class:`RestoreUnsupported` with QEMU's own reason.
- ``loader-bridge``: the native loader is the *source* of a postcopy
  migration into a stock destination (``postcopy-ram``, ``migrate-incoming
  unix:``, ``tcp:`` or an inherited fd; ``preempt`` adds the
  postcopy-preempt channel); the guest runs as soon as the device state is in
  and RAM follows on demand and eagerly.  If the loader dies or loses its
  connection, the restore recovers by itself up to ``recover_attempts`` times
  (:mod:`pytest_fastsnap.restore.recovery`: QEMU's postcopy recovery, or a
  fresh start when the guest had not run yet); ``guest.recovery.attempts``
  says what happened; with ``preempt`` the resumed loader reopens the
  preempt channel too.

Postcopy strategies (``qemu-fast``, ``loader-bridge``) turn on QEMU's
``postcopy-blocktime`` capability on the destination:
:meth:`RestoredGuest.blocktime` reads how long vCPUs were blocked on missing
pages (QEMU 10.0: ``postcopy-blocktime``, the time *all* vCPUs were blocked at
once, and ``postcopy-vcpu-blocktime``, per vCPU; both in ms).

Times are taken from QMP event timestamps (``events`` capability), so they
do not include our polling.  ``time_to_running`` for a destination restored
``paused`` is the time until it could be continued.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Protocol

from pytest_fastsnap.qemu import process
from pytest_fastsnap.qemu.machine import QemuMachine, QMPCommandError
from pytest_fastsnap.qemu.migration import file_uri, set_capabilities
from pytest_fastsnap.restore.manifest import manifest_path, read_manifest
from pytest_fastsnap.restore.pinning import CpuSplit, ThreadPinner, parse_pin
from pytest_fastsnap.restore.recovery import (
    DEFAULT_RECOVER_ATTEMPTS,
    BridgeRecovery,
    RecoveryFailed,
)
from pytest_fastsnap.restore.transport import Transport, listening_port, parse_transport
from pytest_fastsnap.verdict import Verdict
from pytest_fastsnap.workdirs import SUN_PATH_MAX

if TYPE_CHECKING:
    from pytest_fastsnap.guests.linux import LinuxGuest
    from pytest_fastsnap.guests.tiny import TinyGuest

STRATEGIES = ("qemu-precopy", "qemu-fast", "loader-bridge")
# A migration stream starts with QEMU_VM_FILE_MAGIC "QEVM" and version 3.
STREAM_START = b"QEVM\x00\x00\x00\x03"
STREAM_SCAN = 64 << 20      # how far a failed restore looks for a stream start


class RestoreFailed(Exception):
    """A restore did not produce a running, fully loaded guest."""


class RestoreTimeout(RestoreFailed):
    """The restore neither finished nor failed in time: a hang."""


class RestoreRefused(RestoreFailed):
    """The native loader refused the file (``error_name``: its ``E_`` rule)
    before any QEMU was started."""

    def __init__(self, strategy: str, error_name: str, message: str) -> None:
        self.strategy = strategy
        self.error_name = error_name
        super().__init__(f"{strategy}: {error_name}: {message}")


class RestoreNotRecovered(RestoreFailed, RecoveryFailed):
    """The bridge's loader was lost and the guest could not be recovered
    (attempts used up, or the loader refused its input); everything of the
    guest was killed."""


class RestoreUnsupported(RestoreFailed):
    """This QEMU (or host) cannot do the strategy; ``reason`` is QEMU's text."""

    def __init__(self, strategy: str, reason: str) -> None:
        self.strategy = strategy
        self.reason = reason
        super().__init__(f"{strategy} not supported here: {reason}")


class DestinationFactory(Protocol):
    """Launch a QEMU with *device_args* plus ``-incoming defer`` (and ``-S``
    when *paused*); return it running its QMP loop."""

    def __call__(self, device_args: Sequence[str], *, paused: bool) -> QemuMachine: ...


def machine_factory(binary: str | Path, workdir: Path, *, name: str = "dst",
                    qmp_timeout: float = 60.0) -> DestinationFactory:
    """A :class:`DestinationFactory` outside pytest (CLI, benchmarks)."""
    def make(device_args: Sequence[str], *, paused: bool) -> QemuMachine:
        vm = QemuMachine(binary, workdir, name=name, incoming="defer", paused=paused,
                         qmp_timeout=qmp_timeout, device_args=device_args)
        return vm.launch()
    return make


def _as_factory(vm_factory: Any) -> DestinationFactory:
    """Accept the ``vm_factory`` fixture (has ``destination``) or a plain callable."""
    if hasattr(vm_factory, "destination"):
        def make(device_args: Sequence[str], *, paused: bool) -> QemuMachine:
            vm: QemuMachine = vm_factory.destination(
                SimpleNamespace(device_args=tuple(device_args)), paused=paused)
            return vm
        return make
    factory: DestinationFactory = vm_factory
    return factory


# the loader every restore in this context uses (use_loader), else None
_LOADER: contextvars.ContextVar[Path | None] = contextvars.ContextVar("fastsnap_loader",
                                                                     default=None)


def loader_binary() -> Path:
    """The native loader: the one :func:`use_loader` fixed, else
    ``$FASTSNAP_LOADER`` if set, else the cached build of the current
    sources (rebuilt when they change)."""
    fixed = _LOADER.get()
    if fixed is not None:
        return fixed
    from pytest_fastsnap.native.loader import loader_path

    return loader_path()


@contextlib.contextmanager
def use_loader(path: Path) -> Iterator[Path]:
    """Every restore in this block (this thread) runs *path*: a benchmark
    resolves the loader once, so an edit of its sources during a long run
    neither rebuilds it midway nor mixes two binaries in one report."""
    token = _LOADER.set(path)
    try:
        yield path
    finally:
        _LOADER.reset(token)


def _event_time(event: dict[str, Any]) -> float:
    ts = event.get("timestamp", {})
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


# s a waiter gives a loader to be reaped after the destination reported a
# failure, before it reports that failure itself (BridgeRecovery.owns_failure)
LOSS_GRACE_S = 2.0


@dataclass
class RestoredGuest:
    """A destination QEMU brought back from a snapshot (maybe still loading)."""

    strategy: str
    vm: QemuMachine
    t0_wall: float                      # time.time() just before migrate-incoming
    event_mark: int
    paused: bool
    launch_seconds: float               # QEMU start-up, before t0
    time_to_running: float | None = None
    time_to_loaded: float | None = None
    loader: subprocess.Popen[bytes] | None = None
    loader_spawned_at: float = 0.0      # s after t0
    loader_stats: dict[str, Any] = field(default_factory=dict)
    loader_stderr: str = ""
    sock_dir: Path | None = None
    out_dir: Path | None = None
    recovery: BridgeRecovery | None = None
    stats_file: str = "loader.json"     # the current loader's files in out_dir
    err_file: str = "loader.err"
    blocktime_info: dict[str, Any] | None = None
    # --host-page-size for the destination's huge-page blocks, read before
    # migrate-incoming (once the fd transport had connected, a 10.2.2
    # destination did not answer HMP within 60 s)
    host_page_args: list[str] = field(default_factory=list)
    pinner: ThreadPinner | None = None  # restore(pin=...): see .pinning

    # -- waiting ----------------------------------------------------------------

    def _event(self, name: str, status: set[str] | None = None) -> dict[str, Any] | None:
        for ev in self.vm.qmp_connection.events_since(self.event_mark):
            if ev.get("event") != name:
                continue
            if status is None or ev.get("data", {}).get("status") in status:
                return ev
        return None

    def _failure(self, what: str, kind: type[RestoreFailed] = RestoreFailed) -> RestoreFailed:
        parts = [f"{self.strategy}: {what}"]
        if self.loader is not None:
            # A failing loader closes its connection just before it exits, so
            # the destination may report first: give its error line a moment.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.loader.wait(1.0)
            rc = self.loader.poll()
            if rc is not None:
                parts.append(f"loader exit code {rc}: {self._loader_stderr().strip()}")
        if self.vm.is_running():
            with contextlib.suppress(Exception):
                info = self.vm.qmp("query-migrate", timeout=5)
                parts.append(f"destination migration status {info.get('status')!r}"
                             + (f": {info['error-desc']}" if info.get("error-desc") else ""))
        else:
            parts.append(f"destination exited ({self.vm.exitcode})")
        parts.append("destination log tail:\n" + self.vm.log_tail(15))
        return kind("; ".join(parts))

    def _loader_stderr(self) -> str:
        if self.out_dir is not None:
            with contextlib.suppress(OSError):
                self.loader_stderr = (self.out_dir / self.err_file).read_text(errors="replace")
        return self.loader_stderr

    def _wait_for(self, ready: Callable[[], dict[str, Any] | None], what: str,
                  timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            ev = ready()
            if ev is not None:
                return ev
            if self.recovery is not None and self.recovery.handle():
                if time.monotonic() > deadline:
                    raise self._failure(f"still recovering the loader after {timeout:.0f}s "
                                        f"while waiting for {what}", RestoreTimeout)
                time.sleep(0.005)
                continue
            failed = self._event("MIGRATION", {"failed", "cancelled"})
            if (failed is not None or not self.vm.is_running()) and self.recovery is not None \
                    and self.recovery.owns_failure(LOSS_GRACE_S):
                continue    # the recovery watcher has a lost loader to act on
            if failed is not None:
                raise self._failure(f"migration {failed['data']['status']} while waiting "
                                    f"for {what}")
            if not self.vm.is_running():
                raise self._failure(f"destination died while waiting for {what}")
            if self.loader is not None and self.loader.poll() not in (None, 0):
                raise self._failure(f"loader failed while waiting for {what}")
            if time.monotonic() > deadline:
                raise self._failure(f"no {what} within {timeout:.0f}s", RestoreTimeout)
            time.sleep(0.002)

    def wait_running(self, timeout: float = 60.0) -> float:
        """Wait until the guest runs (or, restored paused, could be continued);
        return seconds after t0.  A snapshot saved stopped comes back paused
        from a QEMU load, so those strategies `cont` it; the bridge's RUN
        starts it by itself (unless the destination has ``-S``)."""
        if self.strategy == "qemu-precopy":
            ev = self._wait_for(lambda: self._event("MIGRATION", {"completed"}),
                                "load completion", timeout)
            self.time_to_loaded = max(0.0, _event_time(ev) - self.t0_wall)
        elif self.strategy == "qemu-fast" or self.paused:
            ev = self._wait_for(
                lambda: self._event("MIGRATION", {"postcopy-active", "completed"}),
                "postcopy-active", timeout)
        if not self.paused:
            if self.strategy != "loader-bridge" and self._event("RESUME") is None:
                with contextlib.suppress(QMPCommandError):
                    if self.vm.status() != "running":
                        self.vm.qmp("cont")
            ev = self._wait_for(lambda: self._event("RESUME"), "the guest running", timeout)
        self.time_to_running = max(0.0, _event_time(ev) - self.t0_wall)
        return self.time_to_running

    def wait_loaded(self, timeout: float = 300.0) -> float:
        """Wait until every page is loaded; seconds after t0.  For the bridge,
        also wait for the loader and keep its statistics in ``loader_stats``."""
        if self.time_to_loaded is not None and self.loader is None:
            return self.time_to_loaded
        if self.loader is not None:
            if self.recovery is not None:
                try:
                    self.recovery.wait_finished(timeout)
                except TimeoutError:
                    raise self._failure(f"loader still serving or recovering after "
                                        f"{timeout:.0f}s", RestoreTimeout) from None
            try:
                rc = self.loader.wait(timeout)
            except subprocess.TimeoutExpired:
                raise self._failure(f"loader still serving after {timeout:.0f}s",
                                    RestoreTimeout) from None
            process.forget(self.loader)
            self._read_loader_stats()
            if rc != 0:
                raise self._failure(f"loader exited with {rc}")
        ev = self._wait_for(lambda: self._event("MIGRATION", {"completed"}),
                            "migration completed", timeout)
        self.time_to_loaded = max(0.0, _event_time(ev) - self.t0_wall)
        if self.pinner is not None:
            self.pinner.release()   # the loaded guest's vCPUs run anywhere again
        return self.time_to_loaded

    def _read_loader_stats(self) -> None:
        if self.out_dir is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.loader_stats = json.loads((self.out_dir / self.stats_file).read_text())
        self._loader_stderr()

    @property
    def loader_started_at(self) -> float:
        """Seconds after t0 when the loader's clock started (its own
        ``start_unix_s``; before that field, when it was spawned).  Negative
        when it was started before ``migrate-incoming`` (unix transport)."""
        start = self.loader_stats.get("start_unix_s")
        return float(start) - self.t0_wall if start else self.loader_spawned_at

    @property
    def loader_all_sent(self) -> float | None:
        """Seconds after t0 when the loader had put the last page on the wire."""
        t = self.loader_stats.get("time_to_all_sent_s")
        return None if not t else self.loader_started_at + float(t)

    def blocktime(self) -> dict[str, Any] | None:
        """vCPU time blocked on missing pages, from the destination's
        ``query-migrate``: ``{"total_ms": N, "vcpu_ms": [..], "raw": {every
        postcopy-* field QEMU gave}}``; None for ``qemu-precopy`` (no postcopy)
        or a QEMU that reports none.  Read it after :meth:`wait_loaded` for
        the whole restore (QEMU keeps the figures after completion)."""
        if self.strategy == "qemu-precopy":
            return None
        info = self.vm.qmp("query-migrate", timeout=10)
        raw = {k: v for k, v in info.items() if k.startswith("postcopy-")}
        if "postcopy-blocktime" not in raw:
            return None
        self.blocktime_info = {"total_ms": raw["postcopy-blocktime"],
                               "vcpu_ms": list(raw.get("postcopy-vcpu-blocktime", [])),
                               "raw": raw}
        return self.blocktime_info

    def summary(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "launch_s": self.launch_seconds,
                "time_to_running_s": self.time_to_running,
                "time_to_loaded_s": self.time_to_loaded,
                "loader_spawned_at_s": self.loader_spawned_at if self.loader else None,
                "loader_started_at_s": self.loader_started_at if self.loader else None,
                "loader": self.loader_stats or None,
                "blocktime": self.blocktime_info,
                **({"pin": self.pinner.report()} if self.pinner is not None else {})}

    def __repr__(self) -> str:
        loader = f" loader pid {self.loader.pid}" if self.loader is not None else ""
        return f"<RestoredGuest {self.strategy} {self.vm.name}{loader}>"

    # -- the guest ----------------------------------------------------------------

    @property
    def agent(self) -> TinyGuest | LinuxGuest:
        """The restored test guest's agent (tiny or Linux, told from the QEMU
        arguments the snapshot was saved with); ValueError for other guests."""
        from pytest_fastsnap.guests import guest_agent

        return guest_agent(self.vm)

    def self_check(self, timeout: float = 60.0) -> Verdict:
        """The restored guest checks its own memory: falsy on failure, naming the
        first bad page.  The guest must run (restored ``paused``: ``cont`` first)."""
        agent = self.agent
        status = self.vm.status()
        if status != "running":
            raise RestoreFailed(f"{self.strategy}: {self.vm.name} is {status!r}, so its guest "
                                "cannot check itself; `cont` it first "
                                "(vm.qmp('cont')), or restore with paused=False")
        return agent.self_check(timeout)

    # -- cleanup ----------------------------------------------------------------

    def kill_loader(self) -> int | None:
        """SIGKILL the current loader (a recovering guest starts another)."""
        if self.loader is None:
            return None
        rc = process.kill(self.loader)
        self._read_loader_stats()
        return rc

    def close(self, kill: bool = False) -> None:
        """Stop the loader and QEMU and remove the socket directory.  A
        destination left in postcopy (paused or still loading) ignores
        ``quit``, so it is SIGKILLed."""
        if self.recovery is not None:
            self.recovery.stop()
        if self.pinner is not None:
            self.pinner.stop()
        self.kill_loader()
        in_postcopy = False
        if not kill and self.vm.is_running():
            with contextlib.suppress(Exception):
                status = self.vm.qmp("query-migrate", timeout=3).get("status", "")
                in_postcopy = status.startswith("postcopy")
        if kill or in_postcopy:
            self.vm.kill()
        else:
            self.vm.shutdown()
        if self.sock_dir is not None:
            shutil.rmtree(self.sock_dir, ignore_errors=True)
            self.sock_dir = None

    def __enter__(self) -> RestoredGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _socket_dir() -> tuple[Path, Path]:
    """A short private directory under /tmp for the migration socket."""
    # Our pid in the name lets workdirs.sweep_stale remove it if we are SIGKILLed.
    sock_dir = Path(tempfile.mkdtemp(prefix=f"fsb-{os.getpid()}-", dir="/tmp"))
    sock = sock_dir / "m.sock"
    if len(os.fsencode(sock)) > SUN_PATH_MAX:  # pragma: no cover - /tmp is short
        raise RestoreFailed(f"socket path {sock} over the {SUN_PATH_MAX}-byte limit")
    return sock_dir, sock


def _stream_offset_hint(path: Path, offset: int) -> str:
    """Why a restore at *offset* may have failed: no stream starts there, but the
    manifest or the file itself says where one does.  "" when offset looks right."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            if f.read(len(STREAM_START)) == STREAM_START:
                return ""
            f.seek(0)
            head = f.read(STREAM_SCAN)
    except OSError:
        return ""
    with contextlib.suppress(ValueError):
        recorded = read_manifest(path).offset
        if recorded != offset:
            return (f"no migration stream starts at offset {offset:#x}; "
                    f"{manifest_path(path).name} says it starts at {recorded:#x}: "
                    f"pass offset={recorded:#x}")
    found = head.find(STREAM_START)
    if found >= 0:
        return (f"no migration stream starts at offset {offset:#x}, one starts at "
                f"{found:#x}: pass offset={found:#x}")
    return f"no migration stream starts at offset {offset:#x}"


def restore(strategy: str, snapshot_path: str | Path, device_args: Sequence[str],
            vm_factory: Any, offset: int | None = None, *, paused: bool = False,
            wait: bool = True, timeout: float = 120.0,
            loader_args: Sequence[str] = (), transport: str = "unix",
            recover_attempts: int = DEFAULT_RECOVER_ATTEMPTS,
            ws: str | Path | None = None, record_ws: str | Path | None = None,
            ws_mode: str = "after-run", preempt: bool = False,
            loader_prefix: Sequence[str] = (),
            loader_via: Callable[[str], str] | None = None,
            pin: str | CpuSplit | None = None) -> RestoredGuest:
    """Restore *snapshot_path* with *strategy* into a new destination QEMU.

    *vm_factory* is the ``vm_factory`` fixture or a :class:`DestinationFactory`.
    With *wait* (default) returns once the guest runs (see
    :meth:`RestoredGuest.wait_running`); the bridge's loader keeps serving
    and :meth:`RestoredGuest.wait_loaded` waits for it.  *transport* (bridge
    only): ``unix`` lets the loader connect to the socket itself, ``fd``
    connects here and hands the loader the connected descriptor (``fd:N``),
    ``tcp:HOST:PORT`` makes the destination listen there and the loader connect
    (``tcp`` alone: 127.0.0.1, a free port; see :mod:`.transport`).  *preempt*
    (bridge, unix or tcp) turns on the destination's ``postcopy-preempt`` and
    the loader's ``--preempt``: requested pages go on a second connection.
    *loader_prefix* goes before the loader's command line (e.g. ``ip netns
    exec NS``); *loader_via* maps the destination's tcp URI to the one the
    loader is given (a relay in between, e.g. :mod:`.delay_relay`).  On any
    failure the destination and loader are killed before the exception
    propagates.

    *offset* is where the migration stream starts in the file; by default the
    one the snapshot's manifest (``<snapshot>.json``) records, else 0.  A
    failed restore says so when no stream starts at *offset* and where one does.
    The bridge parses the file first: one the loader refuses raises
    :class:`RestoreRefused` before any QEMU is started.  *recover_attempts*
    (bridge only; 0 turns recovery off) bounds how often a lost loader is
    recovered (:mod:`pytest_fastsnap.restore.recovery`); a guest that cannot
    be recovered raises :class:`RestoreNotRecovered` from the waiting call.

    *pin* (bridge only): ``auto``, ``REQUESTS/EAGER`` CPU lists (``0/1``) or
    a :class:`~.pinning.CpuSplit`: the vCPUs, QEMU's fault and preempt
    threads and the loader's request thread run on the first set, the
    loader's eager stream and QEMU's listen thread on the second, while the
    restore loads (:mod:`.pinning`; ``summary()["pin"]`` says what was
    pinned and which threads were not found).

    Working-set prefetch (bridge only): *record_ws* makes the loader write
    the pages the destination requested, in order, to that file once the
    restore completes; *ws* sends a file so recorded first on this restore,
    ``ws_mode`` ``before-run`` (loaded before any vCPU runs) or
    ``after-run`` (at the head of the eager stream).  An invalid *ws* file,
    or one recorded on another snapshot layout, raises
    :class:`RestoreRefused` (``E_WS``) before any QEMU is started.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown restore strategy {strategy!r}; one of {STRATEGIES}")
    link = parse_transport(transport)     # ValueError naming what is wrong
    if preempt and link.kind == "fd":
        raise ValueError("preempt needs a second connection: transport unix or tcp, not fd")
    if isinstance(recover_attempts, bool) or not isinstance(recover_attempts, int) \
            or recover_attempts < 0:
        raise ValueError(f"recover_attempts must be an int >= 0, not {recover_attempts!r}")
    path = Path(snapshot_path).resolve()
    if offset is None:
        try:
            offset = read_manifest(path).offset
        except ValueError:
            offset = 0
    if pin is not None and not isinstance(pin, (str, CpuSplit)):
        raise ValueError(f"pin must be 'auto', 'REQUESTS/EAGER' or a CpuSplit, not {pin!r}")
    split = parse_pin(pin) if isinstance(pin, str) else pin
    if split is not None and strategy != "loader-bridge":
        raise ValueError(f"pin is a loader-bridge option, not {strategy}'s")
    if preempt and record_ws is not None:
        raise ValueError("record_ws with preempt is not supported: requests answered on the "
                         "preempt channel are not recorded")
    ws_args = _ws_args(strategy, ws, record_ws, ws_mode)
    # A --resume loader gets neither: the working set went (or was recorded)
    # before the loss, and a recording cut by a recovery is not written.
    resume_args = [*loader_args, *(["--preempt"] if preempt else [])]
    loader_args = [*loader_args, *ws_args]
    if strategy == "loader-bridge":
        _loader_accepts(strategy, path, offset, ws_args[:2] if ws is not None else [])
    t_launch = time.monotonic()
    vm = _as_factory(vm_factory)(device_args, paused=paused)
    guest = RestoredGuest(strategy=strategy, vm=vm, t0_wall=0.0, event_mark=0, paused=paused,
                          launch_seconds=time.monotonic() - t_launch)
    own = getattr(vm_factory, "own", None)
    if own is not None:     # the vm_factory fixture closes it at teardown
        own(guest)
    start_args = [*loader_args, *(["--preempt"] if preempt else [])]
    prefix = tuple(loader_prefix)
    if split is not None:
        guest.pinner = ThreadPinner(split, lambda: _pin_pids(guest), preempt=preempt,
                                    running=lambda: guest._event("RESUME") is not None
                                    ).start()
    if strategy == "loader-bridge" and recover_attempts:
        factory = _as_factory(vm_factory)

        def relaunch() -> None:
            guest.vm = factory(device_args, paused=paused)
            _start(guest, path, offset, start_args, link, prefix, loader_via)

        guest.recovery = BridgeRecovery(
            guest, recover_attempts,
            lambda to, tag: _spawn_loader(guest, path, offset, to, resume_args, tag,
                                          prefix=prefix),
            relaunch, RestoreNotRecovered)
    try:
        _start(guest, path, offset, start_args, link, prefix, loader_via)
        if wait:
            guest.wait_running(timeout)
    except BaseException as err:
        guest.close(kill=True)
        if type(err) is RestoreFailed:
            hint = _stream_offset_hint(path, offset)
            if hint:
                err.args = (f"{err.args[0] if err.args else err}\nhint: {hint}",)
        raise
    return guest


def _pin_pids(guest: RestoredGuest) -> list[int | None]:
    """The destination, then the current loader (a recovery replaces both)."""
    loader = guest.loader
    live = loader is not None and loader.poll() is None
    return [getattr(guest.vm, "pid", None), loader.pid if live and loader else None]


def _ws_args(strategy: str, ws: str | Path | None, record_ws: str | Path | None,
             ws_mode: str) -> list[str]:
    """The loader options for working-set prefetch (``--ws`` first)."""
    if ws is None and record_ws is None:
        return []
    if strategy != "loader-bridge":
        raise ValueError(f"ws/record_ws are loader-bridge options, not {strategy}'s")
    if ws_mode not in ("before-run", "after-run"):
        raise ValueError(f"ws_mode must be 'before-run' or 'after-run', not {ws_mode!r}")
    args = ["--ws", str(Path(ws).resolve()), "--ws-mode", ws_mode] if ws is not None else []
    return args + (["--record-ws", str(Path(record_ws).absolute())] if record_ws else [])


def _loader_accepts(strategy: str, path: Path, offset: int,
                    extra: Sequence[str] = ()) -> None:
    """Parse *path* (and a ``--ws`` file in *extra*) as the loader will
    (``serve --describe``) before a destination is started for it: an
    invalid file costs no QEMU and leaves none waiting."""
    proc = subprocess.run([str(loader_binary()), "serve", str(path), "--offset", str(offset),
                           *extra, "--describe", "--json"], capture_output=True, text=True,
                          timeout=60, check=False)
    if proc.returncode == 0:
        return
    try:
        verdict = json.loads(proc.stdout)
    except ValueError:
        verdict = {}
    raise RestoreRefused(strategy, verdict.get("error_name") or f"exit {proc.returncode}",
                         verdict.get("error") or proc.stderr.strip())


def _caps(guest: RestoredGuest, caps: dict[str, bool]) -> None:
    try:
        set_capabilities(guest.vm, caps)
    except QMPCommandError as err:
        raise RestoreUnsupported(guest.strategy, err.desc) from None


def _incoming(guest: RestoredGuest, uri: str) -> None:
    guest.event_mark = guest.vm.qmp_connection.event_mark()
    guest.t0_wall = time.time()
    try:
        guest.vm.qmp("migrate-incoming", uri=uri)
    except QMPCommandError as err:
        raise RestoreFailed(f"{guest.strategy}: migrate-incoming {uri}: {err.desc}") from None


READY_TIMEOUT = 60.0     # s a loader may take to parse a snapshot before connecting


def _wait_ready(fd: int, timeout: float) -> None:
    """Until the loader wrote its ready byte or closed the pipe (it exited:
    the restore's own checks then report why), at most *timeout* s."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            os.read(fd, 1)
            return


def _start(guest: RestoredGuest, path: Path, offset: int, loader_args: Sequence[str],
           link: Transport, loader_prefix: tuple[str, ...] = (),
           loader_via: Callable[[str], str] | None = None) -> None:
    if guest.strategy == "qemu-precopy":
        _caps(guest, {"mapped-ram": True, "events": True})
        _incoming(guest, file_uri(path, offset))
    elif guest.strategy == "qemu-fast":
        _caps(guest, {"mapped-ram": True, "postcopy-ram": True, "postcopy-blocktime": True,
                      "events": True})
        _incoming(guest, file_uri(path, offset))
    else:
        _caps(guest, {"postcopy-ram": True, "postcopy-blocktime": True, "events": True,
                      **({"postcopy-preempt": True} if "--preempt" in loader_args else {})})
        guest.host_page_args = _host_page_args(guest.vm)
        guest.sock_dir, sock = _socket_dir()
        guest.out_dir = guest.sock_dir
        conn = None
        if link.kind == "unix":
            # The loader starts first (fork/exec and its parse of the file are
            # not on the restore's clock, as the destination's own start is
            # not) and connects when QEMU binds the socket (inotify).
            t_spawn = time.time()
            ready_r, ready_w = os.pipe()
            try:
                _spawn_loader(guest, path, offset, f"unix:{sock}",
                              [*loader_args, "--ready-fd", str(ready_w)], "",
                              pass_fds=(ready_w,), prefix=loader_prefix)
                os.close(ready_w)
                ready_w = -1
                _wait_ready(ready_r, READY_TIMEOUT)
            finally:
                os.close(ready_r)
                if ready_w >= 0:
                    os.close(ready_w)
            _incoming(guest, f"unix:{sock}")
            guest.loader_spawned_at = t_spawn - guest.t0_wall
            if guest.recovery is not None:
                guest.recovery.watch()
            return
        if link.kind == "tcp":
            _incoming(guest, link.uri())
            to = link.uri(link.port or listening_port(guest.vm))
            if loader_via is not None:
                to = loader_via(to)
        else:
            _incoming(guest, f"unix:{sock}")
            to = f"unix:{sock}"
        if link.kind == "fd":
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(str(sock))
            to = f"fd:{conn.fileno()}"
        try:
            _spawn_loader(guest, path, offset, to, loader_args, "",
                          pass_fds=(conn.fileno(),) if conn is not None else (),
                          prefix=loader_prefix)
        finally:
            if conn is not None:
                conn.close()    # the loader holds its own copy
        guest.loader_spawned_at = time.time() - guest.t0_wall
        if guest.recovery is not None:
            guest.recovery.watch()


_RAMBLOCK_ROW = re.compile(r"^\s*(\S+)\s+(\d+) (KiB|MiB|GiB)\s+0x", re.MULTILINE)


def _host_page_args(vm: Any) -> list[str]:
    """``--host-page-size ID=SIZE`` for each destination RAM block whose host
    page is not 4 KiB (hugetlbfs / memfd hugetlb backends), from HMP ``info
    ramblock``: postcopy places whole host pages, and QEMU refuses a source
    that advises another page size ("Postcopy needs matching RAM page sizes")."""
    hmp = getattr(vm, "hmp", None)
    if hmp is None:
        return []
    args = []
    for name, size, unit in _RAMBLOCK_ROW.findall(hmp("info ramblock")):
        if (size, unit) != ("4", "KiB"):
            args += ["--host-page-size", f"{name}={size}{unit[0]}"]
    return args


def _spawn_loader(guest: RestoredGuest, path: Path, offset: int, to: str,
                  loader_args: Sequence[str], tag: str, pass_fds: tuple[int, ...] = (),
                  prefix: tuple[str, ...] = ()) -> None:
    """Start ``serve`` into *guest.loader* (behind *prefix*, e.g. ``ip netns
    exec NS``); *tag* non-empty: a ``--resume`` loader of that recovery
    attempt, with its own output files."""
    assert guest.out_dir is not None
    if "--host-page-size" not in loader_args:
        loader_args = [*loader_args, *guest.host_page_args]
    suffix = f"-{tag}" if tag else ""
    guest.stats_file, guest.err_file = f"loader{suffix}.json", f"loader{suffix}.err"
    args = [*prefix, str(loader_binary()), "serve", str(path), "--offset", str(offset), "--to", to,
            "--json", "--stats-file", str(guest.out_dir / guest.stats_file), *loader_args,
            *(["--resume"] if tag else [])]
    with open(guest.out_dir / f"loader{suffix}.out", "wb") as out, \
            open(guest.out_dir / guest.err_file, "wb") as err:
        guest.loader = process.spawn(args, stdout=out.fileno(), stderr=err.fileno(),
                                     pass_fds=pass_fds)
