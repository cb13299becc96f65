"""`fastsnap save`: boot a test guest and save a mapped-ram snapshot of it,
with the <snapshot>.json manifest `fastsnap restore` needs."""

from __future__ import annotations

import argparse
import os

from pytest_fastsnap.cli.common import (
    CliError,
    UsageError,
    int_arg,
    one_line,
    output_file,
    size_arg,
    temp_workdir,
)

MiB = 1 << 20
# Smallest --mem per guest.  tiny: 8 MiB for its kernel, stack and spare
# below and above the pattern, plus at least 1 MiB of pattern (9M saved fine);
# linux (its workload fills half of --mem): 48M and 64M never printed READY
# within 300 s here, 128M saved in 18 s; firmware: what the probe boots q35 with.
MIN_MEM = {"tiny": 9 * MiB, "linux": 128 * MiB, "firmware": 16 * MiB}
TINY_MAX_MEM = 4 << 30  # 32-bit guest: the pattern must end below 4 GiB


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("save", help="boot a test guest and save a mapped-ram snapshot",
                       description="Boot a test guest, let it fill its memory, save it with "
                       "mapped-ram to OUTPUT and write OUTPUT.json, the QEMU arguments "
                       "`fastsnap restore` repeats.")
    p.add_argument("output", help="snapshot file to write (OUTPUT.json goes next to it)")
    p.add_argument("--guest", choices=("tiny", "linux", "firmware"), default="tiny")
    p.add_argument("--mem", default=256 * MiB, type=size_arg(default_unit="M"),
                   help="guest RAM, QEMU -m syntax: 256M, 1G, a bare number is MiB "
                   "(default 256M; at least 9M tiny, 128M linux, 16M firmware)")
    p.add_argument("--machine", default=None,
                   help="default: microvm (tiny), q35 (others); an alias is saved as the "
                   "binary's versioned type (q35 -> pc-q35-10.0 on QEMU 10.0)")
    p.add_argument("--qemu-binary", default=os.environ.get("QEMU_BINARY", "qemu-system-x86_64"),
                   help="name on PATH or path (default: $QEMU_BINARY or qemu-system-x86_64)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--offset", type=int_arg(minimum=0), default=0,
                   help="file offset of the stream (file:PATH,offset=N; 0x hex accepted)")
    p.add_argument("--multifd", action="store_true")
    p.add_argument("--live", action="store_true", help="save without stopping the guest")
    p.add_argument("--dirty", action="store_true",
                   help="tiny guest: saved while rewriting every 8th page of its range, so "
                   "the restored guest goes on writing pages at once (a workload)")
    p.set_defaults(func=run)


def _check_mem(guest: str, mem: int) -> int:
    """--mem in MiB, or UsageError when the guest cannot run in it."""
    if mem % MiB:
        raise UsageError(f"--mem {mem} bytes is not a whole number of MiB")
    if mem < MIN_MEM[guest]:
        raise UsageError(f"--mem {mem // MiB}M is too small for the {guest} guest "
                         f"(at least {MIN_MEM[guest] // MiB}M)")
    if guest == "tiny" and mem > TINY_MAX_MEM:
        raise UsageError(f"--mem {mem // MiB}M is too large for the tiny guest "
                         f"(32-bit: at most {TINY_MAX_MEM // MiB}M)")
    return mem // MiB


def run(args: argparse.Namespace) -> int:
    # Imported here: `fastsnap --help` and argument errors need none of it.
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
    from pytest_fastsnap.restore.manifest import manifest_path, write_manifest

    if args.dirty and args.guest != "tiny":
        raise UsageError(f"--dirty is for the tiny guest, not {args.guest}")
    mem_mib = _check_mem(args.guest, args.mem)
    out = output_file(args.output, "snapshot")
    output_file(manifest_path(out), "manifest")
    try:
        qemu = probe(args.qemu_binary)
        accel, why = qemu.choose_accel(args.accel)
    except ProbeError as err:
        raise UsageError(str(err)) from None
    machine = args.machine or (RECOMMENDED_MACHINE if args.guest == "tiny" else "q35")
    if machine not in qemu.machines:
        raise UsageError(f"--machine {machine}: {qemu.binary} has no such machine "
                         f"(`{qemu.binary} -machine help` lists them)")
    # An alias (q35) is saved as this binary's versioned type (pc-q35-10.0), so a
    # newer QEMU can restore the snapshot: it has that type, not the same alias.
    machine = qemu.resolve_machine(machine)
    extra: list[str]
    if args.guest == "tiny":
        params = TinyParams(size=(mem_mib - 8) * MiB, mode="dirty" if args.dirty else "static")
        extra = tiny_args(tiny_kernel(), params)
    elif args.guest == "linux":
        kernel, initrd = linux_image()
        extra = linux_args(kernel, initrd, mem_mib=max(16, mem_mib // 2))
    else:
        extra = []
    existed = out.exists()
    with temp_workdir("fastsnap-save-") as workdir:
        vm = QemuMachine(qemu.binary, workdir, name="save", machine=machine, accel=accel,
                         mem=f"{mem_mib}M", extra_args=extra)
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
        except (QemuError, MigrationFailed, TimeoutError, OSError) as err:
            if not existed:  # a half-written snapshot is worse than none
                out.unlink(missing_ok=True)
            raise CliError(one_line(err)) from None
        finally:
            vm.shutdown()
    print(f"saved {args.guest} guest ({machine}, {mem_mib}M, {accel}: {why}) to {out} "
          f"in {saved.save_seconds:.2f}s; manifest {manifest}")
    return 0
