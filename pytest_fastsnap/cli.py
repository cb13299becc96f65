"""`fastsnap` command: inspect, verify, load, serve (native loader), restore,
bench, probe, and the build steps the set-up script runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

LOADER_COMMANDS = ("inspect", "verify", "load", "serve")


def _loader(argv: list[str]) -> int:
    from pytest_fastsnap.native.loader import loader_path

    path = str(loader_path())
    os.execv(path, [path, *argv])
    return 1  # not reached


def _build_native(args: argparse.Namespace) -> int:
    from pytest_fastsnap.native.loader import loader_path

    variants = ["release", "asan"] if args.variant == "all" else [args.variant]
    for variant in variants:
        print(f"fastsnap-loader ({variant}): {loader_path(variant=variant)}")
    return 0


def _build_images(args: argparse.Namespace) -> int:
    from pytest_fastsnap.guests import build_all_images

    for name, path in build_all_images(Path(args.cache_dir) if args.cache_dir else None).items():
        print(f"{name}: {path}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from pytest_fastsnap.qemu.probe import ProbeError, probe

    try:
        result = probe(args.qemu_binary)
    except ProbeError as err:
        print(f"fastsnap probe: {err}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result) | {"accel": result.choose_accel("auto")}, indent=2))
    return 0


def _restore(args: argparse.Namespace) -> int:
    from pytest_fastsnap.restore.cli_restore import restore_cli

    return restore_cli(Path(args.snapshot), qemu_binary=args.qemu_binary,
                       strategy=args.strategy, keep_running=args.keep_running)


def _bench(args: argparse.Namespace) -> int:
    from pytest_fastsnap.restore.bench import bench_cli

    return bench_cli(args.rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LOADER_COMMANDS:
        return _loader(argv)
    parser = argparse.ArgumentParser(
        prog="fastsnap", description="mapped-ram snapshots and fast snapshot load. "
        f"Also: {', '.join(LOADER_COMMANDS)} (native loader; see `fastsnap inspect --help`).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build-native", help="build the native loader into its cache")
    p.add_argument("--variant", choices=("release", "asan", "all"), default="all")
    p.set_defaults(func=_build_native)
    p = sub.add_parser("build-images", help="build the test guest images into their cache")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=_build_images)
    p = sub.add_parser("probe", help="what a QEMU binary supports (JSON)")
    p.add_argument("--qemu-binary", default=os.environ.get("QEMU_BINARY", "qemu-system-x86_64"))
    p.set_defaults(func=_probe)
    from pytest_fastsnap import save_cli

    save_cli.add_parser(sub)
    p = sub.add_parser("restore", help="run a guest from a snapshot, RAM loaded lazily")
    p.add_argument("snapshot")
    p.add_argument("--qemu-binary", default=os.environ.get("QEMU_BINARY"),
                   help="default: the binary recorded in SNAPSHOT.json")
    p.add_argument("--strategy", default="loader-bridge",
                   choices=("loader-bridge", "qemu-precopy", "qemu-fast"))
    p.add_argument("--keep-running", action="store_true",
                   help="leave the guest running until Ctrl-C")
    p.set_defaults(func=_restore)
    p = sub.add_parser("bench", help="restore benchmarks (see `fastsnap bench -- --help`)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
