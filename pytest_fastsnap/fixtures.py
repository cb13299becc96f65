"""Fixtures: configuration, probe, per-test directories, QEMU machines, snapshots.

One factory owns every QEMU a test starts; its teardown stops them in reverse
order (destination before source), attaches their logs to a failure report
and removes the test's directory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from pytest_fastsnap import workdirs
from pytest_fastsnap.config import FastsnapConfig, mem_bytes
from pytest_fastsnap.guests import linux, tiny
from pytest_fastsnap.guests.linux import LinuxGuest, linux_args, linux_image
from pytest_fastsnap.guests.tiny import TinyGuest, TinyParams, tiny_args, tiny_kernel
from pytest_fastsnap.plugin_state import (
    ACCEL_KEY,
    ARTIFACTS_PROPERTY,
    CONFIG_KEY,
    MACHINE_TYPES_KEY,
    MACHINES_KEY,
    PHASE_REPORTS_KEY,
    PROBE_DST_KEY,
    PROBE_KEY,
    SESSION_DIR_KEY,
)
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.machine_types import MachineTypes
from pytest_fastsnap.qemu.migration import SavedSnapshot, load_snapshot, save_snapshot
from pytest_fastsnap.qemu.probe import QemuProbe
from pytest_fastsnap.restore.manifest import write_manifest
from pytest_fastsnap.verdict import Verdict


@pytest.fixture(scope="session")
def fastsnap_config(pytestconfig: pytest.Config) -> FastsnapConfig:
    """The resolved plugin options; skips the test when --fastsnap is off."""
    config = pytestconfig.stash[CONFIG_KEY]
    if not config.enabled:
        pytest.skip("boots QEMU: pass --fastsnap (or set FASTSNAP=1) to run it")
    return config


@pytest.fixture(scope="session")
def qemu_probe(fastsnap_config: FastsnapConfig, pytestconfig: pytest.Config) -> QemuProbe:
    """What the QEMU binary under test can do (version, capabilities, fast load)."""
    return pytestconfig.stash[PROBE_KEY]


@pytest.fixture(scope="session")
def qemu_probe_dst(fastsnap_config: FastsnapConfig, pytestconfig: pytest.Config) -> QemuProbe:
    """The probe of the destination binary (--qemu-binary-dst, else the same binary)."""
    return pytestconfig.stash[PROBE_DST_KEY]


@pytest.fixture(scope="session")
def fastsnap_accel(fastsnap_config: FastsnapConfig, pytestconfig: pytest.Config) -> str:
    """The accelerator every guest uses (see the report header for why)."""
    return pytestconfig.stash[ACCEL_KEY][0]


@pytest.fixture
def fastsnap_workdir(request: pytest.FixtureRequest, fastsnap_config: FastsnapConfig
                     ) -> Iterator[Path]:
    """A short private directory for this test; kept only for failed tests with
    --fastsnap-keep-artifacts, removed otherwise."""
    base = request.config.stash[SESSION_DIR_KEY]
    directory = workdirs.test_dir(base, request.node.nodeid)
    yield directory
    reports = request.node.stash.get(PHASE_REPORTS_KEY, {})
    failed = any(rep.failed for rep in reports.values())
    if failed and fastsnap_config.keep_artifacts:
        kept = workdirs.keep(directory, fastsnap_config.artifacts_dir.resolve(),
                             request.node.nodeid)
        request.node.user_properties.append((ARTIFACTS_PROPERTY, str(kept)))
    else:
        workdirs.remove(directory)


class TeardownError(Exception):
    """Stopping a test's machines or closing what it owned failed (all listed)."""


class Closable(Protocol):
    def close(self) -> None: ...


