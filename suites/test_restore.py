"""Restore correctness: for every restore strategy this machine supports, the
restored guest's memory equals the source's, its device state matches, and it
carries on running.

Strategies (``pytest_fastsnap.restore.table``): ``qemu-precopy`` (stock full
load), ``qemu-fast`` (QEMU's own fast snapshot load, where the binary has it),
``loader-bridge`` (the native loader as a postcopy source for a stock
destination) and ``loader-local`` (the native loader restoring RAM into its
own memory through userfaultfd, checked by digest against the pure-Python
reader, and through it against the source's memory and the guest's pattern).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pytest_fastsnap.fixtures import Guest, GuestFactory, SnapshotFactory, VmFactory
from pytest_fastsnap.guests.pattern import expected_range
from pytest_fastsnap.native.loader import run_loader
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.migration import SavedSnapshot
from pytest_fastsnap.restore.attempt import attempt_restore
from pytest_fastsnap.restore.strategies import RestoredGuest, restore
from pytest_fastsnap.restore.table import strategy_params
from pytest_fastsnap.snapshot.digest import block_digest, restored_memory_range
from pytest_fastsnap.snapshot.format import parse

from reference_snapshot import ram_ranges

# Strategies with a QEMU destination: memory, device state, the guest runs on.
WITH_GUEST = strategy_params(destination=True)
# Strategies without one (loader-local): memory, by digest against the file
# and through the file's Python reader against the source.
WITHOUT_GUEST = strategy_params(destination=False)


def memory_digest(vm: QemuMachine, size: int) -> dict[str, str]:
    """sha256 of guest RAM [0, size) outside the firmware window, per 16 MiB."""
    return vm.memory_digests(ram_ranges(size))


@contextmanager
def restored(strategy: str, snap: SavedSnapshot, vm_factory: VmFactory
             ) -> Iterator[RestoredGuest]:
    """The snapshot restored paused (so device state can be compared before
    the guest runs on), every page loaded; loader and QEMU gone afterwards."""
    guest = restore(strategy, snap.path, snap.device_args, vm_factory, offset=snap.offset,
                    paused=True)
    try:
        guest.wait_loaded()
        yield guest
    finally:
        guest.close()


def _mem_bytes(vm: QemuMachine) -> int:
    return int(vm.qmp("query-memory-size-summary")["base-memory"])


@pytest.mark.parametrize("strategy", WITH_GUEST)
@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_firmware_guest(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                        strategy: str, machine: str) -> None:
    src = vm_factory(machine=machine, mem="64M")
    src.wait_status("running")
    snap = snapshot_factory(src)
    want_mem = memory_digest(src, 64 << 20)
    want_regs = src.registers()
    with restored(strategy, snap, vm_factory) as dst:
        assert dst.vm.status() in ("paused", "inmigrate", "postmigrate")
        assert dst.vm.registers() == want_regs
        assert memory_digest(dst.vm, 64 << 20) == want_mem
        dst.vm.qmp("cont")
        dst.vm.wait_status("running")


@pytest.mark.parametrize("strategy", WITH_GUEST)
def test_tiny_guest(guest: Guest, vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                    strategy: str) -> None:
    src = guest.vm
    size = _mem_bytes(src)
    snap = snapshot_factory(src)
    want_mem, want_regs = memory_digest(src, size), src.registers()
    with restored(strategy, snap, vm_factory) as dst:
        assert dst.vm.registers() == want_regs
        assert memory_digest(dst.vm, size) == want_mem
        dst.vm.qmp("cont")
        assert dst.self_check()


@pytest.mark.parametrize("strategy", WITH_GUEST)
def test_linux_guest(guest_factory: GuestFactory, vm_factory: VmFactory,
                     snapshot_factory: SnapshotFactory, strategy: str) -> None:
    src = guest_factory("linux")
    pings = src.agent.ping()  # type: ignore[union-attr]
    snap = snapshot_factory(src.vm)
    want_regs = src.vm.registers()
    with restored(strategy, snap, vm_factory) as dst:
        assert dst.vm.registers() == want_regs
        dst.vm.qmp("cont")
        assert dst.agent.ping() == pings + 1
        assert dst.self_check()


@pytest.mark.parametrize("strategy", WITHOUT_GUEST)
@pytest.mark.parametrize("kind", ["firmware-q35", "firmware-pc", "tiny", "linux"])
def test_memory_without_a_destination(vm_factory: VmFactory, guest_factory: GuestFactory,
                                      snapshot_factory: SnapshotFactory, strategy: str,
                                      kind: str) -> None:
    """Every guest the destination strategies restore, restored without QEMU:
    each block's memory equals the file's (Python reader), and through that
    reader the main RAM block equals the source's memory (below 4 GiB it maps
    1:1 from 0)."""
    if kind.startswith("firmware-"):
        src = vm_factory(machine=kind.split("-", 1)[1], mem="64M")
        src.wait_status("running")
    else:
        src = guest_factory(kind).vm
    size = _mem_bytes(src)
    snap = snapshot_factory(src)
    want = memory_digest(src, size)
    with attempt_restore(strategy, snap.path, snap.device_args, vm_factory,
                         offset=snap.offset) as restored:
        assert restored.completed, restored.describe()
        assert restored.memory_digests(ram_ranges(size)) == want


@pytest.mark.requires_uffd
@pytest.mark.parametrize("mode", ["lazy", "fault-only", "eager", "sync"])
def test_loader_local(guest: Guest, snapshot_factory: SnapshotFactory, mode: str) -> None:
    """The native loader's restored memory, block by block, equals the Python
    reader's, and the guest's pattern range inside it equals the pattern."""
    snap = snapshot_factory(guest.vm)
    result = run_loader(["load", str(snap.path), "--offset", str(snap.offset), "--mode", mode,
                         "--access", "random", "--threads", "2", "--json"], timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    parsed = parse(snap.path, offset=snap.offset)
    got = {b["id"]: b["sha256"] for b in out["blocks"]}
    assert got == {b.name: block_digest(parsed, b) for b in parsed.blocks}
    tp = guest.params
    assert tp is not None
    assert restored_memory_range(parsed, "microvm.ram", tp.start, tp.size) == \
        expected_range(tp, tp.start, tp.size)
