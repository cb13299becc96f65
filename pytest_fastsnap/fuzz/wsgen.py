"""Structure-aware working-set files (``serve --ws``, format in
``native/src/bridge_ws.h``) for fuzzing the two readers: valid files of a
layout, and files with one or two edits that know the format (header
fields, the block list, counts, entries, truncation, trailing bytes, the
hash).  After an edit the trailing hash is recomputed unless the edit is
to the hash itself, so the checks behind it are reached.

    rng = random.Random(seed)
    kind, data = generate(HARNESS_LAYOUT, rng)     # e.g. ("count+truncate", b"FSNAPWS1...")
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from pytest_fastsnap.restore.wsfile import (
    ENTRY,
    HEADER,
    Layout,
    WorkingSet,
    encode_ws,
    fnv1a,
)

__all__ = ["HARNESS_LAYOUT", "MUTATIONS", "generate", "harness_fixup", "rehash", "valid"]

# The snapshot layout src/fuzz_bridge_ws.c checks every input against.
HARNESS_LAYOUT = Layout(4096, [("pc.ram", 64 * 4096), ("pc.bios", 4 * 4096)])
HASH = 8


def rehash(data: bytes) -> bytes:
    """*data* with its last 8 bytes replaced by the FNV-1a hash of the rest."""
    if len(data) < HASH:
        return data
    return data[:-HASH] + struct.pack("<Q", fnv1a(data[:-HASH]))


def harness_fixup(data: bytes) -> bytes:
    """The file src/fuzz_bridge_ws.c hands the reader for a libFuzzer input:
    the hash recomputed unless the input's last byte is 0x5a."""
    return data if len(data) < HASH or data[-1] == 0x5A else rehash(data)


