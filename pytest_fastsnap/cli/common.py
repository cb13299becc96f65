"""What every `fastsnap` subcommand shares: errors, argument types, checks.

The convention (``fastsnap --help`` and the README list the exit codes):

* bad input -- a usage error, a missing or invalid file, an unusable QEMU
  binary -- raises :class:`UsageError` (exit 2); an operation that failed
  raises :class:`CliError` (exit 1).  :func:`pytest_fastsnap.cli.main` prints
  ``fastsnap COMMAND: MESSAGE`` as one line on stderr and exits with the code.
* argparse errors are one line too (:class:`OneLineArgumentParser`, which the
  subcommand parsers inherit), exit 2.
* validate before creating anything: argument types (:func:`size_arg`,
  :func:`int_arg`), then files (:func:`existing_file`, :func:`output_file`),
  then the QEMU binary (:func:`validate_qemu_binary`), then
  :func:`temp_workdir`, which is removed however the command ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"(?P<num>[0-9]+)(?:(?P<unit>[KMGT])(?:I?B)?|(?P<bytes>B))?", re.IGNORECASE)
MAX_SIZE = (1 << 64) - 1


class CliError(Exception):
    """The operation failed (exit 1); the message is the line the user sees."""

    exit_code = EXIT_FAILED


class UsageError(CliError):
    """Bad input: usage, a missing or invalid file, an unusable QEMU binary (exit 2)."""

    exit_code = EXIT_USAGE


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``fastsnap save: argument --mem: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def one_line(err: BaseException | str) -> str:
    """*err* as one line: its first line, plus its last line when they differ
    (QemuError carries the command line and QEMU's log; the log's last line
    usually names the problem)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__ if isinstance(err, BaseException) else ""
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def cli_error(command: str, err: BaseException | str) -> None:
    """Print the one error line of *command* on stderr."""
    print(f"fastsnap {command}: {one_line(err)}", file=sys.stderr, flush=True)


def parse_size(text: str, *, default_unit: str = "", maximum: int = MAX_SIZE) -> int:
    """Bytes in *text*: digits with an optional K/M/G/T suffix (powers of 1024;
    ``KiB``/``KB`` spellings accepted), nothing else.  A bare number is in
    *default_unit* (``"M"`` for QEMU ``-m`` syntax).  ValueError names the text."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a size (digits with an optional K, M, G or T "
                         "suffix, e.g. 256M)")
    unit = m["unit"].upper() if m["unit"] else ("" if m["bytes"] else default_unit)
    value = int(m["num"]) * SIZE_UNITS[unit]
    if value > maximum:
        raise ValueError(f"{text!r} is too large (at most {maximum} bytes)")
    return value


def size_arg(*, default_unit: str = "", minimum: int = 0) -> Callable[[str], int]:
    """argparse ``type=`` for a size (see :func:`parse_size`), at least *minimum*."""
    def convert(text: str) -> int:
        try:
            value = parse_size(text, default_unit=default_unit)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is less than {minimum} bytes")
        return value
    return convert


def int_arg(*, minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """argparse ``type=`` for an integer (``0x`` hex accepted) within bounds."""
    def convert(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is less than {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{text} is more than {maximum}")
        return value
    return convert


def seconds_arg(*, maximum: float = 3600.0) -> Callable[[str], float]:
    """argparse ``type=`` for a positive number of seconds up to *maximum*."""
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not 0 < value <= maximum:
            raise argparse.ArgumentTypeError(f"{text} is not within (0, {maximum:g}] seconds")
        return value
    return convert


def existing_file(path: str | Path, what: str = "file") -> Path:
    """*path* as a readable regular file, or UsageError saying what it is instead."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {p}: no such file")
    if p.is_dir():
        raise UsageError(f"{what} {p}: is a directory, not a file")
    if not p.is_file():
        raise UsageError(f"{what} {p}: not a regular file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{what} {p}: not readable")
    return p


def output_file(path: str | Path, what: str = "output") -> Path:
    """*path* as a file that can be written: its directory exists and is
    writable, and it is not a directory.  Nothing is created."""
    p = Path(path).absolute()
    if p.is_dir():
        raise UsageError(f"{what} {p}: is a directory")
    if p.exists() and not p.is_file():
        raise UsageError(f"{what} {p}: exists and is not a regular file")
    if not p.parent.is_dir():
        raise UsageError(f"{what} {p}: directory {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {p}: directory {p.parent} is not writable")
    return p


def output_dir(path: str | Path, what: str = "output directory") -> Path:
    """*path* as a directory that exists or can be created (nothing is created)."""
    p = Path(path).absolute()
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{what} {p}: exists and is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UsageError(f"{what} {p}: not writable")
        return p
    parent = next((q for q in p.parents if q.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {p}: cannot be created (no writable parent directory)")
    return p


def validate_qemu_binary(binary: str, timeout: float = 30.0) -> str:
    """Absolute path of a QEMU binary that runs and prints its version within
    *timeout*; UsageError with the probe's one-line reason otherwise."""
    from pytest_fastsnap.qemu.probe import ProbeError, check_binary

    try:
        return check_binary(binary, timeout=timeout)[0]
    except ProbeError as err:
        raise UsageError(str(err)) from None


@contextlib.contextmanager
def temp_workdir(prefix: str) -> Iterator[Path]:
    """A fresh directory ``/tmp/<prefix>XXXX`` (short: QEMU's sockets live in
    it), removed with everything in it however the block ends."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
