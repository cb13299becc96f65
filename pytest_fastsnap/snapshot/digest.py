"""Restored guest memory of a snapshot block, read sparsely.

Restored content: page *i* is the file's page *i* if its bitmap bit is set,
zeros otherwise (stale bytes under a clear bit are never used).  Content is
streamed in 1 MiB chunks; file holes are skipped with SEEK_DATA/SEEK_HOLE and
clear pages are never read.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence

from pytest_fastsnap.snapshot.bitmap import bit_is_set, coalesce, iter_runs
from pytest_fastsnap.snapshot.format import Block, Snapshot

__all__ = [
    "CHUNK",
    "block_bytes",
    "block_digest",
    "iter_restored",
    "read_page",
    "restored_memory_range",
    "sha256_of_file_content",
]

CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)


def _zeros(n: int) -> Iterator[memoryview]:
    view = memoryview(_ZEROS)
    while n > 0:
        step = min(n, CHUNK)
        yield view[:step]
        n -= step


def iter_file_range(fd: int, offset: int, size: int, chunk: int = CHUNK
                    ) -> Iterator[bytes | memoryview]:
    """Bytes ``[offset, offset+size)`` of *fd* in chunks; holes and bytes past EOF
    come out as zeros without being read."""
    end = offset + size
    file_size = os.fstat(fd).st_size
    pos = offset
    while pos < end:
        if pos >= file_size:
            yield from _zeros(end - pos)
            return
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            data = file_size  # only a hole until EOF
        if data > pos:
            stop = min(data, end)
            yield from _zeros(stop - pos)
            pos = stop
            continue
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        stop = min(hole, end, pos + chunk, file_size)
        piece = os.pread(fd, stop - pos, pos)
        if not piece:
            yield from _zeros(end - pos)
            return
        yield piece
        pos += len(piece)


def iter_restored(snapshot: Snapshot, block: str | Block, start: int = 0,
                  size: int | None = None, *, bitmap: bytes | None = None,
                  chunk: int = CHUNK) -> Iterator[bytes | memoryview]:
    """Restored bytes ``[start, start+size)`` of *block* (block offsets), in chunks."""
    blk = snapshot.block(block)
    length = blk.num_pages * blk.page_size
    if size is None:
        size = length - start
    if start < 0 or size < 0 or start + size > length:
        raise ValueError(f"range [{start:#x}, {start + size:#x}) outside block {blk.name!r} "
                         f"({length:#x} bytes)")
    bits = blk.read_bitmap(snapshot.path) if bitmap is None else bitmap
    ps = blk.page_size
    end = start + size
    fd = os.open(snapshot.path, os.O_RDONLY)
    try:
        for first, count, is_set in coalesce(iter_runs(bits, blk.num_pages)):
            lo, hi = max(first * ps, start), min((first + count) * ps, end)
            if lo >= hi:
                continue
            if is_set:
                yield from iter_file_range(fd, blk.header.pages_offset.value + lo, hi - lo,
                                           chunk)
            else:
                yield from _zeros(hi - lo)
    finally:
        os.close(fd)


def block_digest(snapshot: Snapshot, block: str | Block) -> str:
    """sha256 hex of the whole restored content of *block* (``num_pages`` pages)."""
    h = hashlib.sha256()
    for piece in iter_restored(snapshot, block):
        h.update(piece)
    return h.hexdigest()


def block_bytes(snapshot: Snapshot, block: str | Block) -> bytes:
    """The whole restored content of *block* in memory (small blocks / tests)."""
    return b"".join(bytes(p) for p in iter_restored(snapshot, block))


def restored_memory_range(snapshot: Snapshot, block_id: str | Block, start: int,
                          size: int) -> bytes:
    """Restored bytes ``[start, start+size)`` of a block, to compare with a pmemsave
    (for ``pc.ram`` below 4 GiB the block offset equals the guest-physical address)."""
    return b"".join(bytes(p) for p in iter_restored(snapshot, block_id, start, size))


def range_digests(read: Callable[[int, int], bytes], ranges: Sequence[tuple[int, int]],
                  chunk: int = 16 << 20) -> dict[str, str]:
    """sha256 per *chunk* of each ``(start, length)`` range, keyed ``"start+length"``
    (hex), of the bytes ``read(start, length)`` returns: the shape of
    :meth:`QemuMachine.memory_digests`, for memory read some other way."""
    out = {}
    for start, length in ranges:
        for a in range(start, start + length, chunk):
            n = min(chunk, start + length - a)
            out[f"{a:#x}+{n:#x}"] = hashlib.sha256(read(a, n)).hexdigest()
    return out


def read_page(snapshot: Snapshot, block: str | Block, index: int, *,
              bitmap: bytes | None = None) -> bytes:
    """Restored content of page *index*: file data if its bit is set, else zeros."""
    blk = snapshot.block(block)
    offset = blk.page_offset(index)
    bits = blk.read_bitmap(snapshot.path) if bitmap is None else bitmap
    if not bit_is_set(bits, index):
        return bytes(blk.page_size)
    fd = os.open(snapshot.path, os.O_RDONLY)
    try:
        return b"".join(bytes(p) for p in iter_file_range(fd, offset, blk.page_size))
    finally:
        os.close(fd)


def sha256_of_file_content(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's apparent content (holes as zeros), read sparsely."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        for piece in iter_file_range(fd, 0, os.fstat(fd).st_size):
            h.update(piece)
    finally:
        os.close(fd)
    return h.hexdigest()
