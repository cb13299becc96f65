"""Snapshots outlive QEMU upgrades: a snapshot saved by one QEMU version and
loaded by another, for every guest kind and restore strategy, both directions.

Runs when ``--qemu-binary-dst`` is a different binary.  ``old-to-new`` saves
with the older of the two binaries and loads with the newer; ``new-to-old`` the
reverse.  Guests use the run's versioned machine types (the report header's
"machine types" line): ``q35`` is pinned to a type both binaries have.
``loader-local`` is the native loader reading the saved file itself; its
direction names only which binary saved.

Where QEMU refuses a direction, the test expects exactly QEMU's refusal and is
a strict xfail quoting it (:data:`REFUSALS`): a QEMU that stops refusing shows
up as XPASS(strict), so the table cannot go stale silently.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from pytest_fastsnap.fixtures import Guest, GuestFactory, SnapshotFactory, VmFactory
from pytest_fastsnap.guests.linux import LinuxGuest
from pytest_fastsnap.guests.tiny import TinyGuest
from pytest_fastsnap.native.loader import run_loader
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.machine_types import FAMILIES
from pytest_fastsnap.qemu.migration import SavedSnapshot
from pytest_fastsnap.qemu.probe import QemuProbe
from pytest_fastsnap.restore.strategies import RestoredGuest, RestoreFailed, restore
from pytest_fastsnap.snapshot.digest import block_digest, restored_memory_range
from pytest_fastsnap.snapshot.format import parse

KINDS = ("tiny", "linux", "firmware")
DIRECTIONS = ("old-to-new", "new-to-old")
STRATEGIES = [
    pytest.param("qemu-precopy", id="qemu-precopy"),
    pytest.param("qemu-fast", id="qemu-fast"),  # skipped below unless the loading QEMU has it
    pytest.param("loader-bridge", id="loader-bridge", marks=pytest.mark.requires_uffd),
    pytest.param("loader-local", id="loader-local", marks=pytest.mark.requires_uffd),
]
FIRMWARE_MEM = 64 << 20


@dataclass(frozen=True)
class Refusal:
    """A direction QEMU refuses, with QEMU's own words (matched in the error)."""

    kinds: tuple[str, ...]
    direction: str
    said: str


# Directions QEMU refuses with the run's versioned machine types.  Between
# 10.0.2 and 10.2.2 there is none: every kind and strategy loads both ways.
# An entry here turns the matching tests into strict xfails quoting QEMU.
REFUSALS: tuple[Refusal, ...] = ()


class QemuRefused(Exception):
    """The load failed with exactly the refusal :data:`REFUSALS` expects."""


