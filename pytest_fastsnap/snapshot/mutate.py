"""Copy a mapped-ram snapshot and change exactly one thing in the copy.

Every helper takes ``(src, dst, ...)`` (plus ``stream_offset`` for files
saved with ``offset=``), copies *src* sparsely (holes are never written) and
returns a :class:`Mutation` describing the change and the
:class:`~pytest_fastsnap.snapshot.errors.FormatError` name the strict parser
must give (``None``: the file stays format-valid).  ``str(mutation)`` is a
short name for test ids.

Block ids: a same-length id is patched in place; an id of another length
(including the empty id) is written by re-serialising the whole file with
:mod:`.writer`, which lays out all later offsets as QEMU would, so the id is
the only change in meaning.

:func:`all_header_mutations` yields the standard list for the header-bounds
suite; call ``mutation.apply(dst)`` to produce each file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

from pytest_fastsnap.snapshot.bitmap import bit_is_set, bit_location
from pytest_fastsnap.snapshot.format import (
    ALIGN,
    STREAM_VERSION,
    Block,
    ByteRange,
    Snapshot,
    bitmap_size_for,
    parse,
    roundup,
)
from pytest_fastsnap.snapshot.sparse import sparse_copy
from pytest_fastsnap.snapshot.writer import spec_from_snapshot, write_spec

__all__ = [
    "HEADER_FIELDS",
    "TRUNCATION_REGIONS",
    "Mutation",
    "all_header_mutations",
    "boundary_values",
    "corrupt_magic",
    "expected_header_error",
    "set_bitmap_bit",
    "set_block_id",
    "set_block_length",
    "set_header_field",
    "set_mem_size_total",
    "set_stream_version",
    "truncate_at",
    "write_page_data",
]

HEADER_FIELDS = {"version": 4, "page_size": 8, "bitmap_offset": 8, "pages_offset": 8}
TRUNCATION_REGIONS = ("header", "bitmap", "pages", "device_state", "before_eof", "vmdesc")

Pathish = str | os.PathLike[str]


@dataclass(frozen=True)
class Mutation:
    """One change to a snapshot: ``field`` at file ``offset`` went ``old`` -> ``new``."""

    name: str
    field: str
    offset: int | None
    old: Any
    new: Any
    expected_error: str | None
    block: str | None = None
    _apply: Callable[[Path], Mutation] | None = dc_field(default=None, compare=False,
                                                          repr=False)

    def __str__(self) -> str:
        return self.name

    def apply(self, dst: Pathish) -> Mutation:
        """Produce the mutated file at *dst* (for mutations from a generator)."""
        if self._apply is None:
            raise RuntimeError(f"{self.name}: already applied (helpers apply at once)")
        return self._apply(Path(dst))


# -- plumbing ------------------------------------------------------------------------


def _load(src: Pathish, stream_offset: int) -> Snapshot:
    return parse(src, stream_offset, lenient=True)


def _patch(dst: Path, offset: int, data: bytes) -> None:
    fd = os.open(dst, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _copy_and_patch(src: Pathish, dst: Pathish, offset: int, data: bytes) -> None:
    sparse_copy(src, dst)
    _patch(Path(dst), offset, data)


def _block(snapshot: Snapshot, block_id: str | Block) -> Block:
    return snapshot.block(block_id.name if isinstance(block_id, Block) else block_id)


def _fmt(value: Any) -> str:
    return hex(value) if isinstance(value, int) and value > 4096 else repr(value)


# -- expected outcome (the strict parser's rules, restated per field) ---------------------


def _earlier_regions(snapshot: Snapshot, blk: Block) -> list[ByteRange]:
    return [r for b in snapshot.blocks[:blk.index] for r in (b.bitmap_range, b.pages_range)]


def expected_header_error(snapshot: Snapshot, block: str | Block, name: str,
                          value: int) -> str | None:
    """The error a strict parser gives when one header field of a valid file is *value*."""
    blk = _block(snapshot, block)
    hdr, size = blk.header, snapshot.file_size
    if name == "version":
        return None if value == 1 else "HDR_VERSION"
    if name == "page_size":
        return None if value == snapshot.page_size else "PAGE_SIZE"
    earlier = _earlier_regions(snapshot, blk)
    if name == "bitmap_offset":
        bitmap = ByteRange(value, value + blk.bitmap_size)
        if value >= size:
            return "BITMAP_OFFSET"
        if bitmap.end > size:
            return "TRUNCATED"
        if any(bitmap.overlaps(r) for r in earlier):
            return "OVERLAP"
        return None if value == hdr.end else "BITMAP_OFFSET"
    if name == "pages_offset":
        pages = ByteRange(value, value + blk.used_length.value)
        if value % ALIGN:
            return "PAGES_ALIGN"
        if value >= size:
            return "PAGES_OFFSET"
        if value < hdr.end + blk.bitmap_size or any(pages.overlaps(r) for r in earlier):
            return "OVERLAP"
        if value != roundup(hdr.end + blk.bitmap_size, ALIGN):
            return "PAGES_OFFSET"
        return "TRUNCATED" if pages.end > size else None
    raise KeyError(f"unknown header field {name!r} (one of {sorted(HEADER_FIELDS)})")


def _expected_length_error(snapshot: Snapshot, blk: Block, value: int) -> str | None:
    if value == blk.used_length.value:
        return None
    if value == 0 or value % snapshot.page_size:
        return "BLOCK_LENGTH"
    bsize = bitmap_size_for(value // snapshot.page_size)
    po = blk.header.pages_offset.value
    if bsize != blk.bitmap_size:
        if blk.header.bitmap_offset.value + bsize > snapshot.file_size:
            return "TRUNCATED"
        if po < blk.header.end + bsize:
            return "OVERLAP"
        if po != roundup(blk.header.end + bsize, ALIGN):
            return "PAGES_OFFSET"
    if po + value > snapshot.file_size:
        return "TRUNCATED"
    last = snapshot.blocks[-1]
    if blk is not last and po + value == last.pages_range.end:
        # The stream resumes exactly at the block list's EOS: the later blocks
        # are silently dropped and only the MEM_SIZE total can tell.
        kept = sum(b.used_length.value for b in snapshot.blocks[:blk.index]) + value
        return None if snapshot.ram is not None and kept == snapshot.ram.total else "TOTAL"
    return "BLOCK_LENGTH"  # the stream resumes in the middle of page data


def _expected_total_error(snapshot: Snapshot, value: int) -> str | None:
    assert snapshot.ram is not None
    if value & (snapshot.page_size - 1):
        return "RAM_SECTION"  # the low bits are record flags: no longer a MEM_SIZE record
    return None if value == snapshot.ram.total else "TOTAL"


def boundary_values(old: int, width: int, file_size: int, page_size: int) -> list[int]:
    """The boundary values of a *width*-byte unsigned field now holding *old*:
    0, 1, -1 (all ones), 2**31, 2**32, 2**63, 2**64-1, the file size, and *old*
    plus or minus a page and 1 MiB; those that fit, differ from *old*, in order."""
    top = 1 << (8 * width)
    candidates = (0, 1, top - 1, 1 << 31, 1 << 32, 1 << 63, (1 << 64) - 1, file_size,
                  old + page_size, old - page_size, old + ALIGN, old - ALIGN)
    out: list[int] = []
    for v in candidates:
        if 0 <= v < top and v != old and v not in out:
            out.append(v)
    return out


# -- single-field helpers -------------------------------------------------------------------


def set_header_field(src: Pathish, dst: Pathish, block_id: str | Block, field_name: str,
                     value: int, *, stream_offset: int = 0) -> Mutation:
    """Set MappedRamHeader ``version``/``page_size``/``bitmap_offset``/``pages_offset``."""
    snap = _load(src, stream_offset)
    blk = _block(snap, block_id)
    width = HEADER_FIELDS[field_name]
    fld = blk.header.field(field_name)
    if not 0 <= value < 1 << (8 * width):
        raise ValueError(f"{field_name}={value} does not fit in {width} bytes")
    _copy_and_patch(src, dst, fld.offset, value.to_bytes(width, "big"))
    return Mutation(f"{blk.name}:{field_name}={_fmt(value)}", field_name, fld.offset,
                    fld.value, value, expected_header_error(snap, blk, field_name, value),
                    blk.name)


def set_block_length(src: Pathish, dst: Pathish, block_id: str | Block, value: int, *,
                     stream_offset: int = 0) -> Mutation:
    """Set a block's ``used_length`` in the RAM START block list (nothing else moves)."""
    snap = _load(src, stream_offset)
    blk = _block(snap, block_id)
    fld = blk.used_length
    _copy_and_patch(src, dst, fld.offset, struct.pack(">Q", value))
    delta = value - fld.value
    label = f"{delta:+#x}" if value else "0"
    return Mutation(f"{blk.name}:length{label}", "used_length", fld.offset, fld.value, value,
                    _expected_length_error(snap, blk, value), blk.name)


