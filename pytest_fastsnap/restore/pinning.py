"""Keep a bridge restore's request path off the CPUs its eager stream uses.

A requested page crosses four threads before the vCPU runs again: QEMU's
fault thread (reads the userfault, sends the request), the loader's request
thread (``fsl-requests``), QEMU's preempt thread (places the page) and the
vCPU.  The eager stream keeps two more busy all the time: the loader's main
thread (sending) and QEMU's listen thread (placing every page with its own
``UFFDIO_COPY``).  Shared by all six, a small host's CPUs make each hop of a
request wait behind eager work: that is where the guest-visible tail comes
from (benchmarks/README.md, "Guest-visible latency").  ``pin`` splits the
CPUs: the vCPUs and the request path on one set, the eager pair on another,
as ``vcpupin``/``emulatorpin`` split a libvirt guest's threads.  While the
guest does not fault (none for :data:`WIDEN_AFTER_S`), the eager pair may use
the request CPUs too, and is narrowed back at the next fault: kept narrow, an
idle guest's restore would lose a quarter of its eager throughput here.  The
quiet spell counts only once the guest runs (*running*, for a restore its
``RESUME`` event): before that its first faults are still to come, and a
pair widened then shared the request CPUs with them until the next poll.

    split = parse_pin("auto")          # the last CPU (2 of 4+) for the eager pair
    split = parse_pin("0-2/3")         # REQUESTS/EAGER, CPU lists
    pinner = ThreadPinner(split, lambda: [qemu_pid, loader_pid], preempt=True)
    pinner.start(); ...; pinner.stop(); pinner.report()

QEMU's threads are told apart by name, so the destination must run with
``-name NAME,debug-threads=on`` (:class:`~pytest_fastsnap.qemu.machine.QemuMachine`
does); :meth:`ThreadPinner.report` lists the threads it pinned and the
roles it never found.  Threads are pinned as they appear (a poll, 1 ms), so a
thread's first instants may run anywhere.  Once every role is placed, the
poll only reads the fault thread's run count (one ``pread``) and lists the
threads again every :data:`RESCAN_S` or when a process is replaced: listing
them every 1 ms took ~9 % of the eager CPU (perf, 1 GiB, rand:10).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# QEMU 10.x names (seen on 10.0.2 and 10.2.2), then older ones (debug-threads=on)
_VCPU = re.compile(r"^CPU \d+/(TCG|KVM|HVF|WHPX)$")
_REQUEST_THREADS = {"mig/dst/fault": "fault", "postcopy/fault": "fault",
                    "fault-default": "fault",
                    "mig/dst/preempt": "preempt", "fault-fast": "preempt"}
_EAGER_THREADS = {"mig/dst/listen": "listen", "postcopy/listen": "listen"}
LOADER_REQUEST_THREAD = "fsl-requests"      # bridge.c names it so
# s without a fault after which the eager pair may use the request CPUs too
# (narrowed back at the next fault): the restore keeps its eager throughput
# and a faulting guest its tail (1 GiB, rand:1 right after RUN, 5 runs each:
# 1,217 MiB/s and p99/p50 1.88 against 912 MiB/s and 1.74 always narrow;
# benchmarks/README.md, "Pinning")
WIDEN_AFTER_S = 0.05
# s between thread listings once every role is placed (sooner when the
# destination or the loader is replaced: a recovery)
RESCAN_S = 0.02


@dataclass(frozen=True)
class CpuSplit:
    """CPUs for the request path (and vCPUs) and for the eager stream."""

    requests: frozenset[int]
    eager: frozenset[int]

    @property
    def spec(self) -> str:
        return f"{_cpu_list(self.requests)}/{_cpu_list(self.eager)}"


def _cpu_list(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _parse_cpus(text: str, what: str) -> frozenset[int]:
    cpus: set[int] = set()
    for item in text.split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"pin: {what} CPU list {text!r}: want numbers and ranges "
                             "like 0,2-3")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"pin: {what} CPU list {text!r}: range {item.strip()!r} "
                             "runs backwards")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def pinnable() -> bool:
    """Whether ``pin="auto"`` can split this process's CPUs (2 or more)."""
    return len(os.sched_getaffinity(0)) >= 2


