"""The command line a snapshot was saved with, recorded next to it.

``<snapshot>.json`` next to the snapshot (``snap.img`` -> ``snap.img.json``) =
``{"qemu_args": [...], "binary": "...", "offset": N}``:
``qemu_args`` are the guest-defining arguments (machine, accelerator,
memory, devices) that a destination must repeat verbatim; QemuMachine adds
the QMP monitor and serial console itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pytest_fastsnap.qemu.machine import QemuMachine

FORMAT = 1


@dataclass(frozen=True)
class Manifest:
    qemu_args: tuple[str, ...]
    binary: str
    offset: int = 0


def manifest_path(snapshot: str | Path) -> Path:
    snapshot = Path(snapshot)
    return snapshot.with_name(snapshot.name + ".json")


def write_manifest(snapshot: str | Path, vm: QemuMachine, offset: int = 0) -> Path:
    """Record *vm*'s guest definition next to *snapshot* (atomically)."""
    path = manifest_path(snapshot)
    data = {"format": FORMAT, "qemu_args": list(vm.device_args), "binary": vm.binary,
            "offset": offset}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(snapshot: str | Path) -> Manifest:
    """Read ``<snapshot>.json``; ValueError naming the file on anything malformed."""
    path = manifest_path(snapshot)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no manifest next to the snapshot (the QEMU arguments it "
                         "was saved with; `fastsnap save` and snapshot_factory write it)") \
            from None
    except IsADirectoryError:
        raise ValueError(f"{path}: manifest is a directory, not a file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON: {err}") from None
    args = data.get("qemu_args") if isinstance(data, dict) else None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ValueError(f"{path}: 'qemu_args' must be a list of strings")
    binary = data.get("binary", "qemu-system-x86_64")
    offset = data.get("offset", 0)
    if not isinstance(binary, str) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{path}: bad 'binary' or 'offset'")
    return Manifest(qemu_args=tuple(args), binary=binary, offset=offset)
