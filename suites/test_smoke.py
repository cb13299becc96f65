"""Smoke suite: save a stopped VM with mapped-ram, load it into a new QEMU,
and check memory and VM state came back."""

from __future__ import annotations

import pytest

from pytest_fastsnap.fixtures import SnapshotFactory, VmFactory

# Low RAM holds firmware state (BIOS data, IVT, option ROM shadow): real, non-zero content.
RANGES = [(0x0, 0x100000), (0xC0000, 0x40000), (0x100000, 0x200000)]


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_save_load_roundtrip(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                             restore_precopy, machine: str) -> None:  # type: ignore[no-untyped-def]
    src = vm_factory(machine=machine)
    src.wait_status("running", timeout=10)
    src.wait_memory_written(0, 0x100000)  # firmware state in low RAM: something to compare
    snap = snapshot_factory(src)
    before = src.memory_digests(RANGES)
    assert any(src.memsave(0, 0x100000)), "firmware left low RAM all zero: nothing to compare"
    regs_before = src.registers()

    dst = restore_precopy(snap)
    assert dst.status() == "paused"  # saved stopped, comes back stopped
    assert dst.memory_digests(RANGES) == before
    assert dst.registers() == regs_before
    dst.qmp("cont")
    assert dst.wait_status("running", timeout=10) == "running"
