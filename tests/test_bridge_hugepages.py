"""The bridge serving a destination whose guest RAM is 2 MiB hugetlb pages
(``memory-backend-memfd,hugetlb=on``): ``serve --host-page-size
pc.ram=2097152`` advertises the page-size summary and the block's page size,
discards a whole host page, and sends every host page's 512 target pages
consecutively, on request and eagerly.  Memory must be identical."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from pytest_fastsnap.fixtures import SnapshotFactory, VmFactory
from pytest_fastsnap.guests.fill import fill_guest_ram
from pytest_fastsnap.native.hugepages import hugepages_or_skip
from pytest_fastsnap.restore import RestoredGuest, restore

MEM_MIB = 64
HUGE = 2 << 20


@pytest.fixture
def hugepages() -> Iterator[None]:
    with hugepages_or_skip(2 * MEM_MIB // 2 + 4):     # source + destination
        yield


def hugetlb_args(mem_mib: int) -> list[str]:
    return ["-object", f"memory-backend-memfd,id=pc.ram,size={mem_mib}M,hugetlb=on,"
            f"hugetlbsize={HUGE}", "-machine", "memory-backend=pc.ram"]


@pytest.mark.parametrize("zero_pages", ["requested", "all"])
def test_hugetlb_destination_memory_identical(vm_factory: VmFactory,
                                              snapshot_factory: SnapshotFactory,
                                              hugepages: None, zero_pages: str) -> None:
    src = vm_factory(name="src", mem=f"{MEM_MIB}M", extra_args=hugetlb_args(MEM_MIB))
    src.wait_status("running")
    time.sleep(0.2)
    mem = MEM_MIB << 20
    data = fill_guest_ram(src, "q35", mem)
    snap = snapshot_factory(src)
    want = src.memory_digests([(0, mem)])
    want_data = src.memory_digests(data)
    src.shutdown()
    g: RestoredGuest | None = None
    try:
        g = restore("loader-bridge", snap.path, snap.device_args, vm_factory,
                    offset=snap.offset, paused=True,
                    loader_args=("--host-page-size", f"pc.ram={HUGE}",
                                 "--zero-pages", zero_pages))
        g.wait_loaded()
        stats = g.loader_stats
        assert stats["ok"] and stats["shut"] == 0, stats
        assert stats["double_sends"] == 0
        # every page of pc.ram goes out (zero ones too: a host page is whole)
        assert stats["pages_data"] + stats["pages_zero"] >= mem // 4096
        assert g.vm.memory_digests([(0, mem)]) == want
        assert g.vm.memory_digests(data) == want_data
        g.vm.qmp("cont")
        g.vm.wait_status("running")
    finally:
        if g is not None:
            g.close(kill=True)