def parse_pin(text: str, available: Iterable[int] | None = None) -> CpuSplit:
    """``auto`` (the last usable CPU for the eager stream, the last two from 4
    CPUs on, the others for the request path and vCPUs) or ``REQUESTS/EAGER`` CPU lists (``0/1``,
    ``0-2/3``); ValueError naming what is wrong: not two non-empty disjoint
    sets of CPUs this process may use (*available*, default its affinity)."""
    usable = frozenset(available if available is not None else os.sched_getaffinity(0))
    if text == "auto":
        if len(usable) < 2:
            raise ValueError(f"pin auto needs at least 2 CPUs; this process may use "
                             f"{len(usable)} ({_cpu_list(usable)})")
        eager = frozenset(sorted(usable)[-2 if len(usable) >= 4 else -1:])
        return CpuSplit(usable - eager, eager)
    req_text, sep, eager_text = text.partition("/")
    if not sep:
        raise ValueError(f"pin {text!r}: want auto or REQUESTS/EAGER CPU lists, e.g. 0/1")
    split = CpuSplit(_parse_cpus(req_text, "requests"), _parse_cpus(eager_text, "eager"))
    if split.requests & split.eager:
        raise ValueError(f"pin {text!r}: CPU {_cpu_list(split.requests & split.eager)} is "
                         "in both sets; the point is to keep them apart")
    outside = (split.requests | split.eager) - usable
    if outside:
        raise ValueError(f"pin {text!r}: CPU {_cpu_list(outside)} is not one this process "
                         f"may use ({_cpu_list(usable)})")
    return split


def thread_role(comm: str, *, loader_main: bool = False) -> str | None:
    """``requests``, ``eager`` or None (left alone) for a thread named *comm*;
    *loader_main*: the loader's main thread (it sends the eager stream)."""
    if loader_main:
        return "eager"
    if comm == LOADER_REQUEST_THREAD or comm in _REQUEST_THREADS or _VCPU.match(comm):
        return "requests"
    if comm in _EAGER_THREADS:
        return "eager"
    return None


def _open_schedstat(pid: int, tid: int) -> int:
    return os.open(f"/proc/{pid}/task/{tid}/schedstat", os.O_RDONLY | os.O_CLOEXEC)


def _run_count(fd: int) -> int:
    """schedstat's third field: how many times the thread was run."""
    return int(os.pread(fd, 128, 0).split()[2])


