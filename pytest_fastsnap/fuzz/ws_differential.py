"""The loader's working-set reader (``serve SNAP --ws FILE --describe``,
``src/bridge_ws.c``) and the Python one (``restore.wsfile``: ``read_ws`` +
``check_layout``) on one file and one snapshot.

Both must agree: both refuse (the loader with ``E_WS``), or both accept and
read the same entries in the same order.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pytest_fastsnap.native.loader import run_loader
from pytest_fastsnap.restore.wsfile import Layout, WsFileError, check_layout, read_ws
from pytest_fastsnap.snapshot.writer import write_snapshot

__all__ = ["WsVerdicts", "c_ws_verdict", "compare_ws_readers", "harness_snapshot",
           "python_ws_verdict"]

Entries = list[tuple[int, int]]


@dataclass(frozen=True)
class WsVerdicts:
    """``None`` = accepted, else the refusal (``E_WS``...); the entries each
    reader read from an accepted file; ``c_exit`` outside 0/2 is a loader crash."""

    c: str | None
    python: str | None
    c_exit: int
    c_entries: Entries | None = None
    python_entries: Entries | None = None

    @property
    def agree(self) -> bool:
        return (self.c_exit in (0, 2) and self.c == self.python
                and self.c_entries == self.python_entries)

    def __bool__(self) -> bool:
        """Truthy only when the readers agree: ``assert compare_ws_readers(...)``."""
        return self.agree

    def __str__(self) -> str:
        entries = "" if self.c_entries == self.python_entries else \
            f"; entries differ (C {len(self.c_entries or [])}, Python " \
            f"{len(self.python_entries or [])})"
        return (f"C {self.c or 'ok'} (exit {self.c_exit}) vs Python "
                f"{self.python or 'ok'}{entries}")


def python_ws_verdict(path: str | os.PathLike[str], layout: Layout
                      ) -> tuple[str | None, Entries | None]:
    """``(None, entries)`` when the Python reader accepts *path* for *layout*,
    else ``("E_WS", None)``."""
    try:
        ws = read_ws(path)
    except WsFileError:
        return "E_WS", None
    return (None, ws.entries) if check_layout(ws, layout) else ("E_WS", None)


def c_ws_verdict(path: str | os.PathLike[str], snapshot: str | os.PathLike[str], *,
                 variant: str = "release", timeout: float = 30.0
                 ) -> tuple[str | None, int, Entries | None]:
    """The loader's verdict, exit code and entries (a timeout counts as exit -9)."""
    try:
        res = run_loader(["serve", str(snapshot), "--ws", str(path), "--describe", "--json"],
                         variant=variant, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "TIMEOUT", -9, None
    try:
        out = json.loads(res.stdout)
    except ValueError:
        out = None
    if res.returncode == 2:
        name = out.get("error_name") if isinstance(out, dict) else None
        return (str(name) if name else "UNPARSEABLE"), 2, None
    if res.returncode != 0:
        return f"EXIT_{res.returncode}", res.returncode, None
    if not isinstance(out, dict) or not isinstance(out.get("ws"), list):
        return "UNPARSEABLE", 0, None
    return None, 0, [(int(b), int(p)) for b, p in out["ws"]]


def compare_ws_readers(path: Path, snapshot: Path, layout: Layout, *,
                       variant: str = "release") -> WsVerdicts:
    c, code, c_entries = c_ws_verdict(path, snapshot, variant=variant)
    py, py_entries = python_ws_verdict(path, layout)
    return WsVerdicts(c, py, code, c_entries, py_entries)


def harness_snapshot(path: Path, layout: Layout) -> Path:
    """A valid mapped-ram snapshot with *layout*'s blocks (one data page each),
    for the loader to check working-set files against."""
    ps = layout.page_size
    return write_snapshot(path, "pc-q35-10.0",
                          [(name, length, {0: bytes([i + 1]) * ps})
                           for i, (name, length) in enumerate(layout.blocks)],
                          vmdesc={"page_size": ps, "devices": []})
