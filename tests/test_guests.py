"""The test guests boot, fill memory exactly as pattern.py says, notice external
corruption, and survive a mapped-ram save and load."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from pytest_fastsnap.fixtures import Guest, SnapshotFactory, VmFactory
from pytest_fastsnap.guests.linux import LinuxGuest, linux_args, linux_image
from pytest_fastsnap.guests.pattern import (
    PAGE_SIZE,
    check_range,
    expected_range,
    page_is_zero,
    touch_count,
    touch_order,
)
from pytest_fastsnap.guests.tiny import (
    RECOMMENDED_MACHINE,
    TinyGuest,
    TinyParams,
    default_cache_dir,
    tiny_args,
    tiny_kernel,
)
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.migration import load_snapshot
from pytest_fastsnap.restore import restore

pytestmark = pytest.mark.fastsnap


def _kvm_missing() -> str | None:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as err:
        return f"KVM unusable: /dev/kvm: {err.strerror}"
    os.close(fd)
    return None


ACCELS = [
    "tcg",
    pytest.param("kvm", marks=pytest.mark.skipif(_kvm_missing() is not None,
                                                 reason=_kvm_missing() or "")),
]


@pytest.fixture(scope="session")
def tiny_elf(fastsnap_config: object) -> Path:
    return tiny_kernel(default_cache_dir())


@pytest.fixture(scope="session")
def linux_files(fastsnap_config: object) -> tuple[Path, Path]:
    return linux_image(default_cache_dir())


def _boot_tiny(vm_factory: VmFactory, kernel: Path, params: TinyParams,
               machine: str = RECOMMENDED_MACHINE, accel: str | None = None,
               ready_timeout: float = 60.0) -> TinyGuest:
    if accel is not None:
        vm_factory.accel = accel    # this test's factory only
    vm = vm_factory(machine=machine, mem=params.min_mem(), extra_args=tiny_args(kernel, params))
    guest = TinyGuest(vm, params)
    guest.wait_ready(ready_timeout)
    return guest


def _guest_ram_hva(vm: QemuMachine, gpa: int) -> int:
    out = vm.hmp(f"gpa2hva {gpa:#x}")
    found = re.search(r"is (0x[0-9a-f]+)", out)
    assert found, f"gpa2hva: {out!r}"
    return int(found.group(1), 16)


def _poke(vm: QemuMachine, gpa: int, data: bytes) -> None:
    """Write guest RAM behind QEMU's back: HMP gpa2hva, then /proc/PID/mem."""
    hva = _guest_ram_hva(vm, gpa)
    fd = os.open(f"/proc/{vm.pid}/mem", os.O_RDWR)
    try:
        assert os.pwrite(fd, data, hva) == len(data)
    finally:
        os.close(fd)


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("machine", ["microvm", "pc", "q35"])
def test_tiny_memory_equals_python_pattern(vm_factory: VmFactory, tiny_elf: Path,
                                           machine: str, accel: str) -> None:
    # Nested KVM touches guest memory slowly: keep the range small there.
    size = (8 << 20) if accel == "tcg" else (512 << 10)
    params = TinyParams(seed=0xC0FFEE, start=0x400000, size=size, zero_ratio=0.3,
                        zero_every=13)
    t0 = time.monotonic()
    guest = _boot_tiny(vm_factory, tiny_elf, params, machine=machine, accel=accel,
                       ready_timeout=120.0)
    boot = time.monotonic() - t0
    info = guest.wait_ready(1)
    assert (info.start, info.size, info.pages) == (params.start, params.size, params.pages)
    assert info.zero == sum(page_is_zero(params, p)
                            for p in range(params.first_pfn, params.first_pfn + params.pages))
    data = guest.read_range()
    assert data == expected_range(params, params.start, params.size)
    assert guest.self_check(timeout=120.0)
    print(f"{machine}/{accel}: ready after {boot:.2f}s")


@pytest.mark.parametrize("kind", ["content", "zero"])
def test_tiny_self_check_catches_external_corruption(vm_factory: VmFactory, tiny_elf: Path,
                                                     kind: str) -> None:
    params = TinyParams(seed=77, start=0x400000, size=4 << 20, zero_ratio=0.25)
    guest = _boot_tiny(vm_factory, tiny_elf, params)
    pfns = range(params.first_pfn + 100, params.first_pfn + params.pages)
    pfn = next(p for p in pfns if page_is_zero(params, p) == (kind == "zero"))
    addr = pfn * PAGE_SIZE + 0x123
    before = guest.vm.memsave(addr, 1)
    _poke(guest.vm, addr, bytes([before[0] ^ 0x40]))
    assert guest.vm.memsave(addr, 1) != before
    verdict = guest.self_check()
    assert not verdict and verdict.details["page"] == pfn, guest.last_check_line()
    assert f"why={kind}" in guest.last_check_line()
    host = guest.host_check()
    assert not host and (host.details["page"], host.details["why"]) == (pfn, kind)