def _read_comm(pid: int, tid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


class ThreadPinner:
    """Pins the threads of the processes *pids()* returns (the destination
    QEMU first, then the loader, which may be replaced by a recovery) to
    *split* by role, polling every *interval* s until :meth:`stop`."""

    def __init__(self, split: CpuSplit, pids: Callable[[], list[int | None]],
                 *, preempt: bool, interval: float = 0.001,
                 widen_after: float | None = WIDEN_AFTER_S,
                 running: Callable[[], bool] | None = None) -> None:
        self.split = split
        self._pids = pids
        self._preempt = preempt
        self._interval = interval
        # widen_after: the eager pair may use every CPU of the split once QEMU's
        # fault thread has been idle that long, and is narrowed back at the
        # next fault (None: always narrow)
        self._widen_after = widen_after
        self._eager_tids: set[tuple[int, int]] = set()
        self._before: dict[tuple[int, int], set[int]] = {}  # its affinity before
        self._fault_fds: dict[tuple[int, int], int] = {}   # their schedstat, open
        self._running = running
        self._guest_ran = running is None
        self._scanned: list[int | None] | None = None      # pids at the last listing
        self._next_scan = 0.0
        self._complete = False                              # every role placed
        self._faults = -1
        self._last_fault = time.monotonic()
        self._wide_since: float | None = None
        self.wide_s = 0.0
        self.narrowed = 0
        self._done: set[tuple[int, int]] = set()
        self._main_comm: dict[int, str] = {}        # pid -> its main thread's name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pinned: dict[str, list[int]] = {}      # "pid/tid comm" -> CPUs
        self.errors: list[str] = []

    def start(self) -> ThreadPinner:
        self.poll()             # what exists already (the vCPUs, the loader) at once
        self._thread = threading.Thread(target=self._run, name="fastsnap-pin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def release(self) -> None:
        """Stop, and give every pinned thread still there (the vCPUs of a
        loaded guest) back the affinity it had: the split is for the restore."""
        self.stop()
        self._close_fault_fds()
        for (pid, tid), cpus in self._before.items():
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue        # gone with the restore (its number may be reused)
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)
        self._before.clear()

    def _close_fault_fds(self) -> None:
        for fd in self._fault_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fault_fds.clear()

    def _run(self) -> None:
        # this thread's own polls stay off the request CPUs too
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, self.split.eager)
        while not self._stop.wait(self._interval):
            self.poll()
        self._close_fault_fds()

    def poll(self) -> None:
        """Pin every not yet pinned thread with a role (a listing of the
        threads while a role is missing, every RESCAN_S and when a process
        is replaced), then narrow or widen the eager pair."""
        pids = self._pids()
        now = time.monotonic()
        if pids != self._scanned or now >= self._next_scan or not self._complete:
            self._scan(pids)
            self._scanned = list(pids)
            self._next_scan = now + RESCAN_S
            self._complete = not self.missing()
        if self._widen_after is not None:
            self._adapt()

    def _scan(self, pids: list[int | None]) -> None:
        for i, pid in enumerate(pids):
            if pid is None:
                continue
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue        # gone (a killed loader): its successor comes next
            main = self._main_comm.get(pid) or self._main_comm.setdefault(
                pid, _read_comm(pid, pid) or "")
            for tid in tids:
                if (pid, tid) in self._done:
                    continue
                comm = _read_comm(pid, tid)
                if comm is None:
                    continue
                is_loader = i > 0
                role = thread_role(comm, loader_main=is_loader and tid == pid)
                if role is None:
                    # a new thread keeps its creator's name until it names
                    # itself: look again next time; named ones stay unpinned
                    if tid == pid or comm != main:
                        self._done.add((pid, tid))
                    continue
                cpus = self.split.requests if role == "requests" else self._eager_cpus()
                try:
                    before = os.sched_getaffinity(tid)
                    os.sched_setaffinity(tid, cpus)
                except OSError as err:
                    if len(self.errors) < 10:
                        self.errors.append(f"{pid}/{tid} {comm}: {err.strerror}")
                    continue
                self._done.add((pid, tid))
                self._before[(pid, tid)] = before
                name = "loader main" if is_loader and tid == pid else comm
                self.pinned[f"{pid}/{tid} {name}"] = sorted(cpus)
                if role == "eager":
                    self._eager_tids.add((pid, tid))
                elif _REQUEST_THREADS.get(comm) == "fault":
                    with contextlib.suppress(OSError):
                        self._fault_fds[(pid, tid)] = _open_schedstat(pid, tid)

    def _eager_cpus(self) -> frozenset[int]:
        return self.split.eager | self.split.requests if self._wide_since is not None \
            else self.split.eager

    def _adapt(self) -> None:
        """Narrow the eager pair at a fault, widen it after a quiet spell: a
        guest that is not faulting leaves the request CPUs to the eager stream."""
        now = time.monotonic()
        faults = 0
        for key, fd in list(self._fault_fds.items()):
            try:
                faults += _run_count(fd)
            except (OSError, IndexError, ValueError):
                del self._fault_fds[key]    # gone with its process
                with contextlib.suppress(OSError):
                    os.close(fd)
        if not self._guest_ran:
            # Narrow until the guest runs: widened before RUN (no faults yet),
            # the eager pair shared the request CPUs during the guest's first
            # faults, until the next poll narrowed it (p99 at 4 GiB).
            self._guest_ran = self._has_run()
            self._faults, self._last_fault = faults, now
            return
        if faults != self._faults:
            self._faults, self._last_fault = faults, now
            if self._wide_since is not None:
                self.wide_s += now - self._wide_since
                self._wide_since = None
                self.narrowed += 1
                self._place_eager()
        elif self._wide_since is None and now - self._last_fault >= (self._widen_after or 0.0):
            self._wide_since = now
            self._place_eager()

    def _has_run(self) -> bool:
        assert self._running is not None    # else _guest_ran started True
        try:
            return bool(self._running())
        except Exception:   # a destination gone or being replaced: ask again next poll
            return False

    def _place_eager(self) -> None:
        cpus = self._eager_cpus()
        for pid, tid in list(self._eager_tids):
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                self._eager_tids.discard((pid, tid))    # gone

    def missing(self) -> list[str]:
        """The roles no pinned thread had: a QEMU without debug-threads shows
        here (vCPU, fault, listen, preempt), as does a loader that never ran."""
        names = [key.split(" ", 1)[1] for key in self.pinned]
        want = {"vCPU": any(_VCPU.match(n) for n in names),
                "fault": any(_REQUEST_THREADS.get(n) == "fault" for n in names),
                "listen": any(n in _EAGER_THREADS for n in names),
                "loader main": "loader main" in names,
                "loader requests": LOADER_REQUEST_THREAD in names}
        if self._preempt:
            want["preempt"] = any(_REQUEST_THREADS.get(n) == "preempt" for n in names)
        return [role for role, found in want.items() if not found]

    def report(self) -> dict[str, Any]:
        wide = self.wide_s + (time.monotonic() - self._wide_since
                              if self._wide_since is not None else 0.0)
        return {"spec": self.split.spec, "threads": dict(self.pinned),
                "missing": self.missing(), "errors": list(self.errors),
                "widen_after_s": self._widen_after, "wide_s": wide,
                "narrowed": self.narrowed}
