"""`fastsnap probe`: what a QEMU binary supports, as JSON."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

from pytest_fastsnap.cli.common import UsageError, seconds_arg


def run(args: argparse.Namespace) -> int:
    from pytest_fastsnap.qemu.probe import ProbeError, probe

    try:
        result = probe(args.qemu_binary, timeout=args.timeout)
        accel = result.choose_accel("auto")
    except ProbeError as err:
        raise UsageError(str(err)) from None
    print(json.dumps(asdict(result) | {"accel": accel}, indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("probe", help="what a QEMU binary supports (JSON)",
                       description="Probe a QEMU binary (version, KVM, migration "
                       "capabilities, fast snapshot load); cached per binary.")
    p.add_argument("--qemu-binary", default=os.environ.get("QEMU_BINARY", "qemu-system-x86_64"),
                   help="name on PATH or path (default: $QEMU_BINARY or %(default)s)")
    p.add_argument("--timeout", type=seconds_arg(), default=30.0,
                   help="seconds the binary gets to answer --version (default %(default)s)")
    p.set_defaults(func=run)