def test_tiny_dirty_mode_keeps_the_invariant(vm_factory: VmFactory, tiny_elf: Path) -> None:
    params = TinyParams(seed=5, start=0x400000, size=8 << 20, mode="dirty", dirty_stride=4)
    guest = _boot_tiny(vm_factory, tiny_elf, params)
    assert guest.wait_ready(1).dirty > 0
    first = guest.ping()
    time.sleep(0.3)
    assert guest.ping() > first, "generations do not advance"
    assert guest.self_check()
    gen = guest.stop_dirtying()
    assert gen >= 1
    assert guest.host_check()
    assert guest.self_check()
    assert guest.ping() == gen
    assert "DIRTYING" in guest.start_dirtying()


def test_tiny_touch_workload_reads_the_pages_it_names(vm_factory: VmFactory,
                                                      tiny_elf: Path) -> None:
    """The workload (digits + T/R) checks exactly the pages touch_order()
    names: a corrupted page inside the random 10% fails it (naming that
    page), the sequential 10% that does not reach it passes, and 100% in
    either order finds it."""
    params = TinyParams(seed=0x5EED_0000_1234, start=0x400000, size=8 << 20, zero_ratio=0.25)
    order = touch_order(params.seed, params.pages, 1000, True)
    assert sorted(order) == list(range(params.pages)), "the random order is a permutation"
    guest = _boot_tiny(vm_factory, tiny_elf, params)
    for permille, how in ((1000, "rand"), (100, "rand"), (10, "seq"), (0, "seq")):
        verdict = guest.touch(permille, how)
        assert verdict, verdict.reason
        assert verdict.details["pages"] == touch_count(params.pages, permille)
        assert verdict.details["order"] == how
    ten = touch_order(params.seed, params.pages, 100, True)
    # a page the random 10% reads late, beyond the sequential 10%
    victim = next(i for i in reversed(ten) if i >= touch_count(params.pages, 100)
                  and not page_is_zero(params, params.first_pfn + i))
    pfn = params.first_pfn + victim
    addr = pfn * PAGE_SIZE + 0x200
    _poke(guest.vm, addr, bytes([guest.vm.memsave(addr, 1)[0] ^ 1]))
    assert guest.touch(100, "seq")
    for permille, how in ((100, "rand"), (1000, "seq"), (1000, "rand")):
        verdict = guest.touch(permille, how)
        assert not verdict and verdict.details["page"] == pfn, (how, permille, verdict.reason)
        assert verdict.details["why"] == "content"


@pytest.mark.parametrize("live", [False, True], ids=["stopped", "live-dirty"])
def test_tiny_survives_mapped_ram_save_and_load(vm_factory: VmFactory, tiny_elf: Path,
                                                live: bool,
                                                snapshot_factory: SnapshotFactory) -> None:
    params = TinyParams(seed=0xABCDEF, start=0x400000, size=16 << 20,
                        mode="dirty" if live else "static", dirty_stride=16)
    guest = _boot_tiny(vm_factory, tiny_elf, params)
    if live:
        guest.ping()
    snapshot = snapshot_factory(guest.vm, live=live)
    dst = vm_factory.destination(snapshot)
    load_snapshot(dst, snapshot.path, offset=snapshot.offset)
    data = dst.memsave(params.start, params.size)
    assert check_range(params, data, params.start)
    if not live:
        assert data == guest.read_range()
    dst.qmp("cont")
    restored = TinyGuest(dst, params)
    restored.ping()
    assert restored.self_check()


def test_linux_guest_boots_and_checks_its_memory(vm_factory: VmFactory,
                                                 linux_files: tuple[Path, Path],
                                                 snapshot_factory: SnapshotFactory) -> None:
    kernel, initrd = linux_files
    t0 = time.monotonic()
    vm = vm_factory(machine="q35", mem="256M",
                    extra_args=linux_args(kernel, initrd, mem_mib=32, seed=0x77))
    guest = LinuxGuest(vm)
    ready = guest.wait_ready(180)
    print(f"linux ready after {time.monotonic() - t0:.1f}s: {ready}")
    assert "pages=8192" in ready
    assert guest.ping() == 1
    assert guest.self_check()
    snapshot = snapshot_factory(vm)
    dst = vm_factory.destination(snapshot)
    load_snapshot(dst, snapshot.path, offset=snapshot.offset)
    dst.qmp("cont")
    restored = LinuxGuest(dst)
    assert restored.ping() == 2
    assert restored.self_check()


def test_restored_guest_self_check_fails_on_a_corrupted_page(
        guest: Guest, vm_factory: VmFactory, snapshot_factory: SnapshotFactory) -> None:
    """``assert restored.self_check()`` on a restored guest with one corrupted
    pattern page fails, and the failure names that page and its address."""
    params = guest.params
    assert params is not None
    snap = snapshot_factory(guest.vm)
    with restore("qemu-precopy", snap.path, snap.device_args, vm_factory) as restored:
        assert restored.self_check()            # intact: passes
        pfn = next(p for p in range(params.first_pfn + 1031 % params.pages,
                                    params.first_pfn + params.pages)
                   if not page_is_zero(params, p))
        addr = pfn * PAGE_SIZE
        _poke(restored.vm, addr + 0x80, bytes([restored.vm.memsave(addr + 0x80, 1)[0] ^ 1]))
        with pytest.raises(AssertionError) as failed:
            assert restored.self_check()
        assert f"self-check failed at page {pfn} (gpa {addr:#x}): why=content" \
            in str(failed.value)
