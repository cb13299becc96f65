"""Pure-Python writer of mapped-ram files, laid out exactly as QEMU does (reference §2-§6).

``write_snapshot(path, machine, blocks, device_state)`` crafts synthetic inputs;
``spec_from_snapshot(parse(f))`` + ``write_spec`` re-serialises a QEMU-written
file byte for byte (apparent content; page regions stay sparse).

Layout: magic, version, configuration (subsections target-page-bits,
capabilities, uuid in QEMU's order), early-setup bytes, RAM START (MEM_SIZE,
then per block: str8 id, be64 used_length, [be64 GPA with x-ignore-shared],
MappedRamHeader with bitmap right after it and pages at
``roundup(bitmap_end, 1 MiB)``; the stream resumes at ``pages_offset +
used_length``), EOS + footer, the middle records (PART records and commands,
default: one PART and SWITCHOVER_START), RAM END, device state, EOF, VM
description.  Bitmaps are always written (QEMU pwrites them at completion);
only pages with their bit set are written, so clear pages stay holes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pytest_fastsnap.snapshot.bitmap import iter_set_pages, set_bit
from pytest_fastsnap.snapshot.format import (
    ALIGN,
    CMD_SWITCHOVER_START,
    HDR_VERSION,
    HEADER_SIZE,
    MAGIC,
    RAM_EOS,
    RAM_MEM_SIZE,
    RAM_SECTION_VERSION,
    STREAM_VERSION,
    Block,
    Command,
    Snapshot,
    bitmap_size_for,
    pread_padded,
    roundup,
)
from pytest_fastsnap.snapshot.sparse import copy_data_extents

__all__ = [
    "PART",
    "SWITCHOVER_START",
    "BlockSpec",
    "FilePages",
    "SnapshotSpec",
    "block_spec",
    "device_section",
    "spec_from_snapshot",
    "write_snapshot",
    "write_spec",
]

PART = "PART"
SWITCHOVER_START: tuple[int, bytes] = (CMD_SWITCHOVER_START, b"")
MAX_COPY_IN_MEMORY = 256 << 20
DEFAULT_VMDESC = b'{"page_size": 4096, "devices": []}'


@dataclass(frozen=True)
class BlockSpec:
    """One RAMBlock: ``pages`` maps page index -> page data for every set bit."""

    id: str
    used_length: int
    pages: Mapping[int, bytes] = field(default_factory=dict)
    gpa: int | None = None  # written only with x-ignore-shared
    ignored: bool = False  # x-ignore-shared block: header 0/0, no regions


@dataclass(frozen=True)
class SnapshotSpec:
    """Everything a mapped-ram file holds.  ``records`` is what comes between
    RAM START and RAM END: ``PART`` for a RAM PART record, ``(cmd, data)`` for
    a command (``SWITCHOVER_START`` = ``(0x0b, b"")``)."""

    machine: str
    blocks: Sequence[BlockSpec]
    device_state: bytes = b""
    offset: int = 0
    prefix: bytes | None = None  # bytes [0, offset) to write; None keeps the file's
    capabilities: Sequence[str] = ("mapped-ram",)
    target_page_bits: int | None = None
    uuid: bytes | None = None
    subsection_versions: Mapping[str, int] = field(default_factory=dict)
    early_setup: bytes = b""
    ram_section_id: int = 1
    total: int | None = None  # None: sum of used_length
    records: Sequence[str | tuple[int, bytes]] = (PART, SWITCHOVER_START)
    vmdesc: bytes | None = DEFAULT_VMDESC  # None: no VM description (suppress-vmdesc)
    stream_version: int = STREAM_VERSION

    @property
    def page_size(self) -> int:
        return 1 << (self.target_page_bits or 12)


class FilePages(Mapping[int, bytes]):
    """The set pages of a block of an existing file, read lazily."""

    def __init__(self, snapshot: Snapshot, block: Block) -> None:
        self.path = snapshot.path
        self.block = block
        self.bitmap = block.read_bitmap(snapshot.path)
        self._keys = list(iter_set_pages(self.bitmap, block.num_pages))
        self._set = set(self._keys)

    def __getitem__(self, index: int) -> bytes:
        if index not in self._set:
            raise KeyError(index)
        return pread_padded(self.path, self.block.page_offset(index), self.block.page_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def copy_to(self, fd: int, pages_offset: int) -> None:
        """Copy the set pages into *fd* at *pages_offset*, sparsely (holes stay holes)."""
        ps = self.block.page_size
        src = os.open(self.path, os.O_RDONLY)
        try:
            run_start = prev = None
            for i in [*self._keys, None]:
                if i is not None and prev is not None and i == prev + 1:
                    prev = i
                    continue
                if run_start is not None and prev is not None:
                    n = (prev + 1 - run_start) * ps
                    copy_data_extents(src, self.block.page_offset(run_start), fd,
                                      pages_offset + run_start * ps, n)
                run_start = prev = i
        finally:
            os.close(src)


def block_spec(entry: BlockSpec | tuple[Any, ...], page_size: int = 4096,
               zero_pages_as_data: bool = False) -> BlockSpec:
    """Accepts ``BlockSpec``, ``(id, content_bytes)`` or ``(id, used_length, pages)``.

    From content bytes, a page is stored iff it is not all zero (QEMU's default
    zero-page detection); ``zero_pages_as_data`` stores every page
    (``zero-page-detection=none``)."""
    if isinstance(entry, BlockSpec):
        return entry
    if len(entry) == 2 and isinstance(entry[1], bytes | bytearray | memoryview):
        ident, content = entry[0], bytes(entry[1])
        if len(content) % page_size:
            raise ValueError(f"block {ident!r}: {len(content)} bytes is not a page multiple")
        zero = bytes(page_size)
        pages = {i: content[i * page_size:(i + 1) * page_size]
                 for i in range(len(content) // page_size)
                 if zero_pages_as_data or content[i * page_size:(i + 1) * page_size] != zero}
        return BlockSpec(str(ident), len(content), pages)
    if len(entry) == 3:
        return BlockSpec(str(entry[0]), int(entry[1]), dict(entry[2]))
    raise TypeError(f"bad block entry {entry!r}: want BlockSpec, (id, bytes) or "
                    "(id, used_length, {page: data})")


def _str8(text: str) -> bytes:
    raw = text.encode("latin-1")
    if len(raw) > 255:
        raise ValueError(f"string too long for str8: {text!r}")
    return bytes([len(raw)]) + raw


def _configuration(spec: SnapshotSpec) -> bytes:
    name = spec.machine.encode("latin-1")
    out = bytearray(struct.pack(">IIBI", MAGIC, spec.stream_version, 0x07, len(name)) + name)

    def sub(sub_name: str, payload: bytes) -> None:
        version = spec.subsection_versions.get(sub_name, 1)
        out.extend(b"\x05" + _str8(sub_name) + struct.pack(">I", version) + payload)

    if spec.target_page_bits is not None:
        sub("configuration/target-page-bits", struct.pack(">I", spec.target_page_bits))
    if spec.capabilities:
        sub("configuration/capabilities", struct.pack(">I", len(spec.capabilities))
            + b"".join(_str8(c) for c in spec.capabilities))
    if spec.uuid is not None:
        if len(spec.uuid) != 16:
            raise ValueError("uuid must be 16 bytes")
        sub("configuration/uuid", spec.uuid)
    return bytes(out)


def device_section(section_id: int, idstr: str, payload: bytes, instance_id: int = 0,
                   version_id: int = 1) -> bytes:
    """One FULL device section with its footer (opaque *payload*), for synthetic files."""
    return b"\x04" + struct.pack(">I", section_id) + _str8(idstr) \
        + struct.pack(">II", instance_id, version_id) + payload \
        + b"\x7e" + struct.pack(">I", section_id)


def write_spec(path: str | os.PathLike[str], spec: SnapshotSpec) -> Path:
    """Write *spec* to *path* (created; truncated to ``spec.offset`` first, like QEMU)."""
    path = Path(path)
    ps = spec.page_size
    blocks = list(spec.blocks)
    sid = spec.ram_section_id
    ignore_shared = "x-ignore-shared" in spec.capabilities
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, spec.offset)
        if spec.prefix is not None:
            if len(spec.prefix) != spec.offset:
                raise ValueError("prefix must be exactly `offset` bytes")
            os.pwrite(fd, spec.prefix, 0)
        stream = bytearray(_configuration(spec))
        stream += spec.early_setup
        total = sum(b.used_length for b in blocks) if spec.total is None else spec.total
        stream += b"\x01" + struct.pack(">I", sid) + _str8("ram") \
            + struct.pack(">II", 0, RAM_SECTION_VERSION) + struct.pack(">Q", total | RAM_MEM_SIZE)
        pos = spec.offset
        for blk in blocks:
            stream += _str8(blk.id) + struct.pack(">Q", blk.used_length)
            if ignore_shared:
                stream += struct.pack(">Q", blk.gpa or 0)
            hdr_at = pos + len(stream) + HEADER_SIZE
            num_pages = blk.used_length // ps
            bsize = bitmap_size_for(num_pages)
            if blk.ignored:
                stream += struct.pack(">IQQQ", HDR_VERSION, ps, 0, 0)
                continue
            pages_offset = roundup(hdr_at + bsize, ALIGN)
            stream += struct.pack(">IQQQ", HDR_VERSION, ps, hdr_at, pages_offset)
            os.pwrite(fd, bytes(stream), pos)
            stream = bytearray()
            bitmap = bytearray(bsize)
            for i in blk.pages:
                if not 0 <= i < num_pages:
                    raise ValueError(f"block {blk.id!r}: page {i} outside {num_pages} pages")
                set_bit(bitmap, i)
            copy_to = getattr(blk.pages, "copy_to", None)
            if copy_to is not None:
                copy_to(fd, pages_offset)
            else:
                for i, data in sorted(blk.pages.items()):
                    if len(data) != ps:
                        raise ValueError(f"block {blk.id!r}: page {i} is {len(data)} bytes")
                    os.pwrite(fd, data, pages_offset + i * ps)
            os.pwrite(fd, bytes(bitmap), hdr_at)
            pos = pages_offset + blk.used_length
        footer = b"\x7e" + struct.pack(">I", sid)
        stream += struct.pack(">Q", RAM_EOS) + footer
        eos_record = struct.pack(">Q", RAM_EOS) + footer
        for rec in spec.records:
            if isinstance(rec, str):
                if rec != PART:
                    raise ValueError(f"unknown record {rec!r} (PART or (cmd, data))")
                stream += b"\x02" + struct.pack(">I", sid) + eos_record
            else:
                cmd, data = rec
                stream += b"\x08" + struct.pack(">HH", cmd, len(data)) + data
        stream += b"\x03" + struct.pack(">I", sid) + eos_record
        stream += spec.device_state + b"\x00"
        if spec.vmdesc is not None:
            stream += b"\x06" + struct.pack(">I", len(spec.vmdesc)) + spec.vmdesc
        os.pwrite(fd, bytes(stream), pos)
        os.ftruncate(fd, pos + len(stream))
    finally:
        os.close(fd)
    return path


def write_snapshot(path: str | os.PathLike[str], machine: str,
                   blocks: Sequence[BlockSpec | tuple[Any, ...]], device_state: bytes = b"",
                   offset: int = 0, *,
                   vmdesc: Mapping[str, Any] | bytes | None = DEFAULT_VMDESC,
                   zero_pages_as_data: bool = False, **options: Any) -> Path:
    """Write a valid mapped-ram file (see :class:`SnapshotSpec` for *options*).

    *blocks*: ``BlockSpec``, ``(id, content_bytes)`` or ``(id, used_length,
    {page_index: page_bytes})``.  *vmdesc*: a JSON-able dict, raw bytes, or
    None for no VM description (as with ``suppress-vmdesc``)."""
    ps = 1 << (options.get("target_page_bits") or 12)
    specs = [block_spec(b, ps, zero_pages_as_data) for b in blocks]
    spec = SnapshotSpec(machine=machine, blocks=specs, device_state=device_state,
                        offset=offset, **options)
    if isinstance(vmdesc, Mapping):
        spec = replace(spec, vmdesc=json.dumps(vmdesc).encode())
    else:
        spec = replace(spec, vmdesc=None if vmdesc is None else bytes(vmdesc))
    return write_spec(path, spec)


def spec_from_snapshot(snapshot: Snapshot) -> SnapshotSpec:
    """The :class:`SnapshotSpec` that re-serialises a (completely parsed) snapshot.

    Page data stays in the source file (:class:`FilePages`), so this is cheap
    for big files."""
    config, ram = snapshot.configuration, snapshot.ram
    if config is None or ram is None or snapshot.ram_end is None \
            or snapshot.device_state is None or snapshot.header is None:
        raise ValueError(f"{snapshot.path}: cannot re-serialise an incompletely parsed file "
                         f"({[str(p) for p in snapshot.problems]})")
    if snapshot.device_state.size > MAX_COPY_IN_MEMORY:
        raise ValueError("device state too large to copy in memory")
    path, size = snapshot.path, snapshot.file_size

    def grab(start: int, end: int) -> bytes:
        return pread_padded(path, start, end - start)

    records: list[str | tuple[int, bytes]] = []
    for rec in snapshot.records:
        if isinstance(rec, Command):
            records.append((rec.cmd.value, grab(rec.data.start, rec.data.end)))
        elif rec.kind == "PART":
            records.append(PART)
    blocks = [BlockSpec(b.name, b.used_length.value, {} if b.ignored else FilePages(snapshot, b),
                        b.gpa.value if b.gpa else None, b.ignored) for b in ram.blocks]
    offset = snapshot.stream_offset
    early = snapshot.early_setup
    return SnapshotSpec(
        machine=config.machine.value, blocks=blocks,
        device_state=grab(snapshot.device_state.start, snapshot.device_state.end),
        offset=offset, prefix=grab(0, offset) if 0 < offset <= min(size, MAX_COPY_IN_MEMORY)
        else None,
        capabilities=config.capability_names,
        target_page_bits=config.target_page_bits.value if config.target_page_bits else None,
        uuid=config.uuid.value if config.uuid else None,
        subsection_versions={s.name.value: s.version_id.value for s in config.subsections},
        early_setup=grab(early.start, early.end) if early else b"",
        ram_section_id=ram.section_id.value, total=ram.total, records=tuple(records),
        vmdesc=grab(snapshot.vmdesc.json_range.start, snapshot.vmdesc.json_range.end)
        if snapshot.vmdesc else None,
        stream_version=snapshot.header.version.value)