def set_mem_size_total(src: Pathish, dst: Pathish, value: int, *,
                       stream_offset: int = 0) -> Mutation:
    """Set the MEM_SIZE total (the RAM flags in the low bits are kept)."""
    snap = _load(src, stream_offset)
    if snap.ram is None:
        raise ValueError(f"{src}: no RAM START found")
    fld = snap.ram.mem_size
    flags = fld.value & (snap.page_size - 1)
    _copy_and_patch(src, dst, fld.offset, struct.pack(">Q", value | flags))
    return Mutation(f"total{value - snap.ram.total:+#x}", "mem_size_total", fld.offset,
                    snap.ram.total, value, _expected_total_error(snap, value))


def set_block_id(src: Pathish, dst: Pathish, block_id: str | Block, new_id: str, *,
                 stream_offset: int = 0) -> Mutation:
    """Rename a block: in place if the length is the same, else by re-serialising."""
    snap = _load(src, stream_offset)
    blk = _block(snap, block_id)
    old = blk.name
    new_raw = new_id.encode("latin-1")
    if len(new_raw) > 255:
        raise ValueError("block id longer than 255 bytes")
    if len(new_raw) == len(old.encode("latin-1")):
        _copy_and_patch(src, dst, blk.id.offset + 1, new_raw)
    else:
        spec = spec_from_snapshot(snap)
        blocks = [replace(b, id=new_id) if i == blk.index else b
                  for i, b in enumerate(spec.blocks)]
        if Path(dst).resolve() == Path(src).resolve():
            raise ValueError("set_block_id with a new length needs dst != src")
        write_spec(dst, replace(spec, blocks=blocks))
    others = {b.name for b in snap.blocks if b.index != blk.index}
    expected = "BLOCK_ID" if not new_id or new_id in others else None
    label = "empty-id" if not new_id else f"id={new_id}"
    return Mutation(f"{old}:{label}", "id", blk.id.offset, old, new_id, expected, old)


