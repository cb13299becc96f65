"""The Python snapshot reader against files QEMU wrote (needs --fastsnap).

Checks the layout rules on real saves (q35, pc, offset=, multifd,
zero-page-detection=none), that the writer re-serialises them byte for byte,
that restored content equals the guest's memory (pmemsave), and that every
standard mutation of a real file is rejected with its expected name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from pytest_fastsnap.fixtures import SnapshotFactory, VmFactory
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.migration import SavedSnapshot
from pytest_fastsnap.snapshot import bitmap as bm
from pytest_fastsnap.snapshot.digest import (
    block_bytes,
    block_digest,
    iter_restored,
    restored_memory_range,
    sha256_of_file_content,
)
from pytest_fastsnap.snapshot.errors import FormatError
from pytest_fastsnap.snapshot.format import ALIGN, HEADER_SIZE, Snapshot, parse, roundup
from pytest_fastsnap.snapshot.mutate import all_header_mutations
from pytest_fastsnap.snapshot.writer import spec_from_snapshot, write_spec

pytestmark = pytest.mark.fastsnap

VARIANTS: dict[str, dict[str, Any]] = {
    "q35": {"machine": "q35"},
    "pc": {"machine": "pc"},
    "q35-offset": {"machine": "q35", "offset": 0x10000},
    "q35-multifd": {"machine": "q35", "capabilities": {"multifd": True},
                    "parameters": {"multifd-channels": 2}},
    "q35-zero-page-none": {"machine": "q35", "parameters": {"zero-page-detection": "none"}},
}
ROM_WINDOW = (0xA0000, 0x100000)
LOW_RAM = [(0x0, 0xA0000), (0x100000, 0x100000)]  # guest-physical == pc.ram offset here


def _save(vm_factory: VmFactory, snapshot_factory: SnapshotFactory, variant: str
          ) -> tuple[QemuMachine, SavedSnapshot, Snapshot]:
    opts = dict(VARIANTS[variant])
    vm = vm_factory(machine=opts.pop("machine"))
    vm.wait_status("running", timeout=10)
    vm.wait_memory_written(*LOW_RAM[0])  # firmware state in low RAM: something to compare
    saved = snapshot_factory(vm, **opts)
    return vm, saved, parse(saved.path, saved.offset)


def _mem_bytes(snap: Snapshot) -> int:
    return snap.block("pc.ram").used_length.value


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qemu_file_layout(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                          variant: str) -> None:
    _, saved, snap = _save(vm_factory, snapshot_factory, variant)
    assert snap.ok, snap.problems
    assert snap.stream_offset == saved.offset and snap.header is not None
    assert snap.header.magic.offset == saved.offset
    machine = snap.machine or ""
    assert machine.startswith("pc-q35-" if VARIANTS[variant]["machine"] == "q35"
                              else "pc-i440fx-"), machine
    assert snap.configuration is not None and "mapped-ram" in \
        snap.configuration.capability_names
    assert snap.ram is not None
    assert sum(b.used_length.value for b in snap.blocks) == snap.ram.total
    assert _mem_bytes(snap) == 64 << 20
    for prev, blk in zip((None, *snap.blocks), snap.blocks, strict=False):
        if prev is not None:
            assert blk.offset == prev.header.pages_offset.value + prev.used_length.value
        hdr = blk.header
        assert hdr.version.value == 1 and hdr.page_size.value == 4096
        assert hdr.bitmap_offset.value == hdr.offset + HEADER_SIZE
        assert hdr.pages_offset.value == roundup(hdr.bitmap_offset.value + blk.bitmap_size,
                                                 ALIGN)
        assert blk.bitmap_size == roundup(blk.num_pages, 64) // 8
    # PART records, SWITCHOVER_START (10.0 machine types), END; then devices, EOF, vmdesc
    kinds = [getattr(r, "kind", "CMD") for r in snap.records]
    assert kinds[-1] == "END" and "PART" in kinds
    assert snap.switchover_start is not None and snap.switchover_start.cmd.value == 0x0B
    assert snap.device_state is not None and snap.device_state.size > 0
    assert snap.vmdesc is not None and snap.vmdesc.data["page_size"] == 4096
    assert snap.vmdesc.json_range.end == snap.file_size
    assert snap.eof_offset == snap.device_state.end == snap.vmdesc.offset - 1
    names = {d["name"] for d in snap.vmdesc.data["devices"]}
    assert "ram" not in names and {"timer", "cpu"} <= names


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qemu_file_reserialises_identically(vm_factory: VmFactory,
                                            snapshot_factory: SnapshotFactory,
                                            fastsnap_workdir: Path, variant: str) -> None:
    _, _, snap = _save(vm_factory, snapshot_factory, variant)
    copy = write_spec(fastsnap_workdir / "rewritten.img", spec_from_snapshot(snap))
    assert copy.stat().st_size == snap.file_size
    assert sha256_of_file_content(copy) == sha256_of_file_content(snap.path)
    assert copy.stat().st_blocks <= snap.path.stat().st_blocks + 64, "holes were filled"
    again = parse(copy, snap.stream_offset)
    assert again.blocks == snap.blocks and again.ram == snap.ram
    assert again.device_state == snap.device_state and again.vmdesc == snap.vmdesc


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_restored_memory_equals_pmemsave(vm_factory: VmFactory,
                                         snapshot_factory: SnapshotFactory,
                                         variant: str) -> None:
    vm, _, snap = _save(vm_factory, snapshot_factory, variant)  # saved stopped: RAM is frozen
    assert any(vm.memsave(*LOW_RAM[0])), "firmware left low RAM all zero: nothing compared"
    for start, size in LOW_RAM:
        guest = vm.memsave(start, size)
        assert hashlib.sha256(restored_memory_range(snap, "pc.ram", start, size)).hexdigest() \
            == hashlib.sha256(guest).hexdigest(), f"range {start:#x}+{size:#x}"
    whole = vm.memsave(0, _mem_bytes(snap))
    blk = snap.block("pc.ram")
    restored = block_bytes(snap, blk)
    assert hashlib.sha256(restored).hexdigest() == block_digest(snap, "pc.ram")
    # Guest-physical 0xa0000-0xfffff shows VGA/ROM or shadow RAM depending on
    # how far the firmware got (PAM); outside it, the dump is the RAM block.
    assert restored[:ROM_WINDOW[0]] == whole[:ROM_WINDOW[0]]
    assert restored[ROM_WINDOW[1]:] == whole[ROM_WINDOW[1]:]
    file_bits = snap.bitmap(blk)
    if variant == "q35-zero-page-none":
        assert bm.popcount(file_bits, blk.num_pages) == blk.num_pages
    else:
        window = range(ROM_WINDOW[0] // 4096, ROM_WINDOW[1] // 4096)
        diff = bm.diff_pages(file_bits, bm.expected_bitmap(whole), blk.num_pages)
        assert [p for p in diff if p not in window] == []
        assert 0 < bm.popcount(file_bits) < blk.num_pages
    # chunked streaming gives the same bytes as one read
    assert b"".join(bytes(c) for c in iter_restored(snap, blk, 0, 3 << 20, chunk=4096)) == \
        restored[:3 << 20]


def test_every_standard_mutation_of_a_qemu_file(vm_factory: VmFactory,
                                                snapshot_factory: SnapshotFactory,
                                                fastsnap_workdir: Path) -> None:
    _, saved, snap = _save(vm_factory, snapshot_factory, "q35-offset")
    mutations = list(all_header_mutations(snap))
    assert len(mutations) > 100
    assert {m.block for m in mutations if m.block} == {b.name for b in snap.blocks}
    wrong = []
    for m in mutations:
        path = fastsnap_workdir / "mutated.img"
        m.apply(path)
        try:
            parse(path, saved.offset)
            got = None
        except FormatError as err:
            got = err.name
        if got != m.expected_error:
            wrong.append(f"{m}: expected {m.expected_error}, got {got}")
        assert m.expected_error in parse(path, saved.offset, lenient=True).problem_names()
        path.unlink()
    assert wrong == []
