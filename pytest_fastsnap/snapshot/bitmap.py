"""Per-block dirty bitmaps of mapped-ram files (reference §7).

The file holds the host's ``unsigned long[]`` raw; on little-endian 64-bit
hosts (x86-64) page *i* is bit ``i % 8`` of byte ``i // 8``.  A set bit means
the page's data is in the file; a clear bit means the page restores as zeros.
"""

from __future__ import annotations

from collections.abc import Iterator

from pytest_fastsnap.snapshot.format import bitmap_size_for

__all__ = [
    "bit_is_set",
    "bit_location",
    "bitmap_size_for",
    "clear_bit",
    "coalesce",
    "diff_pages",
    "expected_bitmap",
    "iter_runs",
    "iter_set_pages",
    "popcount",
    "set_bit",
]

_WORD = 8


def bit_location(index: int) -> tuple[int, int]:
    """(byte index, bit mask) of page *index*."""
    if index < 0:
        raise IndexError(index)
    return index >> 3, 1 << (index & 7)


def bit_is_set(bitmap: bytes | bytearray | memoryview, index: int) -> bool:
    byte, mask = bit_location(index)
    return byte < len(bitmap) and bool(bitmap[byte] & mask)


def set_bit(bitmap: bytearray, index: int) -> None:
    byte, mask = bit_location(index)
    bitmap[byte] |= mask


def clear_bit(bitmap: bytearray, index: int) -> None:
    byte, mask = bit_location(index)
    bitmap[byte] &= ~mask & 0xFF


def popcount(bitmap: bytes | bytearray | memoryview, num_pages: int | None = None) -> int:
    """Number of set bits (only the first *num_pages* if given)."""
    data = bytes(bitmap)
    if num_pages is None:
        return int.from_bytes(data, "little").bit_count()
    full, rest = divmod(num_pages, 8)
    count = int.from_bytes(data[:full], "little").bit_count()
    if rest and full < len(data):
        count += (data[full] & ((1 << rest) - 1)).bit_count()
    return count


def iter_set_pages(bitmap: bytes | bytearray | memoryview, num_pages: int | None = None
                   ) -> Iterator[int]:
    """Indices of set bits in increasing order, skipping zero words quickly."""
    data = bytes(bitmap)
    limit = len(data) * 8 if num_pages is None else min(num_pages, len(data) * 8)
    for word_start in range(0, len(data), _WORD):
        word = int.from_bytes(data[word_start:word_start + _WORD], "little")
        base = word_start * 8
        while word:
            low = word & -word
            index = base + low.bit_length() - 1
            if index >= limit:
                return
            yield index
            word ^= low


def iter_runs(bitmap: bytes | bytearray | memoryview, num_pages: int
              ) -> Iterator[tuple[int, int, bool]]:
    """Maximal runs ``(first_page, count, is_set)`` covering pages ``[0, num_pages)``."""
    start = 0
    for index in iter_set_pages(bitmap, num_pages):
        if index > start:
            yield start, index - start, False
        start_run = index
        start = index + 1
        yield start_run, 1, True
    if start < num_pages:
        yield start, num_pages - start, False


def coalesce(runs: Iterator[tuple[int, int, bool]]) -> Iterator[tuple[int, int, bool]]:
    """Merge adjacent runs of the same kind."""
    cur: tuple[int, int, bool] | None = None
    for first, count, is_set in runs:
        if cur is not None and cur[2] == is_set and cur[0] + cur[1] == first:
            cur = (cur[0], cur[1] + count, is_set)
        else:
            if cur is not None:
                yield cur
            cur = (first, count, is_set)
    if cur is not None:
        yield cur


def expected_bitmap(memory: bytes | bytearray | memoryview, page_size: int = 4096,
                    num_pages: int | None = None) -> bytes:
    """The bitmap a default (zero-page-detection on) save gives for *memory*:
    bit set iff the page is not all zero.  With ``zero-page-detection=none``
    QEMU sets every sent page's bit instead."""
    view = memoryview(memory)
    pages = len(view) // page_size if num_pages is None else num_pages
    out = bytearray(bitmap_size_for(pages))
    zero = bytes(page_size)
    for i in range(pages):
        if view[i * page_size:(i + 1) * page_size] != zero:
            set_bit(out, i)
    return bytes(out)


def diff_pages(actual: bytes | bytearray | memoryview, expected: bytes | bytearray | memoryview,
               num_pages: int) -> list[int]:
    """Pages whose bit differs between two bitmaps (first *num_pages* only)."""
    a = int.from_bytes(bytes(actual), "little")
    b = int.from_bytes(bytes(expected), "little")
    mask = (1 << num_pages) - 1
    return list(iter_set_pages(((a ^ b) & mask).to_bytes(bitmap_size_for(num_pages), "little")))
