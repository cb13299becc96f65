"""`fastsnap` command.  One module per subcommand in this package; each has
``add_parser(sub)`` and sets ``func`` on its parser.  The native loader's own
subcommands (inspect, verify, load, serve) pass straight through to it.

Exit codes, the same for every subcommand: 0 success, 1 the operation failed
(a failed restore, a QEMU that died, an internal error), 2 bad input (usage,
a missing or invalid file, an unusable QEMU binary), 130 interrupted.  Errors
are one line on stderr, ``fastsnap COMMAND: MESSAGE``; the conventions and
shared checks are in :mod:`pytest_fastsnap.cli.common`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pytest_fastsnap.cli.bench import strip_separator
from pytest_fastsnap.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    CliError,
    OneLineArgumentParser,
    cli_error,
)
from pytest_fastsnap.cli.native import LOADER_COMMANDS, run_loader

EPILOG = """exit codes: 0 ok, 1 the operation failed (also an internal error),
2 bad input (usage, a missing or invalid file, an unusable QEMU binary),
130 interrupted.  Errors are one line on stderr; FASTSNAP_TRACEBACK=1 shows
the traceback of an internal error."""

# Subcommand modules, in the order `fastsnap --help` lists them.
COMMAND_MODULES = (
    "pytest_fastsnap.cli.probe",
    "pytest_fastsnap.cli.save",
    "pytest_fastsnap.cli.restore",
    "pytest_fastsnap.cli.bench",
    "pytest_fastsnap.cli.build",
    "pytest_fastsnap.cli.qemu",
    "pytest_fastsnap.cli.report",
    "pytest_fastsnap.cli.fuzz",
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="fastsnap", description="mapped-ram snapshots and fast snapshot load. "
        f"Also: {', '.join(LOADER_COMMANDS)} (native loader; see `fastsnap inspect --help`).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LOADER_COMMANDS:
        from pytest_fastsnap.native.loader import LoaderBuildError

        try:
            return run_loader(argv)
        except LoaderBuildError as err:
            print(f"fastsnap {argv[0]}: {err}", file=sys.stderr)  # the compiler's output
            return EXIT_FAILED
    args = build_parser().parse_args(strip_separator(argv))
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        cli_error(args.command, "interrupted")
        return EXIT_INTERRUPTED
    except CliError as err:
        cli_error(args.command, err)
        return err.exit_code
    except BrokenPipeError:  # `fastsnap probe | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as err:  # a bug: still one line, unless asked for the traceback
        if os.environ.get("FASTSNAP_TRACEBACK"):
            raise
        cli_error(args.command, f"internal error: {type(err).__name__}: {err} "
                  "(FASTSNAP_TRACEBACK=1 shows where)")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
