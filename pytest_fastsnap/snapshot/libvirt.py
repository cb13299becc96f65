"""libvirt save images (``virsh save``, managed save): libvirt's own header in front
of the QEMU stream.

Layout (libvirt ``src/qemu/qemu_saveimage.h``, little-endian on x86 hosts)::

    0   magic        "LibvirtQemudSave" ("LibvirtQemudPart" while the save runs)
    16  version      u32, 2
    20  data_len     u32, bytes after this 92-byte header up to the QEMU stream
    24  was_running  u32, 0 or 1
    28  format       u32: 0 raw, 1 gzip, 2 bzip2, 3 xz, 4 lzop, 5 zstd, 6 sparse
    32  cookie       u32, offset of the cookie XML inside the data (0: none)
    36  unused       14 x u32
    92  data         domain XML, NUL, [cookie XML, NUL], padding
    92 + data_len    QEMU stream (mapped-ram only for format 6 "sparse")

:func:`read_header` checks, in this order, and raises
:class:`~pytest_fastsnap.snapshot.errors.FormatError` with these names (the C
reader, ``mr_libvirt.c``, gives the same ones with an ``E_`` prefix):

==================== ===============================================================
LIBVIRT_PARTIAL      magic ``LibvirtQemudPart``: libvirt never finished the save
LIBVIRT_HEADER       the file ends inside the 92-byte header; was_running not 0/1
LIBVIRT_VERSION      version is not 2 (the message says so when it is 2 byte-swapped)
LIBVIRT_DATA_LEN     data_len is 0, or the data (the XML) runs past the end of the file
LIBVIRT_FORMAT       format is not one libvirt defines (0..6)
LIBVIRT_COOKIE       cookie offset not 0 and not inside the data
LIBVIRT_XML          domain XML longer than 16 MiB, not NUL-terminated inside its
                     bytes, or without a ``<name>`` of 1..255 bytes before the NUL
LIBVIRT_NOT_SPARSE   a valid header whose format is not sparse: the stream is not
                     mapped-ram (raw, or compressed)
==================== ===============================================================

:func:`build_header` writes such a header (for tests and mutations).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from pytest_fastsnap.snapshot.errors import FormatError
from pytest_fastsnap.snapshot.format import ByteRange, Field

__all__ = [
    "FORMATS",
    "HEADER_SIZE",
    "MAGIC",
    "PARTIAL_MAGIC",
    "SPARSE",
    "LibvirtHeader",
    "build_header",
    "is_libvirt_image",
    "read_header",
]

MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
VERSION = 2
HEADER_SIZE = 92
FORMATS = ("raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse")
SPARSE = 6
XML_MAX = 16 << 20
NAME_MAX = 255
# u32 fields after the magic: (name, offset)
FIELDS = (("version", 16), ("data_len", 20), ("was_running", 24), ("format", 28),
          ("cookie_offset", 32))


@dataclass(frozen=True)
class LibvirtHeader:
    """libvirt's header; every u32 is a :class:`Field` with its file offset."""

    version: Field[int]
    data_len: Field[int]
    was_running: Field[int]
    format: Field[int]
    cookie_offset: Field[int]
    xml: ByteRange  # the domain XML without its NUL
    domain_name: str  # latin-1, as in the XML (entities not expanded)

    @property
    def format_name(self) -> str:
        return format_name(self.format.value)

    @property
    def stream_offset(self) -> int:
        return HEADER_SIZE + self.data_len.value


def format_name(value: int) -> str:
    return FORMATS[value] if 0 <= value < len(FORMATS) else f"unknown ({value})"


def is_libvirt_image(fd: int) -> bool:
    """The file starts with libvirt's magic (finished or partial save)."""
    return os.pread(fd, 16, 0) in (MAGIC, PARTIAL_MAGIC)


def _bswap32(value: int) -> int:
    return int.from_bytes(value.to_bytes(4, "little"), "big")