def set_bitmap_bit(src: Pathish, dst: Pathish, block_id: str | Block, page: int,
                   value: bool = True, *, stream_offset: int = 0) -> Mutation:
    """Set or clear one page's bit (format stays valid: a set bit over a hole reads zeros)."""
    snap = _load(src, stream_offset)
    blk = _block(snap, block_id)
    if not 0 <= page < blk.num_pages:
        raise IndexError(f"page {page} outside block {blk.name!r}")
    byte, mask = bit_location(page)
    offset = blk.header.bitmap_offset.value + byte
    old = blk.read_bitmap(snap.path)[byte]
    new = old | mask if value else old & ~mask & 0xFF
    _copy_and_patch(src, dst, offset, bytes([new]))
    return Mutation(f"{blk.name}:bit{page}={int(value)}", "bitmap", offset, bool(old & mask),
                    value, None, blk.name)


def write_page_data(src: Pathish, dst: Pathish, block_id: str | Block, page: int,
                    data: bytes | None = None, *, stream_offset: int = 0) -> Mutation:
    """Write non-zero bytes into a page whose bit is clear (a loader must ignore them)."""
    snap = _load(src, stream_offset)
    blk = _block(snap, block_id)
    if bit_is_set(blk.read_bitmap(snap.path), page):
        raise ValueError(f"page {page} of {blk.name!r} has its bit set; pick a clear page")
    payload = data if data is not None else bytes(((i * 131 + 7) & 0xFF) | 1
                                                  for i in range(blk.page_size))
    if len(payload) != blk.page_size or not any(payload):
        raise ValueError("data must be one non-zero page")
    offset = blk.page_offset(page)
    _copy_and_patch(src, dst, offset, payload)
    return Mutation(f"{blk.name}:stale-page{page}", "page_data", offset, None,
                    payload[:8].hex(), None, blk.name)


