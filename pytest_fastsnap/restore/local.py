"""The ``loader-local`` strategy: the native loader restores RAM into its own
memory through userfaultfd (``fastsnap-loader load``), with no QEMU.

There is no guest to ask, so what it restored is judged by its per-block
sha256 against the pure-Python reader of the same file (an independent
reader), and through that reader against a source's memory.

    local = restore_local(path, offset)
    local.error_name            # "E_TRUNCATED", ... when the loader refused the file
    local.block_digests         # {block id: sha256 of its restored memory}
    local.differs_from_file()   # blocks whose restored memory differs from the file's
"""

from __future__ import annotations

import json
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_fastsnap.native.loader import run_loader
from pytest_fastsnap.snapshot.digest import block_digest, range_digests, restored_memory_range
from pytest_fastsnap.snapshot.format import parse


@dataclass(frozen=True)
class LocalRestore:
    """One ``fastsnap-loader load`` run and what it printed."""

    path: Path
    offset: int
    returncode: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict[str, Any]:
        try:
            data = json.loads(self.stdout)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def error_name(self) -> str | None:
        """The strict parser's ``E_`` name when the file was refused (exit 2)."""
        return self.report.get("error") if self.returncode == 2 else None

    @property
    def block_digests(self) -> dict[str, str]:
        return {b["id"]: b["sha256"] for b in self.report.get("blocks", [])}

    @property
    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.report.get("stats", {})
        return stats

    def describe(self) -> str:
        """One line for assertion messages: exit status and the loader's own words."""
        if self.returncode < 0:
            how = f"killed by {signal.Signals(-self.returncode).name}"
        else:
            how = f"exit {self.returncode}"
        return f"loader-local {how}: {self.stderr.strip() or self.stdout.strip()[:300]}"

    def differs_from_file(self) -> list[str]:
        """Blocks whose restored digest differs from the Python reader's (or are missing)."""
        parsed = parse(self.path, offset=self.offset)
        want = {b.name: block_digest(parsed, b) for b in parsed.blocks}
        got = self.block_digests
        return sorted(name for name in want.keys() | got.keys() if got.get(name) != want.get(name))


def restore_local(path: str | Path, offset: int = 0, *, mode: str = "lazy",
                  access: str = "random", threads: int = 2, variant: str = "release",
                  extra: Sequence[str] = (), timeout: float = 120.0) -> LocalRestore:
    """Restore *path* with the native loader (``load --json``); never raises on a refusal."""
    args = ["load", str(path), "--offset", str(offset), "--mode", mode, "--access", access,
            "--threads", str(threads), "--json", *extra]
    result = run_loader(args, variant=variant, timeout=timeout)
    return LocalRestore(Path(path), offset, result.returncode, result.stdout, result.stderr)


def file_memory_digests(path: str | Path, block: str, ranges: Sequence[tuple[int, int]],
                        offset: int = 0) -> dict[str, str]:
    """:meth:`QemuMachine.memory_digests` of *ranges*, computed from the file by
    the Python reader: block offset = guest-physical address (the main RAM block
    of a guest below 4 GiB: ``pc.ram``, ``microvm.ram``)."""
    parsed = parse(path, offset=offset)
    return range_digests(lambda a, n: restored_memory_range(parsed, block, a, n), ranges)
