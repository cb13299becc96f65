"""restore(pin=...): the request path and the vCPUs on one set of CPUs, the
eager stream on another (pytest_fastsnap.restore.pinning).

Proven with real QEMU, a real loader and the kernel's own view of each
thread's affinity (/proc/PID/task/TID/status): while a preempt restore
loads, every vCPU, QEMU's fault and preempt threads and the loader's
request thread may run only on the request CPUs, QEMU's listen thread and
the loader's main (eager) thread only on the eager CPUs, and QEMU's other
threads keep their affinity; a loader started by a recovery is pinned too;
the guest's memory checks out.  Bad specs are refused naming the problem.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_fastsnap.fixtures import GuestFactory, SnapshotFactory, VmFactory
from pytest_fastsnap.qemu.migration import SavedSnapshot
from pytest_fastsnap.restore import restore
from pytest_fastsnap.restore.pinning import (
    LOADER_REQUEST_THREAD,
    WIDEN_AFTER_S,
    CpuSplit,
    ThreadPinner,
    parse_pin,
    thread_role,
)
from pytest_fastsnap.restore.strategies import RestoredGuest

TWO_CPUS = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                              reason="pinning needs 2 CPUs; this process may use "
                              f"{len(os.sched_getaffinity(0))}")


# -- specs and roles (no QEMU) ----------------------------------------------------

@pytest.mark.parametrize("text, available, requests, eager", [
    ("auto", {0, 1}, {0}, {1}),
    ("auto", {2, 5, 7}, {2, 5}, {7}),
    ("auto", range(8), range(6), {6, 7}),       # the eager pair: two threads, two CPUs
    ("0/1", {0, 1}, {0}, {1}),
    ("0-2,5/3-4", range(8), {0, 1, 2, 5}, {3, 4}),
])
def test_pin_spec_parses(text: str, available: set[int], requests: set[int],
                         eager: set[int]) -> None:
    split = parse_pin(text, available)
    assert split == CpuSplit(frozenset(requests), frozenset(eager))
    assert parse_pin(split.spec, available) == split


@pytest.mark.parametrize("text, available, why", [
    ("auto", {3}, "pin auto needs at least 2 CPUs; this process may use 1 \\(3\\)"),
    ("0", {0, 1}, "want auto or REQUESTS/EAGER"),
    ("0/0", {0, 1}, "CPU 0 is in both sets"),
    ("0-1/1", {0, 1}, "CPU 1 is in both sets"),
    ("0/2", {0, 1}, "CPU 2 is not one this process may use \\(0,1\\)"),
    ("x/1", {0, 1}, "requests CPU list 'x'"),
    ("0/", {0, 1}, "eager CPU list ''"),
    ("1-0/2", {0, 1, 2}, "range '1-0' runs backwards"),
])
def test_bad_pin_spec_is_refused_naming_the_problem(text: str, available: set[int],
                                                    why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_pin(text, available)


@pytest.mark.parametrize("comm, role", [
    ("CPU 0/TCG", "requests"), ("CPU 3/KVM", "requests"), ("mig/dst/fault", "requests"),
    ("mig/dst/preempt", "requests"), (LOADER_REQUEST_THREAD, "requests"),
    ("mig/dst/listen", "eager"), ("postcopy/listen", "eager"),
    ("qemu-system-x86", None), ("IO mon_iothread", None), ("call_rcu", None),
    ("CPU 0/TCGX", None),
])
def test_thread_roles(comm: str, role: str | None) -> None:
    assert thread_role(comm) == role


def test_loader_main_thread_is_the_eager_one() -> None:
    assert thread_role("fastsnap-loader", loader_main=True) == "eager"


def test_a_pinner_that_found_nothing_says_what_is_missing() -> None:
    """A destination without thread names (no debug-threads) is not silently
    taken as pinned: every role it never found is listed."""
    pinner = ThreadPinner(parse_pin("auto", {0, 1}), lambda: [os.getpid(), None],
                          preempt=True)
    pinner.poll()
    assert pinner.pinned == {}
    assert pinner.missing() == ["vCPU", "fault", "listen", "loader main", "loader requests",
                                "preempt"]


# a stand-in process: threads named as QEMU's (or the loader's) are; a line
# "NAME" on stdin starts one more, each answers "ok" once named
_NAMED_THREADS = r"""
import ctypes, sys, threading
libc = ctypes.CDLL(None)
def named(name):
    libc.prctl(15, name.encode(), 0, 0, 0)      # PR_SET_NAME
    print("ok", flush=True)
    threading.Event().wait()
