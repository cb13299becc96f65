"""Reference snapshots the suites derive their parametrisations from.

Only the suites use this, so it lives beside them (``suites/`` is on
``sys.path`` while pytest collects them: ``from reference_snapshot import ...``).

A suite that has one test per header field of every block needs a real
snapshot at collection time.  It is made once per QEMU binary (keyed like the
probe: path, size, mtime) under a file lock, so xdist workers, which must
collect identical tests, read the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from pytest_fastsnap.guests.tiny import TinyGuest, TinyParams, tiny_args, tiny_kernel
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.migration import save_snapshot
from pytest_fastsnap.qemu.probe import default_cache_dir


@dataclass(frozen=True)
class BaseSnapshot:
    path: Path
    machine: str
    mem: str
    mem_bytes: int
    device_args: tuple[str, ...]
    memory_digests: dict[str, str]  # QemuMachine.memory_digests of the source's RAM


def ram_ranges(mem_bytes: int) -> list[tuple[int, int]]:
    """``(start, length)`` of a q35/pc guest's plain RAM below *mem_bytes*: a dump
    of 0xa0000-0xfffff shows VGA/firmware, not the RAM block underneath."""
    return [(0, 0xA0000), (0x100000, mem_bytes - 0x100000)]


# The tiny guest fills 4-48 MiB with its pattern (a quarter of the pages zero):
# mostly-data memory, some of it above 32 MiB.
BASE_TINY = TinyParams(seed=0x5EED, start=0x400000, size=0x2C00000)


def base_snapshot(binary: str, accel: str, machine: str = "q35", mem_mib: int = 64
                  ) -> BaseSnapshot:
    """A stopped mapped-ram snapshot of the tiny guest, cached per binary."""
    st = os.stat(binary)
    kernel = tiny_kernel()
    key = hashlib.sha256(f"{binary}-{st.st_size}-{st.st_mtime_ns}-{machine}-{mem_mib}-{accel}"
                         f"-{kernel}-{BASE_TINY}-digests2".encode()).hexdigest()[:16]
    root = default_cache_dir() / "bases"
    root.mkdir(parents=True, exist_ok=True)
    img, meta = root / f"{machine}-{key}.img", root / f"{machine}-{key}.json"
    with FileLock(str(img) + ".lock"):
        if not (img.exists() and meta.exists()):
            with tempfile.TemporaryDirectory(prefix="fastsnap-base-") as tmp:
                vm = QemuMachine(binary, Path(tmp), name="base", machine=machine, accel=accel,
                                 mem=f"{mem_mib}M", extra_args=tiny_args(kernel, BASE_TINY))
                try:
                    vm.launch()
                    TinyGuest(vm, BASE_TINY).wait_ready(60)
                    part = Path(tmp) / "base.img"
                    save_snapshot(vm, part)
                    digests = vm.memory_digests(ram_ranges(mem_mib << 20))
                    os.replace(part, img)
                    meta.write_text(json.dumps({"device_args": vm.device_args,
                                                "digests": digests}))
                finally:
                    vm.shutdown()
        data = json.loads(meta.read_text())
    return BaseSnapshot(img, machine, f"{mem_mib}M", mem_mib << 20,
                        tuple(data["device_args"]), data["digests"])
