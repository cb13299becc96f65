"""Format-aware edits of a valid snapshot, and applying them to a sparse copy.

An :class:`Edit` names its :class:`~.locations.Location` (not an absolute
offset), so the same edits re-applied to a fresh snapshot made the same way
produce the same mutant.  Kinds:

``set``       write ``data`` (hex) at ``at`` bytes into the location
``truncate``  cut the file ``at`` bytes into the location

:class:`Mutator` draws 1 to ``max_edits`` edits per input: a group first
(weighted so RAM headers, the block list, MEM_SIZE, framing and device state
all get their share however many locations each has), then a location, then a
value: boundary values (0, 1, -1, 2^31, 2^32, 2^63, 2^64-1, the file size,
the old value +- a page, +- 1 MiB, +- 1) or random ones.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pytest_fastsnap.fuzz.locations import Location
from pytest_fastsnap.snapshot.sparse import sparse_copy

__all__ = ["Edit", "Mutator", "apply_edits", "edits_from_json", "edits_to_json"]

PAGE = 4096
MIB = 1 << 20
# Relative weights of the location groups a mutator draws from.
GROUP_WEIGHTS = {"ram_header": 6, "block_list": 5, "mem_size": 2, "bitmap": 2, "framing": 3,
                 "ram_records": 2, "ram_section": 1, "config": 1, "stream": 0.3, "tail": 1,
                 "device": 5, "truncate": 1.5}


@dataclass(frozen=True)
class Edit:
    """One change: ``kind`` ``set`` (``data`` hex at ``at``) or ``truncate`` (at ``at``)."""

    target: str
    kind: str
    at: int
    data: str
    note: str
    memory_safe: bool

    def __str__(self) -> str:
        return self.note


def edits_to_json(edits: Sequence[Edit]) -> list[dict[str, Any]]:
    return [asdict(e) for e in edits]


def edits_from_json(data: Iterable[dict[str, Any]]) -> list[Edit]:
    return [Edit(str(d["target"]), str(d["kind"]), int(d["at"]), str(d["data"]),
                 str(d.get("note", "")), bool(d.get("memory_safe", False))) for d in data]


def apply_edits(base: Path, dst: Path, edits: Sequence[Edit],
                locations: dict[str, Location]) -> Path:
    """Sparse-copy *base* to *dst* and apply *edits*; KeyError for an unknown target."""
    sparse_copy(base, dst)
    cut: int | None = None
    fd = os.open(dst, os.O_WRONLY)
    try:
        for edit in edits:
            loc = locations.get(edit.target)
            if loc is None:
                raise KeyError(f"edit target {edit.target!r} is not in {base} "
                               f"(the snapshot is laid out differently)")
            if edit.kind == "truncate":
                pos = loc.offset + edit.at
                cut = pos if cut is None else min(cut, pos)
            elif edit.kind == "set":
                os.pwrite(fd, bytes.fromhex(edit.data), loc.offset + edit.at)
            else:
                raise ValueError(f"unknown edit kind {edit.kind!r}")
        if cut is not None:
            os.ftruncate(fd, cut)
    finally:
        os.close(fd)
    return dst


def _interesting(old: int, width: int, file_size: int) -> list[int]:
    top = 1 << (8 * width)
    values = [0, 1, top - 1, 1 << 31, 1 << 32, 1 << 63, (1 << 64) - 1, file_size,
              old + PAGE, old - PAGE, old + MIB, old - MIB, old + 1, old - 1, old * 2,
              old // 2, old ^ (1 << 63), (1 << 31) - 1, (1 << 15), 0x7F, 0x80, 0xFF]
    return sorted({v % top for v in values if v % top != old})


def _fmt(value: int) -> str:
    return f"{value:#x}" if value > 4096 else str(value)


class Mutator:
    """Draws edits over *locations* of the snapshot *base* (old values read from it)."""

    def __init__(self, base: Path, locations: Sequence[Location], max_edits: int = 3) -> None:
        self.base = Path(base)
        self.locations = list(locations)
        self.file_size = self.base.stat().st_size
        self.max_edits = max_edits
        self.by_group: dict[str, list[Location]] = {}
        for loc in self.locations:
            if loc.group != "pages":  # page data is payload, not format
                self.by_group.setdefault(loc.group, []).append(loc)
        self.counts = [loc for loc in self.by_group.get("device", []) if loc.hint]
        self.groups = [g for g in GROUP_WEIGHTS if g in self.by_group or g == "truncate"]
        self.weights = [GROUP_WEIGHTS[g] for g in self.groups]

    def draw(self, rng: random.Random) -> list[Edit]:
        n = rng.choice((1, 1, 2, 2, 3, 3, 4))
        return [self.edit(rng) for _ in range(min(n, self.max_edits))]

    def edit(self, rng: random.Random) -> Edit:
        group = rng.choices(self.groups, self.weights)[0]
        if group == "truncate":
            where = rng.choice(sorted({loc.group for loc in self.locations}))
            loc = rng.choice([loc for loc in self.locations if loc.group == where])
            at = rng.randrange(loc.size) if rng.random() < 0.7 else 0
            return Edit(loc.name, "truncate", at, "", f"truncate at {loc.name}+{at}", True)
        pool = self.by_group[group]
        if group == "device" and self.counts and rng.random() < 0.6:
            pool = self.counts
        loc = rng.choice(pool)
        if loc.numeric:
            return self._number(rng, loc)
        return self._bytes(rng, loc)

    def _number(self, rng: random.Random, loc: Location) -> Edit:
        old = self.old_value(loc)
        width = loc.size
        roll = rng.random()
        if roll < 0.7:
            value = rng.choice(_interesting(old, width, self.file_size) or [old ^ 1])
        elif roll < 0.85:
            value = old ^ (1 << rng.randrange(8 * width))
        else:
            value = rng.getrandbits(8 * width)
        if value == old:
            value = old ^ 1
        data = value.to_bytes(width, "big")
        return Edit(loc.name, "set", 0, data.hex(), f"{loc.name} {_fmt(old)} -> {_fmt(value)}",
                    loc.memory_safe)

    def _bytes(self, rng: random.Random, loc: Location) -> Edit:
        at = rng.randrange(loc.size)
        n = min(loc.size - at, rng.choice((1, 1, 2, 4, 8)))
        old = self.old_bytes(loc, at, n)
        roll = rng.random()
        if roll < 0.4:
            new = bytes(b ^ (1 << rng.randrange(8)) for b in old)
        elif roll < 0.7:
            new = bytes(rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x01, 0x2E)) for _ in old)
        else:
            new = rng.randbytes(n)
        if new == old:
            new = bytes(b ^ 0xFF for b in old)
        return Edit(loc.name, "set", at, new.hex(), f"{loc.name}+{at} {old.hex()} -> {new.hex()}",
                    loc.memory_safe)

    def old_value(self, loc: Location) -> int:
        return int.from_bytes(self.old_bytes(loc, 0, loc.size), "big")

    def old_bytes(self, loc: Location, at: int, n: int) -> bytes:
        fd = os.open(self.base, os.O_RDONLY)
        try:
            return os.pread(fd, n, loc.offset + at)
        finally:
            os.close(fd)


def dump_edits(path: Path, edits: Sequence[Edit]) -> None:
    path.write_text(json.dumps(edits_to_json(edits), indent=1) + "\n")