def _cut_point(snap: Snapshot, region: str, block_id: str | Block | None) -> int:
    if region in ("header", "bitmap", "pages"):
        if block_id is None:
            raise ValueError(f"truncation in {region!r} needs a block_id")
        blk = _block(snap, block_id)
        if region == "header":
            return blk.header.offset + 14
        rng = blk.bitmap_range if region == "bitmap" else blk.pages_range
        return rng.start + max(1, rng.size // 2)
    if region == "device_state" and snap.device_state is not None:
        return snap.device_state.start + max(1, snap.device_state.size // 2)
    if region == "before_eof" and snap.eof_offset is not None:
        return snap.eof_offset
    if region == "vmdesc" and snap.vmdesc is not None:
        return snap.vmdesc.json_range.start + max(1, snap.vmdesc.json_range.size // 2)
    raise ValueError(f"no region {region!r} in {snap.path} (regions: {TRUNCATION_REGIONS})")


def truncate_at(src: Pathish, dst: Pathish, region: str, block_id: str | Block | None = None,
                *, stream_offset: int = 0) -> Mutation:
    """Cut the file in the middle of *region* (see ``TRUNCATION_REGIONS``); header,
    bitmap and pages need *block_id*; ``before_eof`` drops the EOF byte and all after."""
    snap = _load(src, stream_offset)
    cut = _cut_point(snap, region, block_id)
    sparse_copy(src, dst)
    os.truncate(dst, cut)
    blk = _block(snap, block_id).name if block_id is not None else None
    where = f"{blk}:" if blk else ""
    return Mutation(f"truncate:{where}{region}", "file_size", cut, snap.file_size, cut,
                    "TRUNCATED", blk)


def corrupt_magic(src: Pathish, dst: Pathish, value: bytes = b"QEVN", *,
                  stream_offset: int = 0) -> Mutation:
    if len(value) != 4:
        raise ValueError("magic is 4 bytes")
    with Path(src).open("rb") as old:
        old.seek(stream_offset)
        before = old.read(4)
    _copy_and_patch(src, dst, stream_offset, value)
    return Mutation(f"magic={value.hex()}", "magic", stream_offset, before.hex(), value.hex(),
                    None if value == b"QEVM" else "MAGIC")


def set_stream_version(src: Pathish, dst: Pathish, version: int, *,
                       stream_offset: int = 0) -> Mutation:
    snap = _load(src, stream_offset)
    old = snap.header.version.value if snap.header else None
    _copy_and_patch(src, dst, stream_offset + 4, struct.pack(">I", version))
    return Mutation(f"stream-version={version}", "version", stream_offset + 4, old, version,
                    None if version == STREAM_VERSION else "VERSION")


# -- the standard list -------------------------------------------------------------------------


def _planned(src: Path, so: int, preview: Mutation, fn: Callable[..., Mutation],
             *args: Any) -> Mutation:
    def run(dst: Path) -> Mutation:
        return fn(src, dst, *args, stream_offset=so)
    return replace(preview, _apply=run)


def _preview(name: str, fld: str, offset: int | None, old: Any, new: Any,
             expected: str | None, block: str | None = None) -> Mutation:
    return Mutation(name, fld, offset, old, new, expected, block)


def all_header_mutations(snapshot: Snapshot) -> Iterator[Mutation]:
    """The standard hostile mutations of a valid snapshot, each with ``expected_error``.

    Per block: header version 0/2/0xffffffff; page_size 0/512/8192/2**63;
    bitmap_offset past EOF, 0, misplaced (+8), overlapping the previous block's
    pages; pages_offset misaligned (+512), past EOF, before the bitmap, misplaced
    (+1 MiB), overlapping the previous block's pages; used_length +4096, -4096,
    0, +512; empty id; duplicate id; truncation inside header, bitmap, pages;
    then every numeric field (the four header fields, used_length) at each of
    :func:`boundary_values`.  Global: MEM_SIZE total +-4096 and its boundary
    values, magic, stream version 2 and 4, truncation
    inside device state, before EOF and inside the VM description.
    Nothing is written until ``mutation.apply(dst)``.
    """
    if not snapshot.ok:
        raise ValueError(f"{snapshot.path} is not a valid snapshot: {snapshot.problems}")
    seen: set[str] = set()
    for mutation in _standard_mutations(snapshot):
        if mutation.name not in seen:  # e.g. "before the bitmap" may also be 0
            seen.add(mutation.name)
            yield mutation


def _standard_mutations(snapshot: Snapshot) -> Iterator[Mutation]:
    src, so, size = snapshot.path, snapshot.stream_offset, snapshot.file_size
    ps = snapshot.page_size
    blocks = [b for b in snapshot.blocks if not b.ignored]

    def header(blk: Block, name: str, value: int) -> Mutation:
        fld = blk.header.field(name)
        pre = _preview(f"{blk.name}:{name}={_fmt(value)}", name, fld.offset, fld.value, value,
                       expected_header_error(snapshot, blk, name, value), blk.name)
        return _planned(src, so, pre, set_header_field, blk.name, name, value)

    def length(blk: Block, v: int) -> Mutation:
        old = blk.used_length.value
        label = f"{v - old:+#x}" if v else "0"
        pre = _preview(f"{blk.name}:length{label}", "used_length", blk.used_length.offset,
                       old, v, _expected_length_error(snapshot, blk, v), blk.name)
        return _planned(src, so, pre, set_block_length, blk.name, v)

    def total(v: int) -> Mutation:
        assert snapshot.ram is not None
        old = snapshot.ram.total
        pre = _preview(f"total{v - old:+#x}", "mem_size_total", snapshot.ram.mem_size.offset,
                       old, v, _expected_total_error(snapshot, v))
        return _planned(src, so, pre, set_mem_size_total, v)

    for blk in blocks:
        prev = blocks[blocks.index(blk) - 1] if blocks.index(blk) > 0 else None
        for v in (0, 2, 0xFFFFFFFF):
            yield header(blk, "version", v)
        for v in (0, 512, 8192, 1 << 63):
            yield header(blk, "page_size", v)
        bo = blk.header.bitmap_offset.value
        for v in (size + 4096, 0, bo + 8):
            yield header(blk, "bitmap_offset", v)
        if prev is not None:
            yield header(blk, "bitmap_offset", prev.header.pages_offset.value)
        po = blk.header.pages_offset.value
        for v in (po + 512, roundup(size, ALIGN) + ALIGN, bo - bo % ALIGN, po + ALIGN):
            yield header(blk, "pages_offset", v)
        if prev is not None:
            yield header(blk, "pages_offset", prev.header.pages_offset.value)
        used = blk.used_length.value
        for v in (used + ps, used - ps, 0, used + 512):
            yield length(blk, v)
        for new_id in ("", *[b.name for b in blocks if b is not blk][:1]):
            label = "empty-id" if not new_id else f"id={new_id}"
            pre = _preview(f"{blk.name}:{label}", "id", blk.id.offset, blk.name, new_id,
                           "BLOCK_ID", blk.name)
            yield _planned(src, so, pre, set_block_id, blk.name, new_id)
        for region in ("header", "bitmap", "pages"):
            cut = _cut_point(snapshot, region, blk)
            pre = _preview(f"truncate:{blk.name}:{region}", "file_size", cut, size, cut,
                           "TRUNCATED", blk.name)
            yield _planned(src, so, pre, truncate_at, region, blk.name)
        # Boundary values of every numeric field (duplicates of the above are dropped).
        for name, width in HEADER_FIELDS.items():
            for v in boundary_values(blk.header.field(name).value, width, size, ps):
                yield header(blk, name, v)
        for v in boundary_values(used, 8, size, ps):
            yield length(blk, v)
    assert snapshot.ram is not None and snapshot.header is not None
    for v in (snapshot.ram.total + ps, snapshot.ram.total - ps,
              *boundary_values(snapshot.ram.total, 8, size, ps)):
        yield total(v)
    pre = _preview("magic=5145564e", "magic", so, "5145564d", "5145564e", "MAGIC")
    yield _planned(src, so, pre, corrupt_magic, b"QEVN")
    for v in (2, 4):
        pre = _preview(f"stream-version={v}", "version", so + 4, STREAM_VERSION, v, "VERSION")
        yield _planned(src, so, pre, set_stream_version, v)
    for region in ("device_state", "before_eof", "vmdesc"):
        if region == "vmdesc" and snapshot.vmdesc is None:
            continue
        if region == "device_state" and not (snapshot.device_state and snapshot.device_state.size):
            continue
        cut = _cut_point(snapshot, region, None)
        pre = _preview(f"truncate:{region}", "file_size", cut, size, cut, "TRUNCATED")
        yield _planned(src, so, pre, truncate_at, region)
