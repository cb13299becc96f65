"""The snapshot a campaign mutates, how to load it, and its reference memory.

A target comes from ``--guest tiny|linux|firmware`` (a new q35 snapshot made
by ``fastsnap save``; the tiny one has the block layout of the suites'
reference snapshot, so regression tests re-apply findings' edits there) or
from an existing ``fastsnap save`` snapshot and its manifest.  Its reference memory digests
come from loading the unmutated file once into the QEMU under test.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pytest_fastsnap.qemu.machine import QemuError, QemuMachine
from pytest_fastsnap.qemu.migration import MigrationFailed, load_snapshot
from pytest_fastsnap.restore.manifest import read_manifest

__all__ = ["Target", "TargetError", "guest_snapshot", "reference_target"]


class TargetError(Exception):
    """The target could not be made or did not load unmutated (exit 1), or is bad input."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Target:
    path: Path
    offset: int
    binary: str
    device_args: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]
    digests: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Target:
        return cls(Path(data["path"]), int(data["offset"]), str(data["binary"]),
                   tuple(data["device_args"]), tuple(tuple(r) for r in data["ranges"]),
                   dict(data["digests"]))


def mem_bytes(device_args: tuple[str, ...]) -> int:
    """The guest RAM size given by ``-m`` (QEMU default 128 MiB)."""
    text = "128M"
    for i, arg in enumerate(device_args[:-1]):
        if arg == "-m":
            text = device_args[i + 1].split(",")[0].removeprefix("size=")
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", text.upper())
    if not m:
        raise TargetError(f"cannot read the guest RAM size from -m {text!r}", 2)
    return int(m[1]) << {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}[m[2]]


def ram_ranges(mem_bytes: int) -> list[tuple[int, int]]:
    """``(start, length)`` of a q35/pc guest's plain RAM below *mem_bytes*: a dump
    of 0xa0000-0xfffff shows VGA/firmware, not the RAM block underneath."""
    return [(0, 0xA0000), (0x100000, mem_bytes - 0x100000)]


def guest_snapshot(guest: str, binary: str, workdir: Path) -> tuple[Path, int, tuple[str, ...]]:
    """A new snapshot of *guest* (q35, TCG; 64 MiB for the tiny guest, the size of the
    suites' reference snapshot, 128 MiB for the others) made by ``fastsnap save``."""
    from pytest_fastsnap.cli import main  # `fastsnap save`, argv and all

    out = workdir / f"{guest}.img"
    mem = "64M" if guest == "tiny" else "128M"
    code = main(["save", str(out), "--guest", guest, "--machine", "q35", "--mem", mem,
                 "--accel", "tcg", "--qemu-binary", binary])
    if code != 0:
        raise TargetError(f"`fastsnap save --guest {guest}` with {binary} failed (exit {code})",
                          2 if code == 2 else 1)
    manifest = read_manifest(out)
    return out, manifest.offset, manifest.qemu_args


def snapshot_from_manifest(path: Path) -> tuple[Path, int, tuple[str, ...]]:
    if not path.is_file():
        raise TargetError(f"{path}: no such snapshot file", 2)
    try:
        manifest = read_manifest(path)
    except ValueError as err:
        raise TargetError(str(err), 2) from None
    return path, manifest.offset, manifest.qemu_args


def reference_target(path: Path, offset: int, binary: str, device_args: tuple[str, ...],
                     workdir: Path, timeout: float = 60.0) -> Target:
    """Load the unmutated snapshot once and record the digests of its RAM."""
    ranges = tuple(ram_ranges(min(mem_bytes(device_args), 2 << 30)))
    with tempfile.TemporaryDirectory(prefix=".reference-", dir=workdir) as tmp:
        vm = QemuMachine(binary, Path(tmp), name="reference", incoming="defer", paused=True,
                         device_args=device_args)
        try:
            vm.launch()
            load_snapshot(vm, path, offset=offset, timeout=timeout)
            digests = vm.memory_digests(ranges)
        except (QemuError, MigrationFailed) as err:
            raise TargetError(f"the unmutated snapshot {path} does not load into {binary}: "
                              f"{err}") from None
        finally:
            vm.kill()
    return Target(path, offset, binary, device_args, ranges, digests)


def write_target(path: Path, target: Target) -> None:
    path.write_text(json.dumps(target.to_json(), indent=1) + "\n")