class VmFactory:
    """Starts QEMU machines for one test and stops them all afterwards."""

    def __init__(self, config: FastsnapConfig, accel: str, workdir: Path,
                 probe: QemuProbe, probe_dst: QemuProbe,
                 registry: list[QemuMachine], machine_types: MachineTypes) -> None:
        self.config = config
        self.machine_types = machine_types
        self.accel = accel
        self.workdir = workdir
        self.probe = probe
        self.probe_dst = probe_dst
        self.machines = registry
        self._names: set[str] = set()
        self._owned: list[Closable] = []

    def _name(self, wanted: str) -> str:
        name, n = wanted, 1
        while name in self._names:
            n += 1
            name = f"{wanted}{n}"
        self._names.add(name)
        return name

    def __call__(self, *, name: str = "src", machine: str = "q35", mem: str | None = None,
                 extra_args: Sequence[str] = (), incoming: str | None = None,
                 paused: bool = False, role: str = "src", launch: bool = True,
                 accel: str | None = None) -> QemuMachine:
        """A new QEMU; ``role="dst"`` uses the destination binary; ``accel``
        overrides the session's accelerator for this machine.  An alias
        *machine* (``q35``) becomes the run's versioned type when it pins one
        (cross-version runs, ``--fastsnap-machine``)."""
        binary = self.probe_dst.binary if role == "dst" else self.probe.binary
        if accel == "kvm" and not self.probe.kvm_usable:
            # Reported at the test's location, like a marker skip, not at this line.
            raise pytest.skip.Exception(f"accel='kvm' asked for, but KVM is not usable: "
                                        f"{self.probe.kvm_reason}", _use_item_location=True)
        vm = QemuMachine(binary, self.workdir, name=self._name(name),
                         machine=self.machine_types.resolve(machine),
                         accel=accel or self.accel, mem=mem or self.config.mem,
                         extra_args=extra_args,
                         incoming=incoming, paused=paused)
        self.machines.append(vm)
        if launch:
            vm.launch()
        return vm

    def destination(self, source: QemuMachine | SavedSnapshot, *, name: str = "dst",
                    incoming: str = "defer", paused: bool = True,
                    extra_args: Sequence[str] = (), role: str = "dst") -> QemuMachine:
        """A destination QEMU with the same guest definition as *source*."""
        return self.destination_from_args([*source.device_args, *extra_args], name=name,
                                          incoming=incoming, paused=paused, role=role)

    def destination_from_args(self, device_args: Sequence[str], *, name: str = "dst",
                              incoming: str = "defer", paused: bool = True,
                              role: str = "dst") -> QemuMachine:
        """A destination QEMU for the given guest definition: the destination
        binary, or with ``role="src"`` the source binary (the reverse direction
        of a cross-version run)."""
        binary = self.probe.binary if role == "src" else self.probe_dst.binary
        vm = QemuMachine(binary, self.workdir, name=self._name(name),
                         incoming=incoming, paused=paused, device_args=device_args)
        self.machines.append(vm)
        vm.launch()
        return vm

    def own(self, resource: Closable) -> None:
        """Close *resource* (e.g. a :class:`RestoredGuest`: its loader and
        socket directory) at teardown, before the machines stop."""
        self._owned.append(resource)

    def shutdown_all(self) -> None:
        """Close everything owned, then stop every machine, newest first.  Each
        step runs even if an earlier one failed; the failures are raised
        together at the end, as one TeardownError."""
        errors = []
        for resource in reversed(self._owned):
            try:
                resource.close()
            except Exception as err:  # every step runs; reported below
                errors.append(f"closing {resource!r}: {err!r}")
        self._owned.clear()
        for vm in reversed(self.machines):
            try:
                vm.shutdown()
            except Exception as err:  # QemuMachine.shutdown should not, but go on
                errors.append(f"stopping {vm!r}: {err!r}")
            if vm.is_running():
                errors.append(f"{vm!r} still running after shutdown: "
                              + "; ".join(vm.shutdown_errors))
        if errors:
            raise TeardownError("fastsnap teardown: " + "\n".join(errors))


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest, fastsnap_config: FastsnapConfig,
               fastsnap_accel: str, fastsnap_workdir: Path, qemu_probe: QemuProbe,
               qemu_probe_dst: QemuProbe) -> Iterator[VmFactory]:
    """Factory of QEMU machines: ``vm_factory(machine=..., mem=..., extra_args=...)``."""
    registry: list[QemuMachine] = request.node.stash.setdefault(MACHINES_KEY, [])
    factory = VmFactory(fastsnap_config, fastsnap_accel, fastsnap_workdir, qemu_probe,
                        qemu_probe_dst, registry, request.config.stash[MACHINE_TYPES_KEY])
    try:
        yield factory
    finally:
        factory.shutdown_all()


@dataclass
class Guest:
    """A running test guest: its QEMU, and the agent that talks to it."""

    kind: str
    vm: QemuMachine
    agent: TinyGuest | LinuxGuest
    params: TinyParams | None = None

    def self_check(self, timeout: float = 60.0) -> Verdict:
        """The guest's own verdict on its memory: falsy on failure, naming the page."""
        return self.agent.self_check(timeout)

    def saved(self, snapshot_factory: SnapshotFactory, **save_kw: Any) -> SavedSnapshot:
        """Save this guest (stopped) with *snapshot_factory* and shut it down:
        a snapshot to restore, with no source left running beside it."""
        snap = snapshot_factory(self.vm, **save_kw)
        self.vm.shutdown()
        return snap