for line in sys.stdin:
    threading.Thread(target=named, args=(line.strip(),), daemon=True).start()
"""


@contextlib.contextmanager
def _named_process(*names: str):
    proc = subprocess.Popen([sys.executable, "-c", _NAMED_THREADS], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    def start(name: str) -> None:
        stdin.write(name + "\n")
        stdin.flush()
        assert stdout.readline() == "ok\n"
    try:
        for name in names:
            start(name)
        yield proc, start
    finally:
        proc.kill()
        proc.wait()
        stdin.close()
        stdout.close()


@TWO_CPUS
def test_a_placed_pinner_lists_threads_rarely_but_still_finds_new_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Once every role is placed, the 1 ms poll lists the processes' threads
    only every RESCAN_S (listing them every poll took ~9 % of the eager CPU),
    yet a thread started later is still pinned, and a replaced process (a
    recovery's loader) is listed at once, not at the next timed listing."""
    from pytest_fastsnap.restore import pinning
    split = parse_pin("auto")
    with _named_process("CPU 0/TCG", "mig/dst/fault", "mig/dst/listen") as (qemu, more), \
            _named_process(LOADER_REQUEST_THREAD) as (loader, _), \
            _named_process(LOADER_REQUEST_THREAD) as (loader2, _):
        pids: list[int | None] = [qemu.pid, loader.pid]
        listings: list[str] = []
        real_listdir = os.listdir

        def counting_listdir(path: str) -> list[str]:
            listings.append(path)
            return real_listdir(path)
        monkeypatch.setattr(pinning.os, "listdir", counting_listdir)
        pinner = ThreadPinner(split, lambda: list(pids), preempt=False).start()
        try:
            deadline = time.monotonic() + 5
            while pinner.missing() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert pinner.missing() == [], pinner.report()
            listings.clear()
            time.sleep(0.3)
            # 0.3 s of 1 ms polls: at most ~15 listings of each process every
            # 20 ms, where listing at every poll makes hundreds
            assert 0 < len(listings) <= 2 * (0.3 / pinning.RESCAN_S + 2), len(listings)
            more("mig/dst/preempt")
            _wait_for(lambda: any(k.endswith("mig/dst/preempt") for k in pinner.pinned),
                      pinner)
            # a recovery replaces the loader: found though the next timed
            # listing is far off
            monkeypatch.setattr(pinning, "RESCAN_S", 3600.0)
            time.sleep(0.1)                 # a timed listing sets the next one an hour off
            pids[1] = loader2.pid
            _wait_for(lambda: f"{loader2.pid}/{loader2.pid} loader main" in pinner.pinned,
                      pinner)
        finally:
            pinner.release()
        preempt = next(t for t, c in _threads(qemu.pid).items() if c == "mig/dst/preempt")
        assert _allowed(qemu.pid, preempt) == os.sched_getaffinity(0)   # given back


def _wait_for(cond: Callable[[], bool], pinner: ThreadPinner) -> None:
    deadline = time.monotonic() + 5
    while not cond():
        assert time.monotonic() < deadline, pinner.report()
        time.sleep(0.001)


# -- real restores -------------------------------------------------------------------

def _allowed(pid: int, tid: int) -> set[int]:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("Cpus_allowed_list:"))
    cpus: set[int] = set()
    for item in line.split(":", 1)[1].strip().split(","):
        lo, _, hi = item.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _threads(pid: int) -> dict[int, str]:
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            out[int(t)] = Path(f"/proc/{pid}/task/{t}/comm").read_text().strip()
    return out


def _wait_all_pinned(guest: RestoredGuest, loader_pid: int, timeout: float = 30.0) -> None:
    assert guest.pinner is not None
    deadline = time.monotonic() + timeout
    while True:
        report = guest.pinner.report()
        loader_done = {f"{loader_pid}/{loader_pid} loader main"} <= set(report["threads"]) \
            and any(k.startswith(f"{loader_pid}/") and k.endswith(LOADER_REQUEST_THREAD)
                    for k in report["threads"])
        if not report["missing"] and loader_done:
            return
        assert time.monotonic() < deadline, report
        time.sleep(0.01)


