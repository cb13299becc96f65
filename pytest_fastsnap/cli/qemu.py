"""`fastsnap qemu build VERSION` and `fastsnap qemu list`: other QEMU versions,
built into the cache (see :mod:`pytest_fastsnap.qemu.build`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _root(args: argparse.Namespace) -> Path | None:
    from pytest_fastsnap.qemu.build import cache_root

    if args.cache_dir:
        return Path(args.cache_dir).expanduser().resolve() / "qemu"
    return cache_root()


def _build(args: argparse.Namespace) -> int:
    from pytest_fastsnap.qemu.build import BuildFailed, BuildInputError, build_qemu

    source = Path(args.source) if args.source else None
    try:
        result = build_qemu(args.version, source=source, root=_root(args))
    except BuildInputError as err:
        print(f"fastsnap qemu build: {err}", file=sys.stderr)
        return 2
    except BuildFailed as err:
        print(f"fastsnap qemu build: {err}", file=sys.stderr)
        return 1
    print(result.binary)
    return 0


def _list(args: argparse.Namespace) -> int:
    from pytest_fastsnap.qemu.build import list_built

    root = _root(args)
    builds = list_built(root)
    if not builds:
        print(f"no QEMU built in {root} (fastsnap qemu build VERSION)")
        return 0
    for b in builds:
        print(f"{b.version}\t{b.binary}\t{b.info.get('source', '?')}\t"
              f"built {b.info.get('built_at', '?')} in {b.info.get('build_seconds', '?')} s")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("qemu", help="build other QEMU versions into the cache, list them")
    qsub = p.add_subparsers(dest="qemu_command", required=True)
    cache_help = ("cache directory (default: $FASTSNAP_CACHE_DIR, else "
                  "$XDG_CACHE_HOME/pytest-fastsnap); builds go in its qemu/ subdirectory")
    b = qsub.add_parser("build", help="build qemu-system-x86_64 VERSION (Debian's source "
                        "package, or --source DIR); prints the binary's path")
    b.add_argument("version", metavar="VERSION",
                   help="e.g. 10.2.2; with --source, any label naming the build (master)")
    b.add_argument("--source", metavar="DIR", default=None,
                   help="a QEMU source tree of your own instead of Debian's package")
    b.add_argument("--cache-dir", default=os.environ.get("FASTSNAP_CACHE_DIR"), help=cache_help)
    b.set_defaults(func=_build)
    ls = qsub.add_parser("list", help="QEMU versions built in the cache, and where")
    ls.add_argument("--cache-dir", default=os.environ.get("FASTSNAP_CACHE_DIR"), help=cache_help)
    ls.set_defaults(func=_list)
