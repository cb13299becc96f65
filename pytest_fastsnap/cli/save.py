"""`fastsnap save`: boot a test guest and save a mapped-ram snapshot of it,
with the SNAPSHOT.json manifest `fastsnap restore` needs."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from pytest_fastsnap.guests.linux import LinuxGuest, linux_args, linux_image
from pytest_fastsnap.guests.tiny import (
    RECOMMENDED_MACHINE,
    TinyGuest,
    TinyParams,
    tiny_args,
    tiny_kernel,
)
from pytest_fastsnap.qemu.machine import QemuError, QemuMachine
from pytest_fastsnap.qemu.migration import MigrationFailed, save_snapshot
from pytest_fastsnap.qemu.probe import ProbeError, probe
from pytest_fastsnap.restore.manifest import write_manifest


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("save", help="boot a test guest and save a mapped-ram snapshot")
    p.add_argument("output", help="snapshot file to write (SNAPSHOT.json goes next to it)")
    p.add_argument("--guest", choices=("tiny", "linux", "firmware"), default="tiny")
    p.add_argument("--mem", default="256M", help="guest RAM (QEMU -m syntax)")
    p.add_argument("--machine", default=None,
                   help="default: microvm (tiny), q35 (others); an alias is saved as the "
                   "binary's versioned type (q35 -> pc-q35-10.0 on QEMU 10.0)")
    p.add_argument("--qemu-binary", default="qemu-system-x86_64")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--offset", type=lambda v: int(v, 0), default=0)
    p.add_argument("--multifd", action="store_true")
    p.add_argument("--live", action="store_true", help="save without stopping the guest")
    p.set_defaults(func=run)


def _mib(text: str) -> int:
    units = {"K": 1 / 1024, "M": 1, "G": 1024}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].isalpha() \
        else int(text)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output).resolve()
    try:
        qemu = probe(args.qemu_binary)
        accel, why = qemu.choose_accel(args.accel)
    except ProbeError as err:
        print(f"fastsnap save: {err}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="fastsnap-save-", dir="/tmp"))
    mem_mib = _mib(args.mem)
    extra: list[str]
    if args.guest == "tiny":
        params = TinyParams(size=(mem_mib - 8) << 20)
        extra = tiny_args(tiny_kernel(), params)
    elif args.guest == "linux":
        kernel, initrd = linux_image()
        extra = linux_args(kernel, initrd, mem_mib=max(16, mem_mib // 2))
    else:
        extra = []
    # An alias (q35) is saved as this binary's versioned type (pc-q35-10.0), so a
    # newer QEMU can restore the snapshot: it has that type, not the same alias.
    machine = qemu.resolve_machine(args.machine or (RECOMMENDED_MACHINE if args.guest == "tiny"
                                                    else "q35"))
    vm = QemuMachine(qemu.binary, workdir, name="save", machine=machine, accel=accel,
                     mem=args.mem, extra_args=extra)
    try:
        vm.launch()
        if args.guest == "tiny":
            TinyGuest(vm, params).wait_ready(120)
        elif args.guest == "linux":
            LinuxGuest(vm).wait_ready(300)
        if args.offset:
            with open(out, "wb") as f:
                f.truncate(args.offset)
        saved = save_snapshot(vm, out, offset=args.offset, live=args.live,
                              capabilities={"multifd": True} if args.multifd else {})
        manifest = write_manifest(out, vm, offset=args.offset)
    except (QemuError, MigrationFailed, TimeoutError) as err:
        print(f"fastsnap save: {err}", file=sys.stderr)
        return 1
    finally:
        vm.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"saved {args.guest} guest ({machine}, {args.mem}, {accel}: {why}) to {out} "
          f"in {saved.save_seconds:.2f}s; manifest {manifest}")
    return 0
