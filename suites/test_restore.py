"""Restore correctness: for every restore strategy this machine supports, the
restored guest's memory equals the source's, its device state matches, and it
carries on running."""

from __future__ import annotations

import hashlib

import pytest

from pytest_fastsnap.fixtures import SnapshotFactory, VmFactory
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.migration import (
    SavedSnapshot,
    fast_load_snapshot,
    load_snapshot,
    wait_migration,
)

CHUNK = 16 << 20


def memory_digest(vm: QemuMachine, size: int) -> list[str]:
    """sha256 per 16 MiB of guest-physical memory [0, size)."""
    return [hashlib.sha256(vm.memsave(a, min(CHUNK, size - a))).hexdigest()
            for a in range(0, size, CHUNK)]


def restore(strategy: str, vm_factory: VmFactory, snap: SavedSnapshot) -> QemuMachine:
    """Bring *snap* back in a new QEMU with *strategy*; return it fully loaded."""
    dst = vm_factory.destination(snap)
    if strategy == "qemu-precopy":
        load_snapshot(dst, snap.path, offset=snap.offset)
    elif strategy == "qemu-fast":
        fast_load_snapshot(dst, snap.path, offset=snap.offset)
        wait_migration(dst, "fast load (eager part)", 120)
    else:  # pragma: no cover - parametrisation below lists every strategy
        raise AssertionError(strategy)
    return dst


STRATEGIES = [
    pytest.param("qemu-precopy", id="qemu-precopy"),
    pytest.param("qemu-fast", id="qemu-fast",
                 marks=pytest.mark.qemu_feature("fast-snapshot-load")),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_firmware_guest(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                        strategy: str, machine: str) -> None:
    src = vm_factory(machine=machine, mem="64M")
    src.wait_status("running")
    snap = snapshot_factory(src)
    want_mem = memory_digest(src, 64 << 20)
    want_regs = src.registers()

    dst = restore(strategy, vm_factory, snap)
    assert dst.status() == "paused"
    assert dst.registers() == want_regs
    assert memory_digest(dst, 64 << 20) == want_mem
    dst.qmp("cont")
    dst.wait_status("running")
