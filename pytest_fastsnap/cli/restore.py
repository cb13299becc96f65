"""`fastsnap restore SNAPSHOT`: run a guest from a snapshot, RAM loaded lazily."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from pytest_fastsnap.restore.libvirt_image import libvirt_manifest
from pytest_fastsnap.restore.manifest import read_manifest
from pytest_fastsnap.restore.strategies import (
    RestoreFailed,
    RestoreUnsupported,
    machine_factory,
    restore,
)


def restore_cli(snapshot: Path, qemu_binary: str | None = None, *,
                strategy: str = "loader-bridge", keep_running: bool = False,
                out: TextIO = sys.stdout) -> int:
    """Restore *snapshot* on the system QEMU with the arguments recorded in
    ``SNAPSHOT.json``; print time to running and time to fully loaded.

    Returns 0 on success, 2 for a missing/invalid manifest or an unsupported
    strategy, 1 for a failed restore.  With *keep_running* the guest stays up
    until Ctrl-C (or until it exits).
    """
    try:  # a libvirt save image carries its domain XML: no SNAPSHOT.json needed
        manifest = libvirt_manifest(snapshot) or read_manifest(snapshot)
    except ValueError as err:
        print(f"fastsnap restore: {err}", file=sys.stderr)
        return 2
    binary = qemu_binary or manifest.binary
    workdir = Path(tempfile.mkdtemp(prefix="fastsnap-restore-", dir="/tmp"))
    guest = None
    try:
        guest = restore(strategy, snapshot, manifest.qemu_args,
                        machine_factory(binary, workdir), offset=manifest.offset)
        print(f"{strategy}: guest running after {guest.time_to_running:.3f} s "
              f"(QEMU start-up {guest.launch_seconds:.3f} s before that)", file=out, flush=True)
        loaded = guest.wait_loaded()
        print(f"{strategy}: fully loaded after {loaded:.3f} s", file=out, flush=True)
        stats = guest.loader_stats
        if stats:
            lat = stats.get("latency_us", {})
            print(f"loader: {stats.get('requests_served', 0)} page requests served "
                  f"(p50 {lat.get('p50', 0):.0f} us, p99 {lat.get('p99', 0):.0f} us), "
                  f"{stats.get('pages_eager', 0)} pages eagerly at "
                  f"{stats.get('eager_throughput_mib_s', 0):.0f} MiB/s", file=out, flush=True)
        if keep_running:
            print(f"guest running (QEMU pid {guest.vm.pid}, log {guest.vm.log_path}); "
                  "Ctrl-C stops it", file=out, flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while guest.vm.is_running():
                    time.sleep(0.5)
        return 0
    except RestoreUnsupported as err:
        print(f"fastsnap restore: {err}", file=sys.stderr)
        return 2
    except (RestoreFailed, OSError) as err:
        print(f"fastsnap restore: {err}", file=sys.stderr)
        return 1
    finally:
        if guest is not None:
            guest.close()
        shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    return restore_cli(Path(args.snapshot), qemu_binary=args.qemu_binary,
                       strategy=args.strategy, keep_running=args.keep_running)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("restore", help="run a guest from a snapshot, RAM loaded lazily")
    p.add_argument("snapshot")
    p.add_argument("--qemu-binary", default=os.environ.get("QEMU_BINARY"),
                   help="default: the binary recorded in SNAPSHOT.json")
    p.add_argument("--strategy", default="loader-bridge",
                   choices=("loader-bridge", "qemu-precopy", "qemu-fast"))
    p.add_argument("--keep-running", action="store_true",
                   help="leave the guest running until Ctrl-C")
    p.set_defaults(func=run)
