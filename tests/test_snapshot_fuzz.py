"""Random corruption of a synthetic snapshot: the reader only ever raises FormatError
(strict), never raises (lenient), and stays fast."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from pytest_fastsnap.snapshot.errors import ERROR_NAMES, FormatError
from pytest_fastsnap.snapshot.format import parse
from pytest_fastsnap.snapshot.sparse import sparse_copy
from pytest_fastsnap.snapshot.writer import device_section, write_snapshot

PS = 4096


def _base(path: Path) -> Path:
    ram = bytearray(80 * PS)
    for i in (0, 7, 64, 79):
        ram[i * PS:(i + 1) * PS] = bytes([i + 1]) * PS
    return write_snapshot(path, "pc-q35-10.0", [("pc.ram", bytes(ram)),
                                                ("pc.bios", b"\x5a" * (4 * PS))],
                          device_section(2, "timer", b"\x01" * 600), 0x2000,
                          vmdesc={"page_size": PS, "devices": []})


@pytest.mark.parametrize("seed", range(4))
def test_random_corruption(tmp_path: Path, seed: int) -> None:
    base = parse(_base(tmp_path / "base.img"), 0x2000)
    assert base.ok
    stream = [(0x2000, 0x2080)] + [(b.offset, b.header.end + 8) for b in base.blocks] \
        + [(base.blocks[-1].next_offset, base.file_size)]
    rng = random.Random(seed)
    seen: set[str] = set()
    for _ in range(150):
        dst = sparse_copy(base.path, tmp_path / "fuzz.img")
        with open(dst, "r+b") as f:
            for _ in range(rng.choice((1, 1, 2, 5))):
                start, end = rng.choice(stream)
                f.seek(rng.randrange(start, end))
                f.write(rng.randbytes(rng.choice((1, 1, 8))))
            if rng.random() < 0.15:
                f.truncate(rng.randrange(base.file_size))
        began = time.monotonic()
        try:
            parse(dst, 0x2000)
        except FormatError as err:
            seen.add(err.name)
        lenient = parse(dst, 0x2000, lenient=True)
        assert all(p.name in ERROR_NAMES for p in lenient.problems)
        assert time.monotonic() - began < 10.0  # bounded time, not a speed goal
    assert len(seen) >= 5
