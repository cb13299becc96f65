"""What fast snapshot load's design makes risky, through every lazy strategy.

Upstream fast snapshot load (mapped-ram + postcopy-ram on the destination)
starts the guest before RAM is in: a fault path serves the pages the guest
touches, an eager thread loads the rest, and a shared "received" bitmap
decides which of the two places each page (qemu-devel review, 2026-06).  The
native loader's bridge has the same design on stock QEMU (requests first,
eager stream, a per-page "sent" bitmap), so every test here runs against
``loader-bridge`` today and against ``qemu-fast`` where the binary has it:

* the guest touching pages while the eager path loads them: no page placed
  twice, none lost;
* the file cut inside the pages region after the guest started: the restore
  fails (the destination says so, the vCPUs keep answering where the guest is
  not waiting for a page), the loader names the short file, nothing is left;
* zero pages (clear bits) arrive as zeros even with stale bytes in the file;
* hugetlbfs-backed guest RAM (2 MiB pages): restored exactly, or refused
  cleanly where a strategy cannot place huge pages.

What each strategy must do where they differ is in the tables below, keyed
by strategy; which strategies run comes from ``pytest_fastsnap.restore.table``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pytest_fastsnap.fixtures import GuestFactory, SnapshotFactory, VmFactory
from pytest_fastsnap.guests.pattern import page_is_zero
from pytest_fastsnap.guests.tiny import TinyGuest, TinyParams, tiny_args, tiny_kernel
from pytest_fastsnap.native.hugepages import hugepages_or_skip
from pytest_fastsnap.restore.attempt import attempt_restore
from pytest_fastsnap.restore.strategies import RestoredGuest, RestoreFailed, restore
from pytest_fastsnap.restore.table import STRATEGY_TABLE, strategy_params
from pytest_fastsnap.snapshot.bitmap import bit_is_set
from pytest_fastsnap.snapshot.format import parse
from pytest_fastsnap.snapshot.sparse import sparse_copy

from reference_snapshot import ram_ranges

PAGE = 4096
MiB = 1 << 20
# Strategies where a guest runs while its pages still arrive.
LAZY = strategy_params(lazy=True, destination=True)
# Slow the eager path where the strategy allows it, so the guest races it for
# seconds instead of milliseconds (requests are never throttled).
THROTTLED: dict[str, tuple[str, ...]] = {"loader-bridge": ("--max-bandwidth", "8")}


def _check_page_accounting(strategy: str, guest: RestoredGuest, raced: bool = False) -> None:
    """Where the strategy counts placements: each page placed by exactly one
    path (fault or eager), never twice, and every page with data placed; if
    the guest ran while pages still streamed, some came on its faults."""
    if not STRATEGY_TABLE[strategy].page_accounting:
        return
    stats = guest.loader_stats
    assert stats.get("double_sends") == 0, stats
    assert stats["pages_on_request"] + stats["pages_eager"] == \
        stats["pages_data"] + stats["pages_zero"], stats
    assert stats["pages_data"] == stats["file_pages_set"], f"pages lost: {stats}"
    assert not raced or stats["pages_on_request"] > 0, stats


@contextmanager
def _running(strategy: str, path: Path, device_args: tuple[str, ...], vm_factory: VmFactory,
             offset: int = 0) -> Iterator[RestoredGuest]:
    """Restored and running (not paused); everything gone afterwards, checked."""
    guest = restore(strategy, path, device_args, vm_factory, offset=offset,
                    loader_args=THROTTLED.get(strategy, ()))
    sock_dir = guest.sock_dir
    try:
        yield guest
    finally:
        guest.close(kill=True)
        assert guest.vm.exitcode is not None, "destination left running"
        assert guest.loader is None or guest.loader.poll() is not None, "loader left running"
        assert sock_dir is None or not sock_dir.exists(), f"{sock_dir} left behind"


def _still_loading(strategy: str, guest: RestoredGuest) -> bool:
    if guest.loader is not None:
        return guest.loader.poll() is None
    return guest.vm.qmp("query-migrate").get("status") != "completed"


# -- the guest touching pages while the eager path loads them ------------------------------


@pytest.mark.parametrize("strategy", LAZY)
def test_guest_touches_pages_while_they_load(guest_factory: GuestFactory,
                                             vm_factory: VmFactory,
                                             snapshot_factory: SnapshotFactory,
                                             strategy: str) -> None:
    """A dirtying guest resumes at once and rewrites every 8th page while the
    eager path is still loading; its self-check (which reads every page) runs
    mid-load too.  A page placed twice would undo a guest write (or pause
    postcopy on EEXIST); a page lost would read as zeros: both fail the
    guest's own check."""
    src = guest_factory("tiny", mode="dirty", size=24 * MiB)
    assert src.params is not None
    snap = snapshot_factory(src.vm)
    with _running(strategy, snap.path, snap.device_args, vm_factory, snap.offset) as dst:
        agent = TinyGuest(dst.vm, src.params)
        agent.ping()
        raced = _still_loading(strategy, dst)
        mid_load = agent.self_check()
        dst.wait_loaded()
        agent.stop_dirtying()
        after = agent.self_check()
        assert mid_load, f"while loading: {agent.last_check_line()}"
        assert after, f"after loading: {agent.last_check_line()}"
        if strategy in THROTTLED:
            assert raced, "the throttled eager path finished before the guest ran"
        _check_page_accounting(strategy, dst, raced)