def _misplaced(guest: RestoredGuest, split: CpuSplit, loader_pid: int,
               eager_ok: list[frozenset[int]]) -> list[str]:
    """What the kernel says is not where it belongs, over every thread of the
    destination and the loader ([] when all is placed); the eager pair may be
    on any of *eager_ok*."""
    qemu_pid = guest.vm.pid
    assert qemu_pid is not None
    unpinned = os.sched_getaffinity(0)      # what QEMU inherited from us
    bad, seen = [], set()
    for tid, comm in _threads(qemu_pid).items():
        role = thread_role(comm) if tid != qemu_pid else None
        allowed = _allowed(qemu_pid, tid)
        ok = [split.requests] if role == "requests" else eager_ok if role == "eager" \
            else [unpinned]
        if allowed not in [set(x) for x in ok]:
            bad.append(f"QEMU {comm!r} ({role}): {allowed}")
        seen.add(comm)
    if not ({"mig/dst/fault", "mig/dst/listen", "mig/dst/preempt"} <= seen
            or {"postcopy/fault", "postcopy/listen"} <= seen) \
            or not any(c.startswith("CPU 0/") for c in seen):
        bad.append(f"QEMU threads missing: {sorted(seen)}")
    loader = _threads(loader_pid)
    if _allowed(loader_pid, loader_pid) not in [set(x) for x in eager_ok]:
        bad.append(f"loader main: {_allowed(loader_pid, loader_pid)}")
    requests = [t for t, c in loader.items() if c == LOADER_REQUEST_THREAD]
    if len(requests) != 1 or _allowed(loader_pid, requests[0]) != set(split.requests):
        bad.append(f"loader request thread: {loader}")
    return bad


def _assert_placed(guest: RestoredGuest, split: CpuSplit, loader_pid: int,
                   *eager_ok: frozenset[int]) -> None:
    deadline = time.monotonic() + 5     # a thread made a moment ago: the next poll
    while (bad := _misplaced(guest, split, loader_pid, list(eager_ok))) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not bad, bad


def _narrowed_during(guest: RestoredGuest, split: CpuSplit, work: Callable[[], object]
                     ) -> tuple[object, int]:
    """Run *work* in a thread and count the samples (every 0.5 ms) in which
    QEMU's listen thread was narrowed to the eager CPUs."""
    pid = guest.vm.pid
    assert pid is not None
    listen = next(t for t, c in _threads(pid).items() if c in ("mig/dst/listen",
                                                              "postcopy/listen"))
    out: list[object] = []
    th = threading.Thread(target=lambda: out.append(work()))
    th.start()
    narrow = 0
    while th.is_alive():
        narrow += _allowed(pid, listen) == set(split.eager)
        time.sleep(0.0005)
    th.join()
    return out[0], narrow


@pytest.fixture
def small_snapshot(guest_factory: GuestFactory, snapshot_factory: SnapshotFactory
                   ) -> SavedSnapshot:
    return guest_factory("tiny", mem="64M", size=16 << 20, zero_ratio=0.0,
                         machine="q35").saved(snapshot_factory)


@pytest.mark.fastsnap
@TWO_CPUS
def test_preempt_restore_places_each_thread_by_role(small_snapshot: SavedSnapshot,
                                                    vm_factory: VmFactory) -> None:
    """A slowed preempt restore with pin=auto, read back from the kernel:
    every thread runs where its role says; while the guest is idle the eager
    pair may use every CPU of the split, while it faults (a touch of all its
    pages, the eager stream too slow to have sent them) the eager pair is
    narrowed to its own CPUs, and widened again after; a recovery's new
    loader is pinned the same way; the memory checks out."""
    split = parse_pin("auto")
    wide = split.requests | split.eager
    guest = restore("loader-bridge", small_snapshot.path, small_snapshot.device_args,
                    vm_factory, preempt=True, pin="auto", timeout=120,
                    loader_args=("--max-bandwidth", "2"))
    try:
        assert guest.loader is not None
        first = guest.loader.pid
        assert guest.agent.touch(10, "rand")        # requests on the preempt channel
        _wait_all_pinned(guest, first)
        _assert_placed(guest, split, first, wide)   # the guest is idle now

        verdict, narrow = _narrowed_during(guest, split, lambda: guest.agent.touch(1000, "rand"))
        assert verdict, getattr(verdict, "reason", verdict)
        assert narrow > 0, "the eager pair was never narrowed while the guest faulted"
        _assert_placed(guest, split, first, wide)   # and widened once it stopped

        guest.kill_loader()                          # a recovery starts another loader
        deadline = time.monotonic() + 60
        while guest.loader is None or guest.loader.pid == first or \
                guest.loader.poll() is not None:
            assert guest.recovery is not None
            guest.recovery.handle()                  # raises if recovery gave up
            assert time.monotonic() < deadline, "no recovery loader within 60 s"
            time.sleep(0.01)
        second = guest.loader.pid
        _wait_all_pinned(guest, second)
        _assert_placed(guest, split, second, split.eager, wide)

        guest.wait_loaded(timeout=300)
        pid = guest.vm.pid
        assert pid is not None
        vcpus = [t for t, c in _threads(pid).items() if c.startswith("CPU ")]
        assert vcpus and all(_allowed(pid, t) == os.sched_getaffinity(0) for t in vcpus), \
            "a loaded guest's vCPUs keep the split"
        pin = guest.summary()["pin"]
        assert pin["spec"] == split.spec and not pin["errors"], pin
        assert pin["narrowed"] >= 1 and pin["wide_s"] > 0, pin
        assert guest.self_check()
    finally:
        guest.close()