def _refusal(kind: str, direction: str, strategy: str) -> Refusal | None:
    if strategy == "loader-local":
        return None
    return next((r for r in REFUSALS if kind in r.kinds and r.direction == direction), None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if {"kind", "direction"} - set(metafunc.fixturenames):
        return
    params = []
    for kind in KINDS:
        for direction in DIRECTIONS:
            for strategy in STRATEGIES:
                name = strategy.values[0]
                marks = list(strategy.marks)
                refusal = _refusal(kind, direction, str(name))
                if refusal is not None:
                    marks.append(pytest.mark.xfail(
                        strict=True, raises=QemuRefused,
                        reason=f"QEMU refuses {kind} {direction}: {refusal.said!r}"))
                params.append(pytest.param(kind, direction, name, marks=marks,
                                           id=f"{kind}-{direction}-{name}"))
    metafunc.parametrize(("kind", "direction", "strategy"), params)


@dataclass(frozen=True)
class Direction:
    saver: str      # vm_factory role of the binary that saves
    loader: str     # vm_factory role of the binary that loads
    saver_probe: QemuProbe
    loader_probe: QemuProbe


@pytest.fixture
def cross(qemu_probe: QemuProbe, qemu_probe_dst: QemuProbe, direction: str) -> Direction:
    if qemu_probe.binary == qemu_probe_dst.binary:
        pytest.skip(f"cross-version: source and destination are both {qemu_probe.binary} "
                    f"({qemu_probe.version_str}); pass --qemu-binary-dst=<other QEMU>")
    by_role = {"src": qemu_probe, "dst": qemu_probe_dst}
    old, new = sorted(by_role, key=lambda role: by_role[role].version)
    if qemu_probe.version == qemu_probe_dst.version:
        old, new = "src", "dst"  # two builds of one version: source binary saves first
    saver, loader = (old, new) if direction == "old-to-new" else (new, old)
    return Direction(saver, loader, by_role[saver], by_role[loader])


def _boot(kind: str, guest_factory: GuestFactory, vm_factory: VmFactory, role: str
          ) -> Guest | QemuMachine:
    if kind == "firmware":
        vm = vm_factory(name="src", machine="q35", mem=f"{FIRMWARE_MEM >> 20}M", role=role)
        vm.wait_status("running")
        return vm
    return guest_factory(kind, role=role)


def _compared_range(vm: QemuMachine) -> tuple[int, int]:
    """Compared byte for byte between the source and the restored guest (or the
    loader's view of the file): guest-physical RAM from 1 MiB up to 32 MiB."""
    size = int(vm.qmp("query-memory-size-summary")["base-memory"])
    return 0x100000, min(size, 32 << 20) - 0x100000


@contextmanager
def _loaded_by(strategy: str, snap: SavedSnapshot, vm_factory: VmFactory, loader: str,
               refusal: Refusal | None) -> Iterator[RestoredGuest]:
    """The snapshot restored paused by the *loader* role's binary, every page in."""
    def destination(device_args: Sequence[str], *, paused: bool) -> QemuMachine:
        return vm_factory.destination_from_args(device_args, paused=paused, role=loader)

    guest: RestoredGuest | None = None
    try:
        guest = restore(strategy, snap.path, snap.device_args, destination,
                        offset=snap.offset, paused=True)
        guest.wait_loaded()
    except RestoreFailed as err:
        if refusal is not None:
            assert refusal.said in str(err), f"expected QEMU to say {refusal.said!r}: {err}"
            raise QemuRefused(refusal.said) from err
        raise
    try:
        yield guest
    finally:
        guest.close()


def _machine_of(device_args: Sequence[str]) -> str:
    args = list(device_args)
    return args[args.index("-machine") + 1]


@pytest.mark.fastsnap
def test_snapshot_across_versions(kind: str, direction: str, strategy: str, cross: Direction,
                                  guest_factory: GuestFactory, vm_factory: VmFactory,
                                  snapshot_factory: SnapshotFactory) -> None:
    if strategy == "qemu-fast" and not cross.loader_probe.fast_load:
        pytest.skip(f"{cross.loader_probe.binary} ({cross.loader_probe.version_str}) lacks "
                    f"'fast-snapshot-load' ({cross.loader_probe.fast_load_reason})")
    booted = _boot(kind, guest_factory, vm_factory, cross.saver)
    src = booted.vm if isinstance(booted, Guest) else booted
    assert src.binary == cross.saver_probe.binary
    machine = _machine_of(src.device_args)
    if machine != "microvm":  # the one machine without versioned types
        assert machine.startswith(tuple(FAMILIES.values())), f"{machine}: an alias, not pinned"
        assert machine in cross.loader_probe.machines, f"the loading QEMU lacks {machine}"
    pings = booted.agent.ping() if isinstance(booted, Guest) and kind == "linux" else None
    snap = snapshot_factory(src)
    compared = _compared_range(src)
    want = src.memsave(*compared)
    if strategy == "loader-local":
        _check_loader_local(snap, want, _main_block(machine), compared)
        return
    with _loaded_by(strategy, snap, vm_factory, cross.loader,
                    _refusal(kind, direction, strategy)) as dst:
        assert dst.vm.binary == cross.loader_probe.binary
        assert dst.vm.memsave(*compared) == want, "restored RAM differs from the source's"
        dst.vm.qmp("cont")
        _check_running(booted, dst.vm, pings)


def _main_block(machine: str) -> str:
    return "microvm.ram" if machine == "microvm" else "pc.ram"


def _check_loader_local(snap: SavedSnapshot, want: bytes, block: str,
                        compared: tuple[int, int]) -> None:
    """The native loader restores the other version's file: block digests as the
    Python reader's, and RAM as the source's."""
    result = run_loader(["load", str(snap.path), "--offset", str(snap.offset), "--mode", "lazy",
                         "--json"], timeout=120)
    assert result.returncode == 0, result.stderr
    parsed = parse(snap.path, offset=snap.offset)
    got = {b["id"]: b["sha256"] for b in json.loads(result.stdout)["blocks"]}
    assert got == {b.name: block_digest(parsed, b) for b in parsed.blocks}
    assert restored_memory_range(parsed, block, *compared) == want


def _check_running(booted: Guest | QemuMachine, dst: QemuMachine, pings: int | None) -> None:
    """The restored guest carries on: firmware runs, the tiny guest's pattern
    checks out, the Linux guest answers with the next ping and checks out."""
    if isinstance(booted, QemuMachine):
        dst.wait_status("running")
    elif isinstance(booted.agent, TinyGuest):
        assert TinyGuest(dst, booted.agent.params).self_check()
    else:
        agent = LinuxGuest(dst)
        assert pings is not None and agent.ping() == pings + 1
        assert agent.self_check()


@pytest.mark.fastsnap
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("strategy", [
    pytest.param("qemu-precopy"),
    pytest.param("loader-bridge", marks=pytest.mark.requires_uffd)])
@pytest.mark.xfail(strict=True, raises=QemuRefused,
                   reason="QEMU refuses a stream whose machine type is not its own resolution "
                          "of the alias: 'Machine type received is ... and local is ...'")
def test_alias_machine_is_refused_across_versions(direction: str, strategy: str,
                                                  cross: Direction, vm_factory: VmFactory,
                                                  snapshot_factory: SnapshotFactory) -> None:
    """Why the run pins versioned types: with ``-machine q35`` on both sides
    each binary uses its own newest type, and the loading QEMU refuses."""
    saved_as = cross.saver_probe.resolve_machine("q35")
    loaded_as = cross.loader_probe.resolve_machine("q35")
    if saved_as == loaded_as:
        pytest.skip(f"both binaries resolve q35 to {saved_as}: nothing to refuse")
    src = vm_factory(name="src", machine=saved_as, role=cross.saver)
    src.wait_status("running")
    snap = snapshot_factory(src)
    args = list(snap.device_args)
    args[args.index("-machine") + 1] = loaded_as
    said = f"Machine type received is '{saved_as}' and local is '{loaded_as}'"
    refused = dataclasses.replace(snap, device_args=tuple(args))
    with _loaded_by(strategy, refused, vm_factory, cross.loader,
                    Refusal(("firmware",), direction, said)):
        pass