# -- the file cut inside the pages region after the guest started ---------------------------


def _qemu_fails_the_load(guest: RestoredGuest, agent: TinyGuest) -> str:
    """QEMU reads the file itself: the load must fail (or QEMU exit with an
    error, not a signal); a QEMU left running must answer, and so must a guest
    it left running (its vCPUs are not stuck on a page that never comes)."""
    deadline = time.monotonic() + 30
    while guest.vm.is_running():
        status = guest.vm.qmp("query-migrate", timeout=5).get("status", "")
        if status == "failed":
            if guest.vm.status() == "running":
                agent.ping(timeout=10)
            return status
        assert status != "completed", "QEMU completed a load from a truncated file"
        assert time.monotonic() < deadline, f"QEMU still {status!r} 30 s after the cut"
        time.sleep(0.1)
    code = guest.vm.wait_exit(5)
    assert code is not None and code > 0, f"QEMU ended with {code} after the cut"
    return f"exit {code}"


def _loader_fails_and_says_why(guest: RestoredGuest, agent: TinyGuest) -> str:
    """The loader feeds QEMU: it must exit 1 naming the short file; the
    destination is left failed or postcopy-paused (recoverable: vCPUs wait for
    missing pages until a recovery) and answers QMP."""
    assert guest.loader is not None
    rc = guest.loader.wait(30)
    with pytest.raises(RestoreFailed, match="snapshot file is short"):
        guest.wait_loaded(timeout=5)
    assert rc == 1, f"loader exit {rc}"
    assert guest.loader_stats.get("error_name") == "E_FILE_SHORT", guest.loader_stats
    deadline = time.monotonic() + 30
    while True:
        status = guest.vm.qmp("query-migrate", timeout=5).get("status", "")
        if status in ("failed", "postcopy-paused"):
            return status
        assert time.monotonic() < deadline, f"destination still {status!r} after the loader quit"
        time.sleep(0.1)


# What a cut in the pages region after the guest started must cause.
AFTER_CUT: dict[str, Callable[[RestoredGuest, TinyGuest], str]] = {
    "qemu-fast": _qemu_fails_the_load,
    "loader-bridge": _loader_fails_and_says_why,
}