class GuestFactory:
    """Boots the project's test guests (images built once, shared by workers)."""

    def __init__(self, vm_factory: VmFactory) -> None:
        self.vm_factory = vm_factory

    def __call__(self, kind: str = "tiny", *, mem: str | None = None, mode: str = "static",
                 seed: int = 1, size: int | None = None, zero_ratio: float = 0.25,
                 machine: str | None = None, accel: str | None = None,
                 name: str = "src", ready_timeout: float = 180.0, role: str = "src") -> Guest:
        """RAM: *mem*, else --fastsnap-mem when set, else the guest's own default
        (tiny: just enough for its pattern range, 22M by default; Linux: 256M).
        ``role="dst"`` boots it on the destination binary."""
        config = self.vm_factory.config
        mem = mem or (config.mem if config.mem_given else None)
        if kind == "tiny":
            params = self._tiny_params(mem, seed=seed, mode=mode, zero_ratio=zero_ratio,
                                       size=size)
            vm = self.vm_factory(name=name, machine=machine or tiny.RECOMMENDED_MACHINE,
                                 mem=mem or params.min_mem(), accel=accel, role=role,
                                 extra_args=tiny_args(tiny_kernel(), params))
            agent: TinyGuest | LinuxGuest = TinyGuest(vm, params)
            agent.wait_ready(ready_timeout)
            return Guest("tiny", vm, agent, params)
        if kind == "linux":
            kernel, initrd = linux_image()
            mem_mib = int((size or (32 << 20)) >> 20)
            vm = self.vm_factory(name=name, machine=machine or linux.RECOMMENDED_MACHINE,
                                 mem=mem or "256M", accel=accel, role=role,
                                 extra_args=linux_args(kernel, initrd, mem_mib=mem_mib,
                                                       seed=seed))
            agent = LinuxGuest(vm)
            agent.wait_ready(ready_timeout)
            return Guest("linux", vm, agent)
        raise ValueError(f"unknown guest kind {kind!r}: use 'tiny' or 'linux'")

    @staticmethod
    def _tiny_params(mem: str | None, *, size: int | None, **kwargs: Any) -> TinyParams:
        """The tiny guest's pattern range: *size*, else 16 MiB, shrunk to fit a
        smaller *mem* (2 MiB spare above it, as :meth:`TinyParams.min_mem`)."""
        params = TinyParams(**kwargs, **({"size": size} if size is not None else {}))
        if mem is None or mem_bytes(mem) >= mem_bytes(params.min_mem()):
            return params
        room = (mem_bytes(mem) - params.start - (2 << 20)) & ~0xFFF
        if size is not None or room <= 0:
            raise ValueError(f"tiny guest: mem={mem} is smaller than the {params.min_mem()} "
                             f"its pattern range {params.start:#x}+{params.size:#x} needs")
        return TinyParams(**kwargs, size=room)


@pytest.fixture
def guest_factory(vm_factory: VmFactory) -> GuestFactory:
    """``guest_factory(kind="tiny"|"linux", mem=, mode="static"|"dirty", seed=,
    size=, machine=, accel=)`` -> a running :class:`Guest`, ready."""
    return GuestFactory(vm_factory)


@pytest.fixture
def guest(guest_factory: GuestFactory) -> Guest:
    """The default guest: the tiny pattern guest, static, ready."""
    return guest_factory("tiny")


@dataclass
class SnapshotFactory:
    """Saves mapped-ram snapshots of running machines into the test directory."""

    workdir: Path
    counter: int = 0

    def save(self, vm: QemuMachine, *, offset: int = 0,
             capabilities: Mapping[str, bool] | None = None,
             parameters: Mapping[str, Any] | None = None, live: bool = False,
             prefix_bytes: bytes = b"", timeout: float = 120.0) -> SavedSnapshot:
        """Save *vm* (stopped unless *live*); ``prefix_bytes`` fills the file
        before ``offset`` (QEMU keeps bytes before the offset)."""
        self.counter += 1
        path = self.workdir / f"snap{self.counter}.img"
        if offset:
            with open(path, "wb") as f:
                f.write(prefix_bytes[:offset].ljust(offset, b"\xa5"))
        saved = save_snapshot(vm, path, offset=offset, capabilities=capabilities,
                              parameters=parameters, live=live, timeout=timeout)
        write_manifest(path, vm, offset=offset)  # so `fastsnap restore` can use it
        return saved

    __call__ = save


@pytest.fixture
def snapshot_factory(fastsnap_workdir: Path) -> SnapshotFactory:
    """``snapshot_factory(vm, offset=..., capabilities=..., live=...)`` -> SavedSnapshot."""
    return SnapshotFactory(fastsnap_workdir)


@pytest.fixture
def firmware_vm(vm_factory: VmFactory) -> QemuMachine:
    """A q35 guest idling in firmware, the cheapest guest with real RAM blocks."""
    return vm_factory(name="src")


@pytest.fixture
def restore_precopy(vm_factory: VmFactory):  # type: ignore[no-untyped-def]
    """``restore_precopy(snapshot, resume=False)`` -> destination QEMU fully loaded
    (stock full load).  A snapshot saved stopped loads *paused*; ``resume=True``
    continues the guest and waits until it runs."""
    def restore(snapshot: SavedSnapshot, *, resume: bool = False,
                **kwargs: Any) -> QemuMachine:
        dst = vm_factory.destination(snapshot)
        load_snapshot(dst, snapshot.path, offset=snapshot.offset,
                      capabilities={k: v for k, v in snapshot.capabilities.items()
                                    if k != "mapped-ram"} | kwargs.pop("capabilities", {}),
                      **kwargs)
        if resume:
            dst.qmp("cont")
            dst.wait_status("running")
        return dst
    return restore

