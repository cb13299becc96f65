"""Bitmap correctness: bit i of a block is set exactly when page i held
non-zero data at the end of the save; data under a clear bit is ignored by
every loader; bitmap size, bit order and page alignment are as the format says.

Oracles: the tiny guest's pattern (pure Python, independent of QEMU) for its
range, and a dump of the source's memory (taken once the save completed, when
the source is stopped) for the whole block.  The tiny guest runs on microvm,
whose main RAM block maps 1:1 onto guest-physical addresses from 0.

Every save variant and the data-under-a-clear-bit file also go through every
restore strategy (``pytest_fastsnap.restore.table``), judged on the restored
memory: the destination's, or for ``loader-local`` the loader's digests
against the Python reader's.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from pytest_fastsnap.fixtures import Guest, GuestFactory, SnapshotFactory, VmFactory
from pytest_fastsnap.guests.pattern import page_content, page_is_zero
from pytest_fastsnap.guests.tiny import TinyGuest
from pytest_fastsnap.qemu.migration import SavedSnapshot
from pytest_fastsnap.restore.attempt import attempt_restore
from pytest_fastsnap.restore.table import strategy_params
from pytest_fastsnap.snapshot import mutate
from pytest_fastsnap.snapshot.bitmap import bit_is_set, diff_pages, expected_bitmap
from pytest_fastsnap.snapshot.digest import range_digests, read_page, restored_memory_range
from pytest_fastsnap.snapshot.format import (
    Block,
    Snapshot,
    bitmap_size_for,
    parse,
    pread_padded,
    roundup,
)

from reference_snapshot import ram_ranges

PAGE = 4096
MAIN_BLOCK = "microvm.ram"
# Guest-physical 0xa0000-0xfffff shows firmware (the BIOS alias) in a dump,
# not the RAM block underneath, so the dump is no oracle there.
ROM_WINDOW = range(0xA0, 0x100)


def _outside_rom(pages: list[int]) -> list[int]:
    return [p for p in pages if p not in ROM_WINDOW]


def _same_ram(restored: bytes, dump: bytes) -> bool:
    lo, hi = ROM_WINDOW.start * PAGE, ROM_WINDOW.stop * PAGE
    return restored[:lo] == dump[:lo] and restored[hi:] == dump[hi:]

SAVES = [
    pytest.param({}, {}, id="single"),
    pytest.param({"multifd": True}, {}, id="multifd"),
    pytest.param({}, {"zero-page-detection": "none"}, id="single-zpd-none"),
    pytest.param({"multifd": True}, {"zero-page-detection": "none"}, id="multifd-zpd-none"),
]


def _main_block(snap: Snapshot) -> Block:
    return snap.block(MAIN_BLOCK)


def _save(guest: Guest, snapshot_factory: SnapshotFactory, caps: dict[str, bool],
          params: dict[str, Any], live: bool) -> tuple[SavedSnapshot, Snapshot, bytes]:
    saved = snapshot_factory(guest.vm, capabilities=caps, parameters=params, live=live)
    snap = parse(saved.path, offset=saved.offset)
    block = _main_block(snap)
    # After `migrate` completes the source is stopped: its memory now is what
    # the save had to capture.
    assert guest.vm.status() in ("paused", "postmigrate")
    dump = guest.vm.memsave(0, block.used_length.value)
    return saved, snap, dump


@pytest.mark.parametrize("caps,params", SAVES)
def test_stopped_save_bitmap_matches_pattern_and_dump(
        guest: Guest, snapshot_factory: SnapshotFactory, caps: dict[str, bool],
        params: dict[str, Any]) -> None:
    saved, snap, dump = _save(guest, snapshot_factory, caps, params, live=False)
    block = _main_block(snap)
    bitmap = block.read_bitmap(saved.path)
    zpd_none = params.get("zero-page-detection") == "none"
    tp = guest.params
    assert tp is not None

    # Independent oracle: the pattern says which pages of the range are zero.
    for pfn in range(tp.first_pfn, tp.first_pfn + tp.pages):
        want = zpd_none or not page_is_zero(tp, pfn)
        assert bit_is_set(bitmap, pfn) == want, (
            f"page {pfn:#x}: bit {'clear' if want else 'set'}, pattern says "
            f"{'zero' if page_is_zero(tp, pfn) else 'data'} ({saved.uri})")
        if want and not page_is_zero(tp, pfn):
            assert read_page(snap, block, pfn) == page_content(tp, pfn), f"page {pfn:#x}"

    # Whole-block oracle: the source memory dump.
    if zpd_none:
        assert diff_pages(bitmap, b"\xff" * len(bitmap), block.num_pages) == []
    else:
        assert _outside_rom(diff_pages(bitmap, expected_bitmap(dump, PAGE, block.num_pages),
                                       block.num_pages)) == []
    assert _same_ram(restored_memory_range(snap, block, 0, len(dump)), dump)


@pytest.mark.parametrize("caps", [pytest.param({}, id="single"),
                                  pytest.param({"multifd": True}, id="multifd")])
def test_live_save_of_a_dirtying_guest(guest_factory: GuestFactory,
                                       snapshot_factory: SnapshotFactory,
                                       caps: dict[str, bool]) -> None:
    """Pages rewritten during a live save end with the bit and data of their
    last transmission, which is the memory at the end of the save."""
    guest = guest_factory("tiny", mode="dirty", size=8 << 20)
    saved, snap, dump = _save(guest, snapshot_factory, caps, {}, live=True)
    block = _main_block(snap)
    bitmap = block.read_bitmap(saved.path)
    assert _outside_rom(diff_pages(bitmap, expected_bitmap(dump, PAGE, block.num_pages),
                                   block.num_pages)) == []
    assert _same_ram(restored_memory_range(snap, block, 0, len(dump)), dump)
    assert saved.stats.get("dirty-sync-count", 0) >= 2


def test_layout_size_order_alignment(guest: Guest, snapshot_factory: SnapshotFactory) -> None:
    saved, snap, _ = _save(guest, snapshot_factory, {}, {}, live=False)
    for block in snap.blocks:
        hdr = block.header
        assert block.num_pages == block.used_length.value // PAGE
        assert block.bitmap_size == bitmap_size_for(block.num_pages) == \
            -(-block.num_pages // 64) * 8
        assert hdr.bitmap_offset.value == hdr.end, f"{block.name}: bitmap not right after header"
        assert hdr.pages_offset.value == roundup(hdr.bitmap_offset.value + block.bitmap_size,
                                                 1 << 20), f"{block.name}: pages_offset"
        assert hdr.pages_offset.value % (1 << 20) == 0
    # Bit order: page i is bit i % 8 of byte i // 8 (a little-endian long array).
    tp = guest.params
    assert tp is not None
    block = _main_block(snap)
    raw = block.read_bitmap(saved.path)
    pfn = next(p for p in range(tp.first_pfn, tp.first_pfn + tp.pages)
               if not page_is_zero(tp, p) and page_is_zero(tp, p + 1))
    assert raw[pfn // 8] >> (pfn % 8) & 1 == 1
    assert raw[(pfn + 1) // 8] >> ((pfn + 1) % 8) & 1 == 0


@pytest.mark.parametrize("strategy", strategy_params())
@pytest.mark.parametrize("caps,params", SAVES)
def test_every_strategy_restores_the_dump(guest: Guest, snapshot_factory: SnapshotFactory,
                                          vm_factory: VmFactory, caps: dict[str, bool],
                                          params: dict[str, Any], strategy: str) -> None:
    """Whatever the save variant (multifd, no zero-page detection: every bit
    set over zeros), every strategy restores the source's memory."""
    saved, _, dump = _save(guest, snapshot_factory, caps, params, live=False)
    ranges = ram_ranges(len(dump))
    with attempt_restore(strategy, saved.path, saved.device_args, vm_factory,
                         offset=saved.offset) as restored:
        assert restored.completed, restored.describe()
        assert restored.memory_digests(ranges) == \
            range_digests(lambda a, n: dump[a:a + n], ranges), (
                f"{strategy} restored a {saved.uri} save unlike the source's memory")