@pytest.mark.parametrize("strategy", LAZY)
def test_file_cut_after_the_guest_started(guest_factory: GuestFactory,
                                          vm_factory: VmFactory,
                                          snapshot_factory: SnapshotFactory,
                                          strategy: str) -> None:
    src = guest_factory("tiny", size=40 * MiB)
    snap = snapshot_factory(src.vm)
    main = parse(snap.path, offset=snap.offset).blocks[0]
    with _running(strategy, snap.path, snap.device_args, vm_factory, snap.offset) as dst:
        if not _still_loading(strategy, dst):
            pytest.skip(f"{strategy} finished loading before the file could be cut")
        os.truncate(snap.path, main.pages_range.start + main.pages_range.size // 2)
        assert src.params is not None
        outcome = AFTER_CUT[strategy](dst, TinyGuest(dst.vm, src.params))
        assert dst.vm.exitcode is None or dst.vm.exitcode > 0, outcome
        if dst.vm.is_running():
            assert dst.vm.status(), "QMP stopped answering"


# -- zero pages served as zeros ----------------------------------------------------------------


# Ways each lazy strategy can place a zero page: on the guest's fault, or eagerly.
ZERO_PATHS: dict[str, dict[str, tuple[str, ...]]] = {
    "qemu-fast": {"default": ()},
    "loader-bridge": {"on-request": ("--zero-pages", "requested"),
                      "eager": ("--zero-pages", "all")},
}


@pytest.mark.parametrize("strategy,loader_args", [
    pytest.param(p.values[0], args, id=f"{p.id}-{how}", marks=p.marks)
    for p in LAZY for how, args in ZERO_PATHS[p.values[0]].items()])
def test_zero_pages_served_as_zeros(guest_factory: GuestFactory, vm_factory: VmFactory,
                                    snapshot_factory: SnapshotFactory, fastsnap_workdir: Path,
                                    strategy: str, loader_args: tuple[str, ...]) -> None:
    """Stale non-zero bytes under clear bits in 64 zero pages of the pattern
    range: the running guest reads zeros there (its check faults on them
    while the eager path runs), and so does a dump once everything is in."""
    src = guest_factory("tiny", size=16 * MiB)
    tp = src.params
    assert tp is not None
    snap = snapshot_factory(src.vm)
    block = parse(snap.path, offset=snap.offset).blocks[0]
    bits = block.read_bitmap(snap.path)
    zeros = [p for p in range(tp.first_pfn, tp.first_pfn + tp.pages)
             if page_is_zero(tp, p)][::7][:64]
    assert len(zeros) == 64 and not any(bit_is_set(bits, p) for p in zeros)
    stale = fastsnap_workdir / "stale.img"
    sparse_copy(snap.path, stale)
    fd = os.open(stale, os.O_WRONLY)
    try:
        for pfn in zeros:
            os.pwrite(fd, b"\xee" * PAGE, block.page_offset(pfn))
    finally:
        os.close(fd)
    guest = restore(strategy, stale, snap.device_args, vm_factory, offset=snap.offset,
                    loader_args=loader_args)
    with guest:
        agent = TinyGuest(guest.vm, tp)
        assert agent.self_check(), f"stale data reached the guest: {agent.last_check_line()}"
        guest.wait_loaded()
        for pfn in zeros:
            assert guest.vm.memsave(pfn * PAGE, PAGE) == bytes(PAGE), f"page {pfn:#x}"
        _check_page_accounting(strategy, guest)


# -- hugetlbfs-backed guest RAM -----------------------------------------------------------------

HUGE_KIB = 2048
HUGE_MEM_MIB = 32                   # per QEMU: source and destination hold 32 pages together
HUGE_NEEDED = 2 * HUGE_MEM_MIB * 1024 // HUGE_KIB
HUGE_TINY = TinyParams(seed=0x2B16, start=0x400000, size=0x1400000)


@pytest.fixture
def huge_pages() -> Iterator[None]:
    """Enough 2 MiB huge pages for a source and a destination: as root,
    reserved for the test and released after it (xdist workers' reservations
    add up); otherwise the pool must have them free."""
    with hugepages_or_skip(HUGE_NEEDED):
        yield


def _huge_backend() -> list[str]:
    return ["-object", f"memory-backend-memfd,id=ram0,size={HUGE_MEM_MIB}M,hugetlb=on,"
                       f"hugetlbsize={HUGE_KIB}K", "-machine", "memory-backend=ram0"]


# What a hugetlbfs-backed guest must give, per strategy: None = restored
# exactly, else QEMU's words for a clean refusal.  The file does not record
# the destination's host page size: the bridge strategy reads it from the
# destination (HMP `info ramblock`) and passes `--host-page-size`, so the
# loader advises QEMU's page-size summary and places whole 2 MiB pages.
HUGE_REFUSAL: dict[str, str | None] = {
    "qemu-precopy": None,
    "qemu-fast": None,
    "loader-bridge": None,
    "loader-local": None,
}


@pytest.mark.parametrize("strategy", strategy_params())
def test_hugetlbfs_backed_ram(huge_pages: None, vm_factory: VmFactory,
                              snapshot_factory: SnapshotFactory, strategy: str) -> None:
    """A q35 tiny guest whose RAM is a 2 MiB-page hugetlbfs memfd: restored
    exactly, or refused in QEMU's words, never a hang or a signal."""
    src = vm_factory(machine="q35", mem=f"{HUGE_MEM_MIB}M",
                     extra_args=[*tiny_args(tiny_kernel(), HUGE_TINY), *_huge_backend()])
    TinyGuest(src, HUGE_TINY).wait_ready(60)
    snap = snapshot_factory(src)
    assert parse(snap.path, offset=snap.offset).blocks[0].name == "ram0"
    want = src.memory_digests(ram_ranges(HUGE_MEM_MIB * MiB))
    src.shutdown()  # frees its huge pages for the destination
    with attempt_restore(strategy, snap.path, snap.device_args, vm_factory,
                         offset=snap.offset, timeout=60) as attempt:
        assert attempt.signal is None and not attempt.hung, attempt.describe()
        refusal = HUGE_REFUSAL[strategy]
        if refusal is None:
            assert attempt.completed, attempt.describe()
            assert attempt.memory_digests(ram_ranges(HUGE_MEM_MIB * MiB)) == want, \
                f"{strategy} restored hugetlbfs-backed RAM unlike the source"
        else:
            assert not attempt.completed, f"{strategy} restored huge pages: update HUGE_REFUSAL"
            assert refusal in (attempt.failure or ""), attempt.describe()