def read_header(fd: int) -> LibvirtHeader:
    """Parse and bounds-check libvirt's header of the open file *fd* (see module doc)."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, HEADER_SIZE, 0)
    if head[:16] == PARTIAL_MAGIC:
        raise FormatError("LIBVIRT_PARTIAL", "libvirt save image is incomplete (magic "
                          "LibvirtQemudPart: the save never finished)", 0)
    if len(head) < HEADER_SIZE:
        raise FormatError("LIBVIRT_HEADER", f"libvirt save image header needs {HEADER_SIZE} "
                          f"bytes but the file ends at {size:#x}", len(head))
    vals = {name: Field(struct.unpack_from("<I", head, off)[0], off, 4) for name, off in FIELDS}
    version = vals["version"].value
    if version != VERSION:
        why = " (byte-swapped: an image from a host of the other byte order)" \
            if _bswap32(version) == VERSION else ""
        raise FormatError("LIBVIRT_VERSION", f"libvirt save image version {version} != "
                          f"{VERSION}{why}", 16)
    data_len = vals["data_len"].value
    if data_len == 0:
        raise FormatError("LIBVIRT_DATA_LEN", "libvirt save image data_len is 0 (no domain XML)",
                          20)
    if HEADER_SIZE + data_len > size:
        raise FormatError("LIBVIRT_DATA_LEN", f"libvirt save image data_len {data_len:#x} runs "
                          f"to {HEADER_SIZE + data_len:#x}, past the end of the file at "
                          f"{size:#x} (file ends inside the domain XML)", 20)
    if vals["was_running"].value not in (0, 1):
        raise FormatError("LIBVIRT_HEADER", f"libvirt save image was_running "
                          f"{vals['was_running'].value} is not 0 or 1", 24)
    fmt = vals["format"].value
    if fmt >= len(FORMATS):
        raise FormatError("LIBVIRT_FORMAT", f"libvirt save image format {fmt} is unknown "
                          f"(0..{len(FORMATS) - 1}: {', '.join(FORMATS)})", 28)
    cookie = vals["cookie_offset"].value
    if cookie and cookie >= data_len:
        raise FormatError("LIBVIRT_COOKIE", f"libvirt save image cookie offset {cookie:#x} is "
                          f"not inside the data ({data_len:#x} bytes)", 32)
    xml_len = cookie or data_len
    if xml_len > XML_MAX:
        raise FormatError("LIBVIRT_XML", f"libvirt save image domain XML of {xml_len} bytes "
                          f"is longer than {XML_MAX}", HEADER_SIZE)
    xml = os.pread(fd, xml_len, HEADER_SIZE)
    nul = xml.find(b"\0")
    if nul < 0:
        raise FormatError("LIBVIRT_XML", f"libvirt save image domain XML is not NUL-terminated "
                          f"within its {xml_len} bytes", HEADER_SIZE)
    name = _domain_name(xml[:nul])
    if name is None:
        raise FormatError("LIBVIRT_XML", f"libvirt save image domain XML has no <name> of 1.."
                          f"{NAME_MAX} bytes", HEADER_SIZE)
    header = LibvirtHeader(xml=ByteRange(HEADER_SIZE, HEADER_SIZE + nul), domain_name=name,
                           **vals)
    if fmt != SPARSE:
        raise FormatError("LIBVIRT_NOT_SPARSE", f"libvirt save image in format "
                          f"{format_name(fmt)}, not mapped-ram (only --image-format sparse "
                          f"writes mapped-ram)", 28)
    return header


def _domain_name(xml: bytes) -> str | None:
    start = xml.find(b"<name>")
    if start < 0:
        return None
    start += len(b"<name>")
    end = xml.find(b"</name>", start)
    if end < 0 or not 0 < end - start <= NAME_MAX:
        return None
    return xml[start:end].decode("latin-1")


def build_header(xml: bytes, *, stream_offset: int | None = None, was_running: int = 1,
                 fmt: int = SPARSE, cookie: bytes = b"", version: int = VERSION) -> bytes:
    """A libvirt header + data (XML, NUL, cookie, NUL, zero padding) ending at
    *stream_offset* (default: right after the data), as libvirt writes it."""
    data = xml + b"\0"
    cookie_offset = 0
    if cookie:
        cookie_offset = len(data)
        data += cookie + b"\0"
    end = HEADER_SIZE + len(data) if stream_offset is None else stream_offset
    if end < HEADER_SIZE + len(data):
        raise ValueError(f"stream offset {end:#x} leaves no room for {len(data)} bytes of data")
    data += bytes(end - HEADER_SIZE - len(data))
    head = MAGIC + struct.pack("<5I", version, len(data), was_running, fmt, cookie_offset)
    return head + bytes(HEADER_SIZE - len(head)) + data
