"""The C and Python readers agree, on the commands QEMU's loader allows before RAM END."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_fastsnap.fuzz.differential import compare_readers
from pytest_fastsnap.snapshot.writer import (
    PART,
    SWITCHOVER_START,
    BlockSpec,
    SnapshotSpec,
    write_spec,
)

PS = 4096
MIG_CMD_PING = 0x02


def _write(path: Path, records: tuple[str | tuple[int, bytes], ...]) -> Path:
    spec = SnapshotSpec("pc-q35-10.0", [BlockSpec("pc.ram", 8 * PS, {0: b"\x11" * PS})],
                        records=records)
    write_spec(path, spec)
    return path


@pytest.mark.parametrize("records, verdict", [
    ((PART, SWITCHOVER_START), None),
    ((PART,), None),
    ((PART, (MIG_CMD_PING, b"\0\0\0\1")), "E_RECORD"),  # needs a return path
    ((SWITCHOVER_START, (0x0B, b"\0")), "E_RECORD"),  # SWITCHOVER_START has no payload
    (((0x0C, b""),), "E_RECORD"),  # past MIG_CMD_MAX
])
def test_readers_agree_on_commands_before_ram_end(
        tmp_path: Path, records: tuple[str | tuple[int, bytes], ...],
        verdict: str | None) -> None:
    got = compare_readers(_write(tmp_path / "cmd.img", records))
    assert got.agree, str(got)
    assert got.python == verdict, str(got)
