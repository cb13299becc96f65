"""The "FSX1" sparse encoding of fuzz inputs (``src/fuzz_format.c`` decodes it).

A real snapshot has its page regions at 1 MiB boundaries, so even a compacted
one is megabytes of mostly zeros, and libFuzzer slows to a crawl on it.
Encoded, it is ``b"FSX1"`` then chunks ``[be32 hole][be16 n][n bytes]``: each
chunk lands ``hole`` bytes after the end of the previous one.
"""

from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["MAGIC", "decode", "encode"]

MAGIC = b"FSX1"
MAX_FILE = 8 << 20  # FSX_MAX in fuzz_format.c
MIN_HOLE = 64
MAX_CHUNK = 0xFFFF


def encode(data: bytes) -> bytes:
    """*data* with every run of >= 64 zero bytes turned into a hole."""
    out = bytearray(MAGIC)
    pos = 0  # end of the previous chunk
    i = 0
    n = len(data)
    while i < n:
        start = i
        while start < n and data[start] == 0:
            start += 1
        if start >= n:
            break
        end = start
        while end < n and end - start < MAX_CHUNK:
            if data[end] == 0 and data[end:end + MIN_HOLE] == bytes(min(MIN_HOLE, n - end)):
                break
            end += 1
        out += struct.pack(">IH", start - pos, end - start) + data[start:end]
        pos = i = end
    if pos < n:  # trailing zeros: an empty chunk at the very end
        out += struct.pack(">IH", n - pos, 0)
    return bytes(out)


def chunks(blob: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """``([(offset, data)...], file_size)`` of an input (the C harness's decoding)."""
    if not blob.startswith(MAGIC):
        return [(0, blob)], len(blob)
    out = []
    pos = 0
    i = 4
    while i + 6 <= len(blob):
        hole, n = struct.unpack(">IH", blob[i:i + 6])
        i += 6
        n = min(n, len(blob) - i)
        if pos + hole + n > MAX_FILE:
            break
        pos += hole
        out.append((pos, blob[i:i + n]))
        pos += n
        i += n
    return out, pos


def decode(blob: bytes) -> bytes:
    """The file an input stands for, in memory (small inputs)."""
    parts, size = chunks(blob)
    out = bytearray(size)
    for at, data in parts:
        out[at:at + len(data)] = data
    return bytes(out)


def decode_to(blob: bytes, path: Path) -> Path:
    """The file an input stands for, written sparsely to *path*."""
    parts, size = chunks(blob)
    with open(path, "wb") as f:
        for at, data in parts:
            f.seek(at)
            f.write(data)
        f.truncate(size)
    return path