@pytest.mark.fastsnap
@TWO_CPUS
def test_eager_pair_stays_narrow_until_the_guest_runs(small_snapshot: SavedSnapshot,
                                                      vm_factory: VmFactory) -> None:
    """Restored paused, the guest does not fault for many times WIDEN_AFTER_S,
    yet the eager pair stays on its own CPUs: the guest has not run, so its
    first faults are still to come.  Once it runs and goes idle, the pair is
    widened.  (Widened before RUN, it shared the request CPUs with the first
    faults until the next poll narrowed it.)"""
    split = parse_pin("auto")
    guest = restore("loader-bridge", small_snapshot.path, small_snapshot.device_args,
                    vm_factory, preempt=True, pin="auto", paused=True, timeout=120,
                    loader_args=("--max-bandwidth", "2"))
    try:
        assert guest.loader is not None and guest.pinner is not None
        loader = guest.loader.pid
        _wait_all_pinned(guest, loader)
        time.sleep(10 * WIDEN_AFTER_S)
        assert not _misplaced(guest, split, loader, [split.eager])
        assert guest.pinner.report()["wide_s"] == 0, guest.pinner.report()
        guest.vm.qmp("cont")
        assert guest.agent.touch(10, "rand")
        _assert_placed(guest, split, loader, split.requests | split.eager)  # idle: widened
        assert guest.pinner.report()["wide_s"] > 0
    finally:
        guest.close()


@pytest.mark.fastsnap
def test_pin_is_refused_for_other_strategies(small_snapshot: SavedSnapshot,
                                             vm_factory: VmFactory) -> None:
    with pytest.raises(ValueError, match="pin is a loader-bridge option, not qemu-precopy's"):
        restore("qemu-precopy", small_snapshot.path, small_snapshot.device_args, vm_factory,
                pin="auto")


@pytest.mark.fastsnap
@TWO_CPUS
def test_cli_restore_pin_says_what_it_pinned(small_snapshot: SavedSnapshot) -> None:
    """`fastsnap restore SNAP --preempt --pin auto` restores and prints the
    split and how many threads it placed, with no role missing."""
    from pytest_fastsnap.cli.restore import restore_cli

    out = io.StringIO()
    rc = restore_cli(small_snapshot.path, preempt=True, pin="auto", out=out)
    text = out.getvalue()
    assert rc == 0, text
    found = re.search(r"^pin (\S+): (\d+) threads pinned$", text, re.MULTILINE)
    assert found, text
    assert found.group(1) == parse_pin("auto").spec and int(found.group(2)) >= 6, text


def test_one_cpu_refuses_pin_naming_the_cpu_count(tmp_path: Path) -> None:
    """On one CPU (taskset), `bench --strategies ...+pin` and `restore --pin
    auto` stop with one error line and exit 2, before anything starts."""
    if not shutil.which("taskset"):
        pytest.skip("taskset (util-linux) is not installed")
    snap = tmp_path / "none.img"
    snap.write_bytes(b"")
    cli = ["taskset", "-c", "0", sys.executable, "-m", "pytest_fastsnap.cli"]
    for args in (["bench", "--sizes", "24M", "--strategies", "loader-bridge+preempt+pin"],
                 ["restore", str(snap), "--pin", "auto"]):
        res = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path, check=False)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "pin auto needs at least 2 CPUs; this process may use 1" \
            in lines[0], (args, res.stderr)
    assert [p.name for p in tmp_path.iterdir()] == ["none.img"]     # nothing left behind


def test_pin_of_a_wrong_type_is_refused() -> None:
    with pytest.raises(ValueError, match="pin must be 'auto', 'REQUESTS/EAGER' or a CpuSplit"):
        restore("loader-bridge", "/nonexistent", [], None, pin=1)  # type: ignore[arg-type]
