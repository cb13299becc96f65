"""Working-set files of the loader bridge (``serve --record-ws`` / ``--ws``).

The format is defined in ``pytest_fastsnap/native/src/bridge_ws.h`` (the
loader writes and validates them); this is a second, independent reader and
writer for tests and tools:

    ws = read_ws(path)                    # WorkingSet(page_size, blocks, entries)
    write_ws(path, ws)                    # the same bytes back (hash recomputed)

``read_ws`` checks the framing (magic, sizes, hash) and that every entry
names a page of its block, once; it does not know the snapshot.
:func:`check_layout` is the loader's other check, that the file was
recorded on the snapshot's layout (page size, block ids and lengths):

    check_layout(read_ws(path), snapshot_layout(parse(snap)))   # a Verdict
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_fastsnap.verdict import Verdict

if TYPE_CHECKING:
    from pytest_fastsnap.snapshot.format import Snapshot

MAGIC = b"FSNAPWS1"
HEADER = struct.Struct("<8sIIQ")
ENTRY = struct.Struct("<IQ")


class WsFileError(ValueError):
    """Not a valid working-set file; the message names the problem."""


@dataclass(frozen=True)
class WorkingSet:
    page_size: int
    blocks: list[tuple[str, int]]       # (id, used length in bytes), the snapshot's order
    entries: list[tuple[int, int]]      # (block index, page index), in request order

    def pages_of(self, block: str) -> list[int]:
        """Page indexes of *block*, in request order."""
        index = [name for name, _ in self.blocks].index(block)
        return [page for b, page in self.entries if b == index]


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def encode_ws(ws: WorkingSet) -> bytes:
    out = bytearray(HEADER.pack(MAGIC, ws.page_size, len(ws.blocks), len(ws.entries)))
    for name, length in ws.blocks:
        raw = name.encode()
        out += bytes([len(raw)]) + raw + struct.pack("<Q", length)
    for block, page in ws.entries:
        out += ENTRY.pack(block, page)
    out += struct.pack("<Q", fnv1a(bytes(out)))
    return bytes(out)


def write_ws(path: str | Path, ws: WorkingSet) -> None:
    Path(path).write_bytes(encode_ws(ws))


def read_ws(path: str | Path) -> WorkingSet:
    data = Path(path).read_bytes()
    if len(data) < HEADER.size + 8:
        raise WsFileError(f"{path}: {len(data)} bytes, shorter than header and hash")
    magic, page_size, nblocks, n = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WsFileError(f"{path}: not a working-set file (magic {magic!r})")
    if fnv1a(data[:-8]) != struct.unpack_from("<Q", data, len(data) - 8)[0]:
        raise WsFileError(f"{path}: hash does not match the contents")
    if page_size == 0 or page_size & (page_size - 1):
        raise WsFileError(f"{path}: page size {page_size} is not a power of two")
    off = HEADER.size
    blocks = []
    for _ in range(nblocks):
        if off >= len(data) - 8 or off + 1 + data[off] + 8 > len(data) - 8:
            raise WsFileError(f"{path}: block list runs past the end")
        size = data[off]
        name = data[off + 1:off + 1 + size].decode(errors="replace")
        (length,) = struct.unpack_from("<Q", data, off + 1 + size)
        blocks.append((name, length))
        off += 1 + size + 8
    if off + n * ENTRY.size + 8 != len(data):
        raise WsFileError(f"{path}: {len(data)} bytes, header says "
                          f"{off + n * ENTRY.size + 8}")
    entries = [ENTRY.unpack_from(data, off + i * ENTRY.size) for i in range(n)]
    seen = set()
    for i, (block, page) in enumerate(entries):
        if block >= nblocks or page >= blocks[block][1] // page_size:
            raise WsFileError(f"{path}: entry {i} names block {block} page {page}: no such page")
        if (block, page) in seen:
            raise WsFileError(f"{path}: entry {i} repeats block {block} page {page}")
        seen.add((block, page))
    return WorkingSet(page_size, blocks, [(b, p) for b, p in entries])


@dataclass(frozen=True)
class Layout:
    """What a working-set file must match: the snapshot's target page size and
    its RAM blocks (id, used length), in the snapshot's order."""

    page_size: int
    blocks: list[tuple[str, int]]


def snapshot_layout(snap: Snapshot) -> Layout:
    return Layout(snap.page_size, [(b.id.value, b.used_length.value) for b in snap.blocks])


def check_layout(ws: WorkingSet, layout: Layout, *, nonempty: bool = False) -> Verdict:
    """Pass when *ws* was recorded on *layout* (what the loader checks before
    it uses a ``--ws`` file); with *nonempty*, it must also list a page."""
    if ws.page_size != layout.page_size:
        return Verdict.fail(f"recorded with page size {ws.page_size}, the snapshot has "
                            f"{layout.page_size}", why="page_size")
    if ws.blocks != layout.blocks:
        return Verdict.fail(f"recorded for blocks {ws.blocks}, the snapshot has "
                            f"{layout.blocks}", why="blocks")
    if nonempty and not ws.entries:
        return Verdict.fail("the working set lists no page", why="empty")
    return Verdict.pass_(f"{len(ws.entries)} pages of the snapshot's layout",
                         pages=len(ws.entries))
