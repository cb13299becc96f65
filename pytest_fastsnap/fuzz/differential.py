"""The C parser (``fastsnap-loader verify``) and the Python reader on one file.

Both are strict readers of the same format; on any input they must give the
same verdict: both accept, or both refuse with the same rule (``E_<NAME>``).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pytest_fastsnap.native.loader import run_loader
from pytest_fastsnap.snapshot.errors import FormatError
from pytest_fastsnap.snapshot.format import parse

__all__ = ["ReaderVerdicts", "compare_readers", "python_verdict"]


@dataclass(frozen=True)
class ReaderVerdicts:
    """``None`` = accepted, else ``E_<NAME>``; ``c_crash`` is a non-0/2 loader exit."""

    c: str | None
    python: str | None
    c_exit: int

    @property
    def agree(self) -> bool:
        return self.c_exit in (0, 2) and self.c == self.python

    def __bool__(self) -> bool:
        """Truthy only when the readers agree: ``assert compare_readers(p)`` checks it."""
        return self.agree

    def __str__(self) -> str:
        return f"C {self.c or 'ok'} (exit {self.c_exit}) vs Python {self.python or 'ok'}"


def python_verdict(path: str | os.PathLike[str], offset: int = 0) -> str | None:
    try:
        parse(path, offset)
    except FormatError as err:
        return f"E_{err.name}"
    return None


def c_verdict(path: str | os.PathLike[str], offset: int = 0, *, variant: str = "release",
              timeout: float = 30.0) -> tuple[str | None, int]:
    """The loader's verdict and exit code (a timeout counts as exit -9)."""
    try:
        res = run_loader(["verify", str(path), "--offset", str(offset), "--json"],
                         variant=variant, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "TIMEOUT", -9
    if res.returncode == 2:
        try:
            return str(json.loads(res.stdout)["error"]), 2
        except (ValueError, KeyError, TypeError):
            return "UNPARSEABLE", 2
    return (None if res.returncode == 0 else f"EXIT_{res.returncode}"), res.returncode


def compare_readers(path: Path, offset: int = 0, *, variant: str = "release") -> ReaderVerdicts:
    c, code = c_verdict(path, offset, variant=variant)
    return ReaderVerdicts(c, python_verdict(path, offset), code)