@pytest.mark.parametrize("strategy", strategy_params())
def test_data_under_a_clear_bit_is_ignored(guest: Guest, snapshot_factory: SnapshotFactory,
                                           vm_factory: VmFactory, fastsnap_workdir: Any,
                                           strategy: str) -> None:
    """Stale bytes in the page region at a clear bit must load as zeros."""
    saved, snap, _ = _save(guest, snapshot_factory, {}, {}, live=False)
    tp = guest.params
    assert tp is not None
    pfn = next(p for p in range(tp.first_pfn, tp.first_pfn + tp.pages) if page_is_zero(tp, p))
    block = _main_block(snap)
    assert not bit_is_set(block.read_bitmap(saved.path), pfn)
    dirty = fastsnap_workdir / "stale.img"
    mutate.write_page_data(saved.path, dirty, MAIN_BLOCK, pfn, b"\xee" * PAGE,
                           stream_offset=saved.offset)
    stale = parse(dirty, offset=saved.offset)
    assert pread_padded(dirty, block.page_offset(pfn), PAGE) == b"\xee" * PAGE
    assert restored_memory_range(stale, MAIN_BLOCK, pfn * PAGE, PAGE) == bytes(PAGE)
    page = (pfn * PAGE, PAGE)
    with attempt_restore(strategy, dirty, saved.device_args, vm_factory,
                         offset=saved.offset) as restored:
        assert restored.completed, restored.describe()
        assert restored.memory_digests([page]) == \
            {f"{page[0]:#x}+{PAGE:#x}": hashlib.sha256(bytes(PAGE)).hexdigest()}, (
                f"{strategy} loaded the stale data under a clear bit")
        if restored.guest is not None:  # a destination: the guest runs on and agrees
            restored.guest.vm.qmp("cont")
            assert TinyGuest(restored.guest.vm, tp).self_check()
