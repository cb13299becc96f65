"""Mutations of libvirt's save-image header, each with the error both readers must give.

:func:`libvirt_header_mutations` derives hostile values from the image at hand
(its data_len, XML length, file size) for every header field, plus truncations
at each field boundary and inside the XML.  Each mutation states its expected
error from the rule it breaks (``None``: the file stays valid); the readers are
not consulted.  ``mutation.apply(dst)`` writes the mutated copy.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pytest_fastsnap.snapshot.libvirt import (
    FIELDS,
    FORMATS,
    HEADER_SIZE,
    PARTIAL_MAGIC,
    SPARSE,
    LibvirtHeader,
)
from pytest_fastsnap.snapshot.sparse import sparse_copy

__all__ = ["LibvirtMutation", "libvirt_header_mutations"]

U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class LibvirtMutation:
    name: str
    expected_error: str | None
    src: Path
    change: Callable[[int], None]  # gets a writable fd of the copy

    def __str__(self) -> str:
        return self.name

    def apply(self, dst: str | os.PathLike[str]) -> Path:
        sparse_copy(self.src, dst)
        fd = os.open(dst, os.O_RDWR)
        try:
            self.change(fd)
        finally:
            os.close(fd)
        return Path(dst)


def _u32(offset: int, value: int) -> Callable[[int], None]:
    return lambda fd: os.pwrite(fd, struct.pack("<I", value), offset)


def _bytes(offset: int, data: bytes) -> Callable[[int], None]:
    return lambda fd: os.pwrite(fd, data, offset)


def _cut(length: int) -> Callable[[int], None]:
    return lambda fd: os.ftruncate(fd, length)


def _field_values(hdr: LibvirtHeader, size: int) -> dict[str, list[tuple[int, str | None]]]:
    """Per field: (value, expected error) derived from this image."""
    data_len, xml_len = hdr.data_len.value, hdr.xml.size
    past_eof = size - HEADER_SIZE + 1
    return {
        "version": [(v, "LIBVIRT_VERSION") for v in (0, 1, 3, 0x02000000, U32_MAX)],
        "data_len": [(0, "LIBVIRT_DATA_LEN"), (past_eof, "LIBVIRT_DATA_LEN"),
                     (U32_MAX, "LIBVIRT_DATA_LEN"),
                     # the stream then starts one byte early / late: not QEVM there
                     (data_len - 1, "MAGIC"), (data_len + 1, "MAGIC"),
                     # ends right at the XML's NUL: a cookie would lie past the data,
                     # else the XML has no NUL
                     (xml_len, "LIBVIRT_COOKIE" if hdr.cookie_offset.value else "LIBVIRT_XML")],
        "was_running": [(0, None), (2, "LIBVIRT_HEADER"), (U32_MAX, "LIBVIRT_HEADER")],
        "format": [(v, "LIBVIRT_NOT_SPARSE") for v in range(len(FORMATS)) if v != SPARSE]
        + [(len(FORMATS), "LIBVIRT_FORMAT"), (U32_MAX, "LIBVIRT_FORMAT")],
        "cookie_offset": [(data_len, "LIBVIRT_COOKIE"), (data_len + 1, "LIBVIRT_COOKIE"),
                          (U32_MAX, "LIBVIRT_COOKIE"),
                          # the XML would end before its NUL
                          (1, "LIBVIRT_XML"), (xml_len, "LIBVIRT_XML"),
                          # a cookie right after the XML's NUL (empty, padding)
                          (xml_len + 1, None)],
    }


def libvirt_header_mutations(path: str | os.PathLike[str], hdr: LibvirtHeader
                             ) -> Iterator[LibvirtMutation]:
    """Every mutation of *path*'s libvirt header (*hdr*, as read from *path*)."""
    src = Path(path)
    size = src.stat().st_size
    offsets = dict(FIELDS)
    for fname, values in _field_values(hdr, size).items():
        for value, expected in values:
            yield LibvirtMutation(f"{fname}={value:#x}", expected, src,
                                  _u32(offsets[fname], value))
    yield LibvirtMutation("magic=partial", "LIBVIRT_PARTIAL", src, _bytes(0, PARTIAL_MAGIC))
    # Not libvirt's magic: read as a QEMU stream from offset 0.
    yield LibvirtMutation("magic=other", "MAGIC", src, _bytes(0, b"LibvirtQemudSavf"))
    nul, end = hdr.xml.end, hdr.stream_offset
    yield LibvirtMutation("xml-no-nul", "LIBVIRT_XML", src, _bytes(nul, b" " * (end - nul)))
    yield LibvirtMutation("xml-no-name", "LIBVIRT_XML", src, _rename_tag(src, hdr))
    cuts: list[tuple[int, str]] = [(0, "TRUNCATED"), (10, "MAGIC")]
    cuts += [(n, "LIBVIRT_HEADER") for n in (16, 20, 36, HEADER_SIZE - 1)]
    cuts += [(n, "LIBVIRT_DATA_LEN") for n in (HEADER_SIZE, HEADER_SIZE + hdr.xml.size // 2,
                                                nul, end - 1)]
    cuts += [(end, "TRUNCATED"), (end + 4, "TRUNCATED")]
    for length, expected in cuts:
        yield LibvirtMutation(f"truncate@{length:#x}", expected, src, _cut(length))


def _rename_tag(src: Path, hdr: LibvirtHeader) -> Callable[[int], None]:
    """``<name>`` -> ``<nime>`` in the XML (same length)."""
    fd = os.open(src, os.O_RDONLY)
    try:
        xml = os.pread(fd, hdr.xml.size, hdr.xml.start)
    finally:
        os.close(fd)
    at = xml.find(b"<name>")
    if at < 0:
        raise ValueError(f"{src}: the domain XML has no <name>")
    return _bytes(hdr.xml.start + at, b"<nime>")
