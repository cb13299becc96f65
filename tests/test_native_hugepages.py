"""The local loader restoring into 2 MiB hugetlb pages (`load --hugepages`):
whole host pages placed with one UFFDIO_COPY each, memory identical to the
file in every mode.  No QEMU: a synthetic snapshot whose first block is not
a multiple of 2 MiB (its last host page is partly past the block)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_fastsnap.native.hugepages import (
    NR_HUGEPAGES,
    HugePagesUnavailable,
    free_hugepages,
    hugepages_or_skip,
    reserved_hugepages,
)
from pytest_fastsnap.native.loader import run_loader
from pytest_fastsnap.snapshot.writer import write_snapshot

NEEDED = 8      # 2 MiB pages: 3 + 1 for the blocks below, twice for slack


@pytest.fixture
def hugepages() -> Iterator[None]:
    with hugepages_or_skip(NEEDED):
        yield


@pytest.mark.parametrize("build", ["release", "asan"])
@pytest.mark.parametrize("mode,access", [("lazy", "random"), ("lazy", "all"),
                                         ("fault-only", "random"), ("eager", "none"),
                                         ("sync", "none")])
def test_hugepage_restore_memory_identical(tmp_path: Path, hugepages: None, build: str,
                                           mode: str, access: str) -> None:
    pages = 1282    # 5 MiB + 8 KiB: three host pages, the last mostly past the block
    ram = b"".join(i.to_bytes(4, "little") * 1024 if i % 5 else bytes(4096)
                   for i in range(pages))
    vram = bytes(range(256)) * 16 * 300
    snap = write_snapshot(tmp_path / "s.img", "pc", [("pc.ram", ram), ("vga.vram", vram)])
    res = run_loader(["load", str(snap), "--mode", mode, "--access", access, "--threads", "3",
                      "--hugepages", "--json"], variant=build, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [b["sha256"] for b in out["blocks"]] == [hashlib.sha256(ram).hexdigest(),
                                                    hashlib.sha256(vram).hexdigest()]
    st = out["stats"]
    assert st["pages_loaded"] == st["total_pages"] == pages + 300
    assert st["double_loads"] == 0
    if mode == "fault-only":
        # Every fault places a whole host page: each of the 3 touchers can fault at
        # most once per host page (4 of them) in the access pass and once in the
        # completion pass, against 1,582 faults if pages were placed 4 KiB at a time.
        assert 1 <= st["faults"] <= 4 * 3 * 2


def test_hugepages_unavailable_is_named(tmp_path: Path) -> None:
    """A block larger than the huge page pool (64 GiB, sparse file) fails
    cleanly at mmap with the sysctl named, not with a SIGBUS on a fault."""
    snap = write_snapshot(tmp_path / "s.img", "pc", [("pc.ram", 64 << 30, {})])
    res = run_loader(["load", str(snap), "--mode", "lazy", "--hugepages"], timeout=60)
    assert res.returncode == 2, res.stderr
    assert "E_UNSUPPORTED" in res.stderr and "nr_hugepages" in res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="resizing /proc/sys/vm/nr_hugepages needs root")
def test_overlapping_reservations_each_keep_their_pages_and_give_back_all() -> None:
    """Two reservations that overlap (two xdist workers) each hold their own
    pages while inside, whichever ends first, and the pool is back to its
    size once both ended: one that took another's free pages for its own, or
    wrote back the size it first saw, fails here."""
    size = int(NR_HUGEPAGES.read_text())
    needed = free_hugepages() + 1      # more than the pool has free: both must add
    first, second = reserved_hugepages(needed), reserved_hugepages(needed)
    try:
        first.__enter__()
    except HugePagesUnavailable as e:
        pytest.skip(str(e))
    try:
        second.__enter__()
    except HugePagesUnavailable as e:
        first.__exit__(None, None, None)
        pytest.skip(str(e))
    try:
        assert free_hugepages() >= 2 * needed
        first.__exit__(None, None, None)
        assert free_hugepages() >= needed, "the second lost its pages when the first ended"
    finally:
        second.__exit__(None, None, None)
    assert int(NR_HUGEPAGES.read_text()) == size
