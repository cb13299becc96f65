"""Every mutable place of a valid mapped-ram snapshot, by a stable name.

A :class:`Location` is a named byte range (``pc.ram.header.pages_offset``,
``dev:cpu/0.env.eip``, ``ram.part1.flags``...).  Names are stable across
snapshots made the same way, so an edit recorded against one snapshot can be
re-applied to a fresh one (regression tests commit edits, never files).

Device-state fields are found through the VM description JSON at the end of
the file: its devices are in section order, and each field's ``size`` (times
``array_len``) says how many bytes it takes in the stream, so walking the FULL
sections with it gives the offset of every field (analyze-migration.py does
the same).  The walk stops at the first section that does not match.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pytest_fastsnap.snapshot.format import (
    VM_FOOTER,
    VM_FULL,
    VM_SUBSECTION,
    Command,
    RamRecord,
    Snapshot,
)

__all__ = ["Location", "find_locations"]

# Groups whose edits cannot legitimately change guest memory: a completed load
# of a file edited only there must restore the source's memory.
MEMORY_SAFE_GROUPS = frozenset({"stream", "config", "ram_section", "mem_size", "block_list",
                                "ram_header", "ram_records", "framing", "tail"})
COUNT_HINTS = ("num", "count", "len", "size", "idx", "index", "nr", "n_", "max", "pos", "ptr",
               "head", "tail", "offset", "entries")


@dataclass(frozen=True)
class Location:
    """Bytes ``[offset, offset+size)`` named *name*; ``numeric``: a big-endian integer."""

    name: str
    offset: int
    size: int
    group: str
    numeric: bool
    hint: str = ""  # e.g. "count" for vmstate fields named like counts or indices

    @property
    def memory_safe(self) -> bool:
        return self.group in MEMORY_SAFE_GROUPS

    @property
    def end(self) -> int:
        return self.offset + self.size


def _int(name: str, offset: int, size: int, group: str, hint: str = "") -> Location:
    return Location(name, offset, size, group, True, hint)


def _bytes(name: str, offset: int, size: int, group: str) -> Location:
    return Location(name, offset, size, group, False)


def find_locations(snap: Snapshot) -> list[Location]:
    """All locations of a valid snapshot, in file order (duplicates by name dropped)."""
    if not snap.ok:
        raise ValueError(f"{snap.path} is not a valid snapshot: {snap.problem_names()}")
    out: dict[str, Location] = {}
    for loc in _all(snap):
        if loc.size > 0 and loc.name not in out:
            out[loc.name] = loc
    return sorted(out.values(), key=lambda loc: loc.offset)


def _all(snap: Snapshot) -> Iterator[Location]:
    yield from _stream(snap)
    yield from _ram(snap)
    yield from _records(snap)
    yield from _devices(snap)
    yield from _tail(snap)


def _stream(snap: Snapshot) -> Iterator[Location]:
    assert snap.header is not None and snap.configuration is not None
    yield _int("stream.magic", snap.header.magic.offset, 4, "stream")
    yield _int("stream.version", snap.header.version.offset, 4, "stream")
    conf = snap.configuration
    yield _int("config.type", conf.offset, 1, "config")
    yield _int("config.machine_length", conf.machine_length.offset, 4, "config")
    yield _bytes("config.machine", conf.machine.offset, conf.machine.size, "config")
    for sub in conf.subsections:
        short = sub.name.value.rsplit("/", 1)[-1]
        yield _int(f"config.{short}.type", sub.offset, 1, "config")
        yield _int(f"config.{short}.name_length", sub.name.offset, 1, "config")
        yield _int(f"config.{short}.version", sub.version_id.offset, 4, "config")
    if conf.target_page_bits is not None:
        yield _int("config.target_page_bits", conf.target_page_bits.offset, 4, "config")
    if conf.capabilities_count is not None:
        yield _int("config.caps_count", conf.capabilities_count.offset, 4, "config")
    for i, cap in enumerate(conf.capabilities):
        yield _int(f"config.cap{i}.length", cap.offset, 1, "config")
        yield _bytes(f"config.cap{i}", cap.offset + 1, cap.size - 1, "config")


def _ram(snap: Snapshot) -> Iterator[Location]:
    ram = snap.ram
    assert ram is not None
    yield _int("ram.start.type", ram.offset, 1, "ram_section")
    yield _int("ram.start.section_id", ram.section_id.offset, 4, "ram_section")
    yield _int("ram.start.idstr_length", ram.idstr.offset, 1, "ram_section")
    yield _bytes("ram.start.idstr", ram.idstr.offset + 1, ram.idstr.size - 1, "ram_section")
    yield _int("ram.start.instance", ram.instance_id.offset, 4, "ram_section")
    yield _int("ram.start.version", ram.version_id.offset, 4, "ram_section")
    yield _int("ram.mem_size", ram.mem_size.offset, 8, "mem_size")
    for blk in ram.blocks:
        b = blk.name
        yield _int(f"{b}.id_length", blk.id.offset, 1, "block_list")
        yield _bytes(f"{b}.id", blk.id.offset + 1, blk.id.size - 1, "block_list")
        yield _int(f"{b}.used_length", blk.used_length.offset, 8, "block_list")
        if blk.gpa is not None:
            yield _int(f"{b}.gpa", blk.gpa.offset, 8, "block_list")
        hdr = blk.header
        for name in ("version", "page_size", "bitmap_offset", "pages_offset"):
            fld = hdr.field(name)
            yield _int(f"{b}.header.{name}", fld.offset, fld.size, "ram_header")
        if not blk.ignored:
            rng = blk.bitmap_range
            yield _bytes(f"{b}.bitmap", rng.start, rng.size, "bitmap")
            pages = blk.pages_range
            yield _bytes(f"{b}.pages", pages.start, pages.size, "pages")
    if ram.eos is not None:
        yield _int("ram.start.eos", ram.eos.offset, 8, "ram_section")
    if ram.footer is not None:
        yield _int("ram.start.footer", ram.footer.offset, 1, "ram_section")
        yield _int("ram.start.footer_sid", ram.footer.section_id.offset, 4, "ram_section")


def _records(snap: Snapshot) -> Iterator[Location]:
    counts: dict[str, int] = {}
    for rec in snap.records:
        kind = rec.kind.lower() if isinstance(rec, RamRecord) else "cmd"
        counts[kind] = counts.get(kind, 0) + 1
        tag = f"ram.{kind}{counts[kind]}"
        yield _int(f"{tag}.type", rec.offset, 1, "ram_records")
        if isinstance(rec, Command):
            yield _int(f"{tag}.cmd", rec.cmd.offset, 2, "ram_records")
            yield _int(f"{tag}.length", rec.length.offset, 2, "ram_records")
        else:
            yield _int(f"{tag}.section_id", rec.section_id.offset, 4, "ram_records")
            yield _int(f"{tag}.flags", rec.eos.offset, 8, "ram_records")
            yield _int(f"{tag}.footer", rec.footer.offset, 1, "ram_records")
            yield _int(f"{tag}.footer_sid", rec.footer.section_id.offset, 4, "ram_records")


def _tail(snap: Snapshot) -> Iterator[Location]:
    if snap.eof_offset is not None:
        yield _int("tail.eof", snap.eof_offset, 1, "tail")
    if snap.vmdesc is not None:
        yield _int("tail.vmdesc.type", snap.vmdesc.offset, 1, "tail")
        yield _int("tail.vmdesc.length", snap.vmdesc.length.offset, 4, "tail")
        rng = snap.vmdesc.json_range
        yield _bytes("tail.vmdesc.json", rng.start, rng.size, "tail")


# -- device state through the VM description -------------------------------------------


class _Walk:
    def __init__(self, fd: int, end: int) -> None:
        self.fd = fd
        self.end = end
        self.out: list[Location] = []

    def byte(self, pos: int) -> int | None:
        if pos >= self.end:
            return None
        data = os.pread(self.fd, 1, pos)
        return data[0] if data else None

    def uint(self, pos: int, n: int) -> int | None:
        if pos + n > self.end:
            return None
        return int.from_bytes(os.pread(self.fd, n, pos), "big")

    def str8(self, pos: int) -> str | None:
        n = self.byte(pos)
        if n is None or pos + 1 + n > self.end:
            return None
        return os.pread(self.fd, n, pos + 1).decode("latin-1")

    def fields(self, prefix: str, fields: list[dict[str, Any]], pos: int) -> int:
        for fld in fields:
            size = int(fld.get("size", 0))
            count = int(fld.get("array_len", 1))
            name = f"{prefix}.{fld.get('name', '?')}"
            sub = fld.get("struct")
            for i in range(count):
                elem = f"{name}[{i}]" if "array_len" in fld else name
                if isinstance(sub, dict) and _fields_size(sub) == size:
                    self.fields(elem, sub.get("fields", []), pos)
                else:
                    self.leaf(elem, fld.get("type", ""), pos, size)
                pos += size
        return pos

    def leaf(self, name: str, vtype: str, pos: int, size: int) -> None:
        if size <= 0 or pos + size > self.end:
            return
        numeric = size in (1, 2, 4, 8) and ("int" in vtype or vtype in ("bool", "uint8"))
        low = name.rsplit(".", 1)[-1].lower()
        hint = "count" if any(h in low for h in COUNT_HINTS) else ""
        self.out.append(Location(name, pos, size, "device", numeric, hint))

    def vmsd(self, prefix: str, desc: dict[str, Any], pos: int) -> int | None:
        pos = self.fields(prefix, desc.get("fields", []), pos)
        for sub in desc.get("subsections", []):
            if self.byte(pos) != VM_SUBSECTION:
                return None
            name = self.str8(pos + 1)
            if name is None or name != sub.get("vmsd_name"):
                return None
            short = f"{prefix}/{name.rsplit('/', 1)[-1]}"
            self.out.append(_int(f"{short}.sub_type", pos, 1, "framing"))
            self.out.append(_int(f"{short}.sub_name_length", pos + 1, 1, "framing"))
            vpos = pos + 2 + len(name)
            self.out.append(_int(f"{short}.sub_version", vpos, 4, "framing"))
            nxt = self.vmsd(short, sub, vpos + 4)
            if nxt is None:
                return None
            pos = nxt
        return pos

    def section(self, dev: dict[str, Any], pos: int) -> int | None:
        if self.byte(pos) != VM_FULL:
            return None
        sid = self.uint(pos + 1, 4)
        idstr = self.str8(pos + 5)
        if sid is None or idstr is None or idstr != dev.get("name"):
            return None
        ipos = pos + 6 + len(idstr)
        if self.uint(ipos, 4) != dev.get("instance_id", 0):
            return None
        tag = f"dev:{idstr}/{dev.get('instance_id', 0)}"
        found = len(self.out)
        self.out += [_int(f"{tag}.section_type", pos, 1, "framing"),
                     _int(f"{tag}.section_id", pos + 1, 4, "framing"),
                     _int(f"{tag}.idstr_length", pos + 5, 1, "framing"),
                     _int(f"{tag}.instance", ipos, 4, "framing"),
                     _int(f"{tag}.version", ipos + 4, 4, "framing")]
        end = self.vmsd(tag, dev, ipos + 8)
        if end is None or self.byte(end) != VM_FOOTER or self.uint(end + 1, 4) != sid:
            del self.out[found:]
            return None
        self.out += [_int(f"{tag}.footer", end, 1, "framing"),
                     _int(f"{tag}.footer_sid", end + 1, 4, "framing")]
        return end + 5


def _fields_size(desc: dict[str, Any]) -> int:
    total = 0
    for fld in desc.get("fields", []):
        total += int(fld.get("size", 0)) * int(fld.get("array_len", 1))
    return total


def _devices(snap: Snapshot) -> Iterator[Location]:
    if snap.device_state is None or snap.vmdesc is None or not isinstance(snap.vmdesc.data,
                                                                            dict):
        return
    devices = snap.vmdesc.data.get("devices", [])
    fd = os.open(snap.path, os.O_RDONLY)
    try:
        walk = _Walk(fd, snap.device_state.end)
        pos: int | None = snap.device_state.start
        for dev in devices:
            if pos is None or not isinstance(dev, dict):
                break
            pos = walk.section(dev, pos)
        yield from walk.out
    finally:
        os.close(fd)
