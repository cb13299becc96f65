"""Make a guest's RAM "mostly data" quickly, without a guest program.

The VM is stopped, the host address of ``pc.ram`` is taken from HMP
``gpa2hva``, and unique non-zero pages are written into QEMU's memory through
``/proc/PID/mem`` (needs ptrace rights over QEMU: root, or our own child
with ptrace_scope 0).  The firmware's own areas are left alone: the first
2 MiB (IVT, BDA, shadowed BIOS) and the top 16 MiB of low memory (SeaBIOS
tables), so the guest still runs after a restore.
"""

from __future__ import annotations

import os
import re
import struct

from pytest_fastsnap.qemu.machine import QemuMachine

MiB = 1 << 20
GiB = 1 << 30
SKIP_LOW = 2 * MiB
SKIP_TOP_OF_LOW = 16 * MiB


def lowmem_size(machine: str, ram: int) -> int:
    """Bytes of RAM below 4 GiB for q35 / pc (QEMU's split rule)."""
    if machine.startswith("pc") and "q35" not in machine:
        limit = 0xE0000000 if ram < 0xE0000000 else 0xC0000000
    else:
        limit = 0xB0000000 if ram < 0xB0000000 else 0x80000000
    return min(ram, limit)


def data_ranges(machine: str, ram: int) -> list[tuple[int, int, int]]:
    """(guest-physical address, pc.ram offset, length) of the ranges to fill."""
    low = lowmem_size(machine, ram)
    ranges = [(SKIP_LOW, SKIP_LOW, low - SKIP_TOP_OF_LOW - SKIP_LOW)]
    if ram > low:
        ranges.append((4 * GiB, low, ram - low))
    return [r for r in ranges if r[2] > 0]


def ram_hva(vm: QemuMachine) -> int:
    """Host virtual address of guest-physical 0 (start of ``pc.ram``)."""
    out = vm.hmp("gpa2hva 0")
    m = re.search(r"is (0x[0-9a-fA-F]+)", out)
    if not m:
        raise RuntimeError(f"gpa2hva 0: unexpected answer {out!r}")
    return int(m[1], 16)


def fill_guest_ram(vm: QemuMachine, machine: str, ram: int, *, seed: int = 1,
                   chunk: int = 4 * MiB,
                   only: list[tuple[int, int, int]] | None = None) -> list[tuple[int, int]]:
    """Stop *vm* and fill its RAM with unique pages; return the filled
    (guest-physical address, length) ranges.  *only*: these
    (gpa, pc.ram offset, length) ranges instead of all of :func:`data_ranges`."""
    if vm.status() != "paused":
        vm.qmp("stop")
    base = ram_hva(vm)
    rnd = bytearray(os.urandom(chunk))
    filled = []
    pid = vm.pid
    assert pid is not None
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        for gpa, off, length in (data_ranges(machine, ram) if only is None else only):
            for pos in range(0, length, chunk):
                n = min(chunk, length - pos)
                buf = rnd[:n]
                page0 = (gpa + pos) >> 12
                for i in range(0, n, 4096):   # unique per page, never zero
                    struct.pack_into("<QQ", buf, i, page0 + (i >> 12), seed | 1)
                if os.pwrite(fd, buf, base + off + pos) != n:
                    raise OSError(f"short write into QEMU memory at {base + off + pos:#x}")
            filled.append((gpa, length))
    finally:
        os.close(fd)
    return filled