def valid(layout: Layout, rng: random.Random, *, most: int = 200) -> WorkingSet:
    """A valid working set of *layout*: distinct pages in a random order."""
    pages = [(b, p) for b, (_, length) in enumerate(layout.blocks)
             for p in range(length // layout.page_size)]
    return WorkingSet(layout.page_size, list(layout.blocks),
                      rng.sample(pages, rng.randint(0, min(most, len(pages)))))


def _offsets(data: bytes, nblocks: int) -> tuple[list[int], int]:
    """Offsets of each block record and of the first entry (as far as *data* goes)."""
    off, blocks = HEADER.size, []
    for _ in range(nblocks):
        if off >= len(data):
            break
        blocks.append(off)
        off += 1 + data[off] + 8
    return blocks, off


def _put(data: bytearray, off: int, fmt: str, value: int) -> None:
    """Write *value* (wrapped to the field's width) if the field is inside *data*."""
    size = struct.calcsize(fmt)
    if off + size <= len(data):
        struct.pack_into(fmt, data, off, value & ((1 << (8 * size)) - 1))


def _get(data: bytearray, off: int, fmt: str) -> int:
    """The field at *off*, or 0 where *data* ends before it."""
    if off + struct.calcsize(fmt) > len(data):
        return 0
    return int(struct.unpack_from(fmt, data, off)[0])


def _weird(rng: random.Random, good: int, bits: int) -> int:
    top = (1 << bits) - 1
    return rng.choice([0, 1, good - 1, good + 1, good * 2, good // 2, top, top // 2 + 1,
                       rng.randrange(top + 1)]) & top


def m_magic(d: bytearray, lay: Layout, rng: random.Random) -> None:
    d[rng.randrange(8)] ^= 1 << rng.randrange(8)


def m_page_size(d: bytearray, lay: Layout, rng: random.Random) -> None:
    _put(d, 8, "<I", rng.choice([0, 512, 1000, 2048, 8192, 1 << 21, 3 * 4096,
                                 _weird(rng, lay.page_size, 32)]))


def m_nblocks(d: bytearray, lay: Layout, rng: random.Random) -> None:
    _put(d, 12, "<I", _weird(rng, len(lay.blocks), 32))


def m_count(d: bytearray, lay: Layout, rng: random.Random) -> None:
    n = _get(d, 16, "<Q")
    pages = sum(length // lay.page_size for _, length in lay.blocks)
    _put(d, 16, "<Q", rng.choice([n + 1, max(0, n - 1), 0, pages, pages + 1, 1 << 63,
                                  (1 << 64) - 1, (1 << 64) // ENTRY.size + 1,
                                  _weird(rng, n, 64)]))


def m_block_id(d: bytearray, lay: Layout, rng: random.Random) -> None:
    blocks, _ = _offsets(d, len(lay.blocks))
    if not blocks:
        return
    off = rng.choice(blocks)
    if rng.random() < 0.5:
        d[off] = rng.choice([0, 1, max(0, d[off] - 1), min(255, d[off] + 1), 255])
    elif d[off] and off + 1 + d[off] <= len(d):
        d[off + 1 + rng.randrange(d[off])] = rng.choice([0, 0x2E, 0x80, 0xFF, ord("x")])


def m_block_length(d: bytearray, lay: Layout, rng: random.Random) -> None:
    blocks, _ = _offsets(d, len(lay.blocks))
    if not blocks:
        return
    i = rng.randrange(len(blocks))
    off = blocks[i] + 1 + d[blocks[i]]
    _put(d, off, "<Q", _weird(rng, lay.blocks[i][1], 64) if i < len(lay.blocks) else 0)


def m_block_order(d: bytearray, lay: Layout, rng: random.Random) -> None:
    blocks, end = _offsets(d, len(lay.blocks))
    if len(blocks) >= 2 and end <= len(d):
        recs = [bytes(d[a:b]) for a, b in zip(blocks, [*blocks[1:], end], strict=True)]
        rng.shuffle(recs)
        d[blocks[0]:end] = b"".join(recs)


def _entry(d: bytearray, lay: Layout, rng: random.Random) -> int | None:
    _, first = _offsets(d, len(lay.blocks))
    n = (len(d) - HASH - first) // ENTRY.size
    return first + rng.randrange(n) * ENTRY.size if n > 0 else None


def m_entry_block(d: bytearray, lay: Layout, rng: random.Random) -> None:
    if (off := _entry(d, lay, rng)) is not None:
        _put(d, off, "<I", _weird(rng, len(lay.blocks), 32))


def m_entry_page(d: bytearray, lay: Layout, rng: random.Random) -> None:
    if (off := _entry(d, lay, rng)) is not None:
        block = _get(d, off, "<I")
        npages = lay.blocks[block][1] // lay.page_size if block < len(lay.blocks) else 1
        _put(d, off + 4, "<Q", _weird(rng, npages, 64))


def m_duplicate(d: bytearray, lay: Layout, rng: random.Random) -> None:
    """Repeat an entry and count it in the header: only the repeat is wrong."""
    if (off := _entry(d, lay, rng)) is not None:
        d[len(d) - HASH:len(d) - HASH] = d[off:off + ENTRY.size]
        _put(d, 16, "<Q", _get(d, 16, "<Q") + 1)


def m_truncate(d: bytearray, lay: Layout, rng: random.Random) -> None:
    del d[rng.randrange(len(d) + 1):]


def m_trailing(d: bytearray, lay: Layout, rng: random.Random) -> None:
    d[len(d) - HASH:len(d) - HASH] = bytes(rng.randrange(256)
                                           for _ in range(rng.choice([1, 4, 12, 13])))


MUTATIONS: dict[str, Callable[[bytearray, Layout, random.Random], None]] = {
    "magic": m_magic, "page-size": m_page_size, "nblocks": m_nblocks, "count": m_count,
    "block-id": m_block_id, "block-length": m_block_length, "block-order": m_block_order,
    "entry-block": m_entry_block, "entry-page": m_entry_page, "duplicate": m_duplicate,
    "truncate": m_truncate, "trailing": m_trailing,
}


def generate(layout: Layout, rng: random.Random) -> tuple[str, bytes]:
    """One file: valid (1 in 5), else a valid one with one or two edits (or a
    corrupted hash).  Returns (what was done, the bytes)."""
    data = bytearray(encode_ws(valid(layout, rng)))
    if rng.random() < 0.2:
        return "valid", bytes(data)
    names = rng.sample(sorted(MUTATIONS), rng.choice([1, 1, 2]))
    for name in names:
        MUTATIONS[name](data, layout, rng)
    if rng.random() < 0.1:
        names.append("hash")
        if len(data) >= HASH:
            data[-1 - rng.randrange(HASH)] ^= 0x40
        return "+".join(names), bytes(data)
    return "+".join(names), rehash(bytes(data))
