"""`fastsnap` command.  One module per subcommand in this package; each has
``add_parser(sub)`` and sets ``func`` on its parser.  The native loader's own
subcommands (inspect, verify, load, serve) pass straight through to it.

Exit codes, the same for every subcommand: 0 success, 1 the operation failed
(a failed restore, a QEMU that died, an internal error), 2 bad input (usage,
a missing or invalid file, an unusable QEMU binary), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pytest_fastsnap.cli.native import LOADER_COMMANDS, run_loader

# Subcommand modules, in the order `fastsnap --help` lists them.
COMMAND_MODULES = (
    "pytest_fastsnap.cli.probe",
    "pytest_fastsnap.cli.save",
    "pytest_fastsnap.cli.restore",
    "pytest_fastsnap.cli.bench",
    "pytest_fastsnap.cli.build",
    "pytest_fastsnap.cli.fuzz",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsnap", description="mapped-ram snapshots and fast snapshot load. "
        f"Also: {', '.join(LOADER_COMMANDS)} (native loader; see `fastsnap inspect --help`).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LOADER_COMMANDS:
        return run_loader(argv)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"fastsnap {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
