"""`fastsnap probe`: what a QEMU binary supports, as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict


def run(args: argparse.Namespace) -> int:
    from pytest_fastsnap.qemu.probe import ProbeError, probe

    try:
        result = probe(args.qemu_binary)
    except ProbeError as err:
        print(f"fastsnap probe: {err}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result) | {"accel": result.choose_accel("auto")}, indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("probe", help="what a QEMU binary supports (JSON)")
    p.add_argument("--qemu-binary", default=os.environ.get("QEMU_BINARY", "qemu-system-x86_64"))
    p.set_defaults(func=run)
