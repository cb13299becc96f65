"""Pure-Python reader of QEMU mapped-ram migration files, with the offset of every field.

``parse(path, offset=S)`` reads the stream that starts at file offset ``S``
(``file:PATH,offset=S``) and returns a frozen :class:`Snapshot`.  Every field is
a :class:`Field` (value, absolute file offset, size), so mutation helpers and
tests can point at exact bytes.  Reference: reference/mapped-ram-format.md.

Strict by default: the first broken rule raises :class:`FormatError` whose
``name`` is one of (checked in this order, per block in file order):

=============== ===========================================================
OPEN            the file cannot be opened (missing, no permission)
NOT_FILE        the path is a directory or another non-regular file
MAGIC           stream magic is not ``QEVM``
VERSION         stream version is not 3
CONFIG          no ``0x07`` configuration record; bad machine-name length;
                unknown configuration subsection; ``mapped-ram`` not among
                the capabilities; implausible target-page-bits
RAM_SECTION     no RAM START (``01 sid "ram"``), instance not 0, version
                not 4, first RAM record is not MEM_SIZE, too many blocks
TOTAL           MEM_SIZE total is 0, or does not equal the sum of the block
                lengths (the block list ends at EOS, or keeps going, where
                the total says otherwise)
BLOCK_ID        empty or duplicate RAMBlock id
BLOCK_LENGTH    used_length is 0 or not a multiple of the target page size,
                or the block does not end where a block or the EOS follows
                (``pages_offset + used_length`` lands in garbage)
HDR_VERSION     MappedRamHeader version is not 1
PAGE_SIZE       MappedRamHeader page_size is not the target page size
BITMAP_OFFSET   bitmap_offset at/after EOF, or not right after the header
PAGES_ALIGN     pages_offset is not a multiple of 1 MiB (absolute)
PAGES_OFFSET    pages_offset at/after EOF, or not at
                ``roundup(bitmap_offset + bitmap_size, 1 MiB)``
OVERLAP         a bitmap or page region overlaps an earlier block's regions,
                or the page region starts before the end of its own bitmap
TRUNCATED       the file ends inside a field or region, or without the EOF
                byte / with a cut VM description
FOOTER          EOS or a ``7e sid`` section footer missing or with the wrong
                section id (RAM records; the last device section)
RECORD          unexpected record between RAM START and RAM END (another
                iterative section, RAM flags other than EOS, a command other
                than SWITCHOVER_START with length 0: QEMU's
                qemu_loadvm_state_main runs any command there, but every other
                one needs a return path or postcopy, which a file lacks), or
                the device state does not start with a FULL section
EOF             the byte before the VM description is not ``0x00``
VMDESC          the VM description is not valid JSON
=============== ===========================================================

``parse(..., lenient=True)`` raises FormatError only for OPEN and NOT_FILE
(there is nothing to read); otherwise it records each problem
in ``Snapshot.problems`` and parses on as far as the layout allows (fields it
could not reach are ``None``), so mutation helpers work on broken files.

Bounded: every read is checked against the file size first; nothing is
allocated from an unchecked length field.  Bitmaps and pages are not read by
:func:`parse`; use :meth:`Block.read_bitmap` and :mod:`.digest`.
Strings (machine name, block ids, capabilities) are decoded as latin-1, so
they round-trip byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pytest_fastsnap.snapshot.errors import FormatError

if TYPE_CHECKING:
    from pytest_fastsnap.snapshot.libvirt import LibvirtHeader

__all__ = [
    "ALIGN",
    "HEADER_SIZE",
    "Block",
    "ByteRange",
    "Command",
    "Configuration",
    "Field",
    "FormatError",
    "MappedRamHeader",
    "RamRecord",
    "RamStart",
    "SectionFooter",
    "Snapshot",
    "StreamHeader",
    "Subsection",
    "VmDescription",
    "bitmap_size_for",
    "parse",
    "roundup",
]

MAGIC = 0x5145564D
STREAM_VERSION = 3
VM_EOF, VM_START, VM_PART, VM_END, VM_FULL = 0x00, 0x01, 0x02, 0x03, 0x04
VM_SUBSECTION, VM_VMDESCRIPTION, VM_CONFIGURATION, VM_COMMAND = 0x05, 0x06, 0x07, 0x08
VM_FOOTER = 0x7E
CMD_SWITCHOVER_START = 0x0B
RAM_MEM_SIZE, RAM_EOS = 0x04, 0x10
RAM_SECTION_VERSION = 4
HDR_VERSION = 1
HEADER_SIZE = 28
ALIGN = 0x100000
DEFAULT_PAGE_BITS = 12
MAX_BLOCKS = 1024
MAX_CAPABILITIES = 64
MAX_MACHINE_NAME = 256
SEARCH_WINDOW = 16 << 20  # early-setup bytes searched for RAM START
VMDESC_MAX = 64 << 20  # largest VM description looked for at the end
SUBSECTIONS = ("configuration/target-page-bits", "configuration/capabilities",
               "configuration/uuid")

T = TypeVar("T")


def roundup(value: int, align: int) -> int:
    return -(-value // align) * align


def bitmap_size_for(num_pages: int) -> int:
    """Bytes of a block's bitmap in the file: whole 64-bit longs."""
    return roundup(num_pages, 64) // 8


def _c_string(text: str) -> str:
    """What QEMU's strcmp() sees of a counted string: up to its first NUL."""
    return text.split("\0", 1)[0]


@dataclass(frozen=True)
class Field(Generic[T]):
    """A decoded value and the absolute file bytes ``[offset, offset+size)`` it came from."""

    value: T
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class ByteRange:
    """Half-open file range ``[start, end)``."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def overlaps(self, other: ByteRange) -> bool:
        return self.size > 0 and other.size > 0 and self.start < other.end \
            and other.start < self.end


@dataclass(frozen=True)
class StreamHeader:
    offset: int
    magic: Field[int]
    version: Field[int]


@dataclass(frozen=True)
class Subsection:
    offset: int  # the 0x05 byte
    name: Field[str]  # the str8: offset of its length byte
    version_id: Field[int]
    payload: ByteRange

    @property
    def end(self) -> int:
        return self.payload.end


@dataclass(frozen=True)
class Configuration:
    offset: int  # the 0x07 byte
    machine_length: Field[int]
    machine: Field[str]  # the name bytes (no length prefix)
    subsections: tuple[Subsection, ...]
    target_page_bits: Field[int] | None
    capabilities_count: Field[int] | None
    capabilities: tuple[Field[str], ...]  # str8 each: offset of the length byte
    uuid: Field[bytes] | None
    end: int

    @property
    def capability_names(self) -> tuple[str, ...]:
        return tuple(c.value for c in self.capabilities)


@dataclass(frozen=True)
class MappedRamHeader:
    offset: int
    version: Field[int]
    page_size: Field[int]
    bitmap_offset: Field[int]
    pages_offset: Field[int]

    @property
    def end(self) -> int:
        return self.offset + HEADER_SIZE

    def field(self, name: str) -> Field[int]:
        if name not in ("version", "page_size", "bitmap_offset", "pages_offset"):
            raise KeyError(name)
        value: Field[int] = getattr(self, name)
        return value


@dataclass(frozen=True)
class Block:
    """One RAMBlock entry of the RAM START block list.

    ``page_size`` is the target page size (the unit of the bitmap and the
    page region); the header's own ``page_size`` field is ``header.page_size``.
    """

    index: int
    id: Field[str]  # str8: offset of the length byte
    used_length: Field[int]
    gpa: Field[int] | None  # only with x-ignore-shared
    header: MappedRamHeader
    page_size: int
    num_pages: int
    bitmap_size: int
    ignored: bool  # x-ignore-shared block without regions (offsets 0/0)

    @property
    def offset(self) -> int:
        return self.id.offset

    @property
    def name(self) -> str:
        return self.id.value

    @property
    def bitmap_range(self) -> ByteRange:
        start = self.header.bitmap_offset.value
        return ByteRange(start, start + (0 if self.ignored else self.bitmap_size))

    @property
    def pages_range(self) -> ByteRange:
        start = self.header.pages_offset.value
        return ByteRange(start, start + (0 if self.ignored else self.used_length.value))

    @property
    def next_offset(self) -> int:
        """Where the stream continues: ``pages_offset + used_length``."""
        return self.header.end if self.ignored else self.pages_range.end

    def page_offset(self, index: int) -> int:
        if not 0 <= index < self.num_pages:
            raise IndexError(f"page {index} outside block {self.name!r} "
                             f"({self.num_pages} pages)")
        return self.header.pages_offset.value + index * self.page_size

    def read_bitmap(self, source: str | os.PathLike[str] | int) -> bytes:
        """The bitmap bytes (``bitmap_size``); bytes past EOF read as zero."""
        if self.ignored:
            return b""
        return pread_padded(source, self.header.bitmap_offset.value, self.bitmap_size)


@dataclass(frozen=True)
class SectionFooter:
    offset: int
    section_id: Field[int]


@dataclass(frozen=True)
class RamStart:
    offset: int  # the 0x01 byte
    section_id: Field[int]
    idstr: Field[str]
    instance_id: Field[int]
    version_id: Field[int]
    mem_size: Field[int]  # raw be64: total | RAM_SAVE_FLAG_MEM_SIZE
    total: int
    blocks: tuple[Block, ...]
    eos: Field[int] | None
    footer: SectionFooter | None

    @property
    def end(self) -> int | None:
        return self.footer.offset + 5 if self.footer else None


@dataclass(frozen=True)
class RamRecord:
    """A PART (0x02) or END (0x03) record of the RAM section: EOS and a footer."""

    offset: int
    kind: str  # "PART" or "END"
    section_id: Field[int]
    eos: Field[int]
    footer: SectionFooter

    @property
    def end(self) -> int:
        return self.footer.offset + 5


@dataclass(frozen=True)
class Command:
    offset: int
    cmd: Field[int]
    length: Field[int]
    data: ByteRange

    @property
    def end(self) -> int:
        return self.data.end


@dataclass(frozen=True)
class VmDescription:
    offset: int  # the 0x06 byte
    length: Field[int]
    json_range: ByteRange
    data: Any  # parsed JSON (None if it did not parse)


@dataclass(frozen=True)
class Snapshot:
    path: Path
    stream_offset: int
    file_size: int
    lenient: bool
    header: StreamHeader | None = None
    configuration: Configuration | None = None
    early_setup: ByteRange | None = None
    ram: RamStart | None = None
    records: tuple[RamRecord | Command, ...] = ()  # after RAM START, up to RAM END
    ram_end: RamRecord | None = None
    switchover_start: Command | None = None
    device_state: ByteRange | None = None
    eof_offset: int | None = None
    vmdesc: VmDescription | None = None
    problems: tuple[FormatError, ...] = ()
    libvirt: LibvirtHeader | None = None  # parse() without offset of a libvirt save image

    @property
    def ok(self) -> bool:
        return not self.problems and self.eof_offset is not None

    @property
    def blocks(self) -> tuple[Block, ...]:
        return self.ram.blocks if self.ram else ()

    @property
    def page_size(self) -> int:
        bits = self.configuration.target_page_bits if self.configuration else None
        return 1 << (bits.value if bits else DEFAULT_PAGE_BITS)

    @property
    def machine(self) -> str | None:
        return self.configuration.machine.value if self.configuration else None

    @property
    def ram_section_id(self) -> int | None:
        return self.ram.section_id.value if self.ram else None

    def block(self, block_id: str | Block) -> Block:
        if isinstance(block_id, Block):
            return block_id
        for blk in self.blocks:
            if blk.name == block_id:
                return blk
        raise KeyError(f"no block {block_id!r} in {self.path} "
                       f"(blocks: {[b.name for b in self.blocks]})")

    def bitmap(self, block_id: str | Block) -> bytes:
        return self.block(block_id).read_bitmap(self.path)

    def problem_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.problems)


def pread_padded(source: str | os.PathLike[str] | int, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset``; what lies past EOF reads as zero (bounded by the file)."""
    if isinstance(source, int):
        return _pread_fd(source, offset, size)
    fd = os.open(source, os.O_RDONLY)
    try:
        return _pread_fd(fd, offset, size)
    finally:
        os.close(fd)


def _pread_fd(fd: int, offset: int, size: int) -> bytes:
    file_size = os.fstat(fd).st_size
    real = max(0, min(size, file_size - offset))
    data = os.pread(fd, real, offset) if real else b""
    if size - len(data) > 0:
        if size > file_size + (64 << 20):
            raise ValueError(f"refusing to pad {size} bytes for a {file_size}-byte file")
        data += bytes(size - len(data))
    return data


class _Stop(Exception):
    """Lenient parsing cannot go on."""


class _Parser:
    def __init__(self, fd: int, size: int, lenient: bool) -> None:
        self.fd = fd
        self.size = size
        self.lenient = lenient
        self.problems: list[FormatError] = []
        self.out: dict[str, Any] = {}
        self.tps = 1 << DEFAULT_PAGE_BITS
        self.ignore_shared = False

    # -- primitives ------------------------------------------------------------

    def fail(self, name: str, message: str, offset: int | None, fatal: bool = True) -> None:
        err = FormatError(name, message, offset)
        if not self.lenient:
            raise err
        self.problems.append(err)
        if fatal:
            raise _Stop

    def read(self, offset: int, n: int, what: str) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.size:
            self.fail("TRUNCATED", f"{what} needs bytes [{offset:#x}, {offset + n:#x}) "
                      f"but the file ends at {self.size:#x}", offset)
        data = os.pread(self.fd, n, offset)
        if len(data) != n:
            self.fail("TRUNCATED", f"{what}: short read", offset)
        return data

    def uint(self, offset: int, n: int, what: str) -> Field[int]:
        return Field(int.from_bytes(self.read(offset, n, what), "big"), offset, n)

    def str8(self, offset: int, what: str) -> Field[str]:
        n = self.read(offset, 1, what)[0]
        text = self.read(offset + 1, n, what).decode("latin-1")
        return Field(text, offset, 1 + n)

    def peek(self, offset: int, n: int) -> bytes | None:
        if offset < 0 or offset + n > self.size:
            return None
        data = os.pread(self.fd, n, offset)
        return data if len(data) == n else None

    # -- stream ------------------------------------------------------------------

    def parse(self, s: int) -> None:
        if s < 0 or s > self.size:
            self.fail("TRUNCATED", f"stream offset {s:#x} beyond the file ({self.size:#x})", s)
        magic = self.uint(s, 4, "stream magic")
        if magic.value != MAGIC:
            self.fail("MAGIC", f"magic {magic.value:#010x} != {MAGIC:#010x}", s)
        version = self.uint(s + 4, 4, "stream version")
        if version.value != STREAM_VERSION:
            self.fail("VERSION", f"stream version {version.value} != {STREAM_VERSION}",
                      s + 4, fatal=False)
        self.out["header"] = StreamHeader(s, magic, version)
        config = self.configuration(s + 8)
        self.out["configuration"] = config
        ram_at = self.find_ram_start(config.end)
        self.out["early_setup"] = ByteRange(config.end, ram_at)
        pos = self.ram_start(ram_at)
        pos = self.ram_records(pos)
        self.tail(pos)

    def configuration(self, pos: int) -> Configuration:
        kind = self.uint(pos, 1, "configuration record")
        if kind.value != VM_CONFIGURATION:
            self.fail("CONFIG", f"configuration record missing: byte {kind.value:#04x} "
                      f"!= {VM_CONFIGURATION:#04x}", pos)
        length = self.uint(pos + 1, 4, "machine name length")
        if not 0 < length.value <= MAX_MACHINE_NAME:
            self.fail("CONFIG", f"machine name length {length.value} not in "
                      f"1..{MAX_MACHINE_NAME}", pos + 1)
        name_bytes = self.read(pos + 5, length.value, "machine name")
        machine = Field(name_bytes.decode("latin-1"), pos + 5, length.value)
        cur = machine.end
        subs: list[Subsection] = []
        page_bits: Field[int] | None = None
        caps_count: Field[int] | None = None
        caps: list[Field[str]] = []
        uuid: Field[bytes] | None = None
        while self.uint(cur, 1, "configuration subsection").value == VM_SUBSECTION:
            name = self.str8(cur + 1, "subsection name")
            vid = self.uint(name.end, 4, "subsection version")
            body = vid.end
            # QEMU copies the name into a NUL-terminated buffer and strcmp()s
            # it, so a name ends at its first NUL (as a block id does).
            wanted = _c_string(name.value)
            if wanted == "configuration/target-page-bits":
                page_bits = self.uint(body, 4, "target-page-bits")
                if not 9 <= page_bits.value <= 16:
                    self.fail("CONFIG", f"target-page-bits {page_bits.value} not in 9..16", body)
                end = page_bits.end
            elif wanted == "configuration/capabilities":
                caps_count = self.uint(body, 4, "capability count")
                if caps_count.value > MAX_CAPABILITIES:
                    self.fail("CONFIG", f"{caps_count.value} capabilities (> "
                              f"{MAX_CAPABILITIES})", body)
                end = caps_count.end
                for _ in range(caps_count.value):
                    cap = self.str8(end, "capability name")
                    caps.append(cap)
                    end = cap.end
            elif wanted == "configuration/uuid":
                raw = self.read(body, 16, "uuid")
                uuid = Field(raw, body, 16)
                end = body + 16
            else:
                self.fail("CONFIG", f"unknown configuration subsection {name.value!r}", cur)
                end = body
            subs.append(Subsection(cur, name, vid, ByteRange(body, end)))
            cur = end
        if page_bits is not None:
            self.tps = 1 << page_bits.value
        names = [_c_string(c.value) for c in caps]
        self.ignore_shared = "x-ignore-shared" in names
        if "mapped-ram" not in names:
            self.fail("CONFIG", f"capabilities {names} do not include 'mapped-ram'", cur,
                      fatal=False)
        return Configuration(pos, length, machine, tuple(subs), page_bits, caps_count,
                             tuple(caps), uuid, cur)

    def find_ram_start(self, pos: int) -> int:
        """RAM START is next, unless early-setup FULL sections come first."""
        if self.peek(pos, 1) == bytes([VM_START]):
            head = self.peek(pos + 5, 4)
            if head == b"\x03ram":
                return pos
        window = self.peek(pos, min(SEARCH_WINDOW, self.size - pos)) or b""
        at = window.find(b"\x03ram")
        while at >= 0:
            if at >= 5 and window[at - 5] == VM_START:
                return pos + at - 5
            at = window.find(b"\x03ram", at + 1)
        self.fail("RAM_SECTION", "no RAM START record (01 sid 03 'ram') after the "
                  "configuration", pos)
        raise AssertionError("unreachable")

    def ram_start(self, pos: int) -> int:
        sid = self.uint(pos + 1, 4, "RAM section id")
        idstr = self.str8(pos + 5, "RAM section idstr")
        instance = self.uint(idstr.end, 4, "RAM instance id")
        version = self.uint(instance.end, 4, "RAM section version")
        if instance.value != 0:
            self.fail("RAM_SECTION", f"RAM instance id {instance.value} != 0", instance.offset,
                      fatal=False)
        if version.value != RAM_SECTION_VERSION:
            self.fail("RAM_SECTION", f"RAM section version {version.value} != "
                      f"{RAM_SECTION_VERSION}", version.offset, fatal=False)
        mem = self.uint(version.end, 8, "MEM_SIZE")
        flags = mem.value & (self.tps - 1)
        total = mem.value & ~(self.tps - 1)
        base: dict[str, Any] = dict(offset=pos, section_id=sid, idstr=idstr,
                                    instance_id=instance, version_id=version, mem_size=mem,
                                    total=total)
        self.out["ram"] = RamStart(**base, blocks=(), eos=None, footer=None)
        if flags != RAM_MEM_SIZE:
            self.fail("RAM_SECTION", f"first RAM record flags {flags:#x} are not MEM_SIZE "
                      f"({RAM_MEM_SIZE:#x})", mem.offset)
        if total == 0:
            self.fail("TOTAL", "MEM_SIZE total is 0", mem.offset)
        blocks: list[Block] = []
        cur = mem.end
        summed = 0
        while True:
            if len(blocks) >= MAX_BLOCKS:
                self.fail("RAM_SECTION", f"more than {MAX_BLOCKS} blocks", cur)
            blk = self.block(len(blocks), cur, blocks)
            blocks.append(blk)
            self.out["ram"] = RamStart(**base, blocks=tuple(blocks), eos=None, footer=None)
            summed += blk.used_length.value
            cur = blk.next_offset
            if cur > self.size:
                raise _Stop  # reported as TRUNCATED by block()
            if cur <= blk.offset:
                self.fail("BLOCK_LENGTH", f"block {blk.name!r} at {blk.offset:#x} sends the "
                          f"stream back to {cur:#x}", blk.header.pages_offset.offset)
            is_eos = self.is_eos(cur, sid.value)
            plausible = not is_eos and self.plausible_block(cur)
            if not is_eos and not plausible:
                self.need_entry(cur)
            if is_eos:
                if summed != total:
                    self.fail("TOTAL", f"blocks sum to {summed:#x} but MEM_SIZE total is "
                              f"{total:#x}", mem.offset, fatal=False)
                break
            if plausible:
                if summed >= total:
                    self.fail("TOTAL", f"another block follows at {cur:#x} but the blocks "
                              f"already sum to {summed:#x} >= total {total:#x}", mem.offset,
                              fatal=False)
                continue
            eos_flag = self.peek(cur, 8)
            if summed == total and eos_flag == RAM_EOS.to_bytes(8, "big"):
                break  # EOS present, its footer is checked below
            self.fail("BLOCK_LENGTH", f"block {blk.name!r} used_length "
                      f"{blk.used_length.value:#x} ends at {cur:#x}, where neither a "
                      "block nor the EOS follows", blk.used_length.offset)
        eos = self.uint(cur, 8, "RAM EOS")
        footer = self.footer(eos.end, sid.value, "RAM START")
        self.out["ram"] = RamStart(**base, blocks=tuple(blocks), eos=eos, footer=footer)
        return footer.offset + 5

    def block(self, index: int, pos: int, previous: list[Block]) -> Block:
        ident = self.str8(pos, "block id")
        # QEMU reads the id into a C string and looks the RAMBlock up with
        # strcmp, so an id ends at its first NUL: "\0x" is empty and
        # "pc.ram\0x" is pc.ram (the C parser sees the same).
        effective = _c_string(ident.value)
        if not effective:
            self.fail("BLOCK_ID", f"block {index} has an empty id", pos, fatal=False)
        elif any(_c_string(b.name) == effective for b in previous):
            self.fail("BLOCK_ID", f"duplicate block id {effective!r}", pos, fatal=False)
        length = self.uint(ident.end, 8, "block used_length")
        if length.value == 0 or length.value % self.tps:
            self.fail("BLOCK_LENGTH", f"block {ident.value!r} used_length {length.value:#x} "
                      f"is 0 or not a multiple of {self.tps}", length.offset, fatal=False)
        cur = length.end
        gpa = None
        if self.ignore_shared:
            gpa = self.uint(cur, 8, "block GPA")
            cur = gpa.end
        self.read(cur, HEADER_SIZE, f"MappedRamHeader of {ident.value!r}")
        hdr = MappedRamHeader(cur, self.uint(cur, 4, "hdr version"),
                              self.uint(cur + 4, 8, "hdr page_size"),
                              self.uint(cur + 12, 8, "hdr bitmap_offset"),
                              self.uint(cur + 20, 8, "hdr pages_offset"))
        name = repr(ident.value)
        if hdr.version.value != HDR_VERSION:
            self.fail("HDR_VERSION", f"block {name} header version {hdr.version.value} != "
                      f"{HDR_VERSION}", hdr.version.offset, fatal=False)
        if hdr.page_size.value != self.tps:
            self.fail("PAGE_SIZE", f"block {name} header page_size {hdr.page_size.value} != "
                      f"{self.tps}", hdr.page_size.offset, fatal=False)
        num_pages = length.value // self.tps
        bsize = bitmap_size_for(num_pages)
        bo, po = hdr.bitmap_offset.value, hdr.pages_offset.value
        ignored = self.ignore_shared and bo == 0 and po == 0
        blk = Block(index, ident, length, gpa, hdr, self.tps, num_pages, bsize, ignored)
        if ignored:
            return blk
        earlier = [r for b in previous for r in (b.bitmap_range, b.pages_range)]
        bitmap = ByteRange(bo, bo + bsize)
        if bo >= self.size:
            self.fail("BITMAP_OFFSET", f"block {name} bitmap_offset {bo:#x} at/after EOF "
                      f"({self.size:#x})", hdr.bitmap_offset.offset, fatal=False)
        elif bitmap.end > self.size:
            self.fail("TRUNCATED", f"block {name} bitmap [{bo:#x}, {bitmap.end:#x}) runs past "
                      f"EOF ({self.size:#x})", bo, fatal=False)
        elif any(bitmap.overlaps(r) for r in earlier):
            self.fail("OVERLAP", f"block {name} bitmap [{bo:#x}, {bitmap.end:#x}) overlaps an "
                      "earlier block's region", hdr.bitmap_offset.offset, fatal=False)
        elif bo != hdr.end:
            self.fail("BITMAP_OFFSET", f"block {name} bitmap_offset {bo:#x} is not right after "
                      f"its header ({hdr.end:#x})", hdr.bitmap_offset.offset, fatal=False)
        pages = ByteRange(po, po + length.value)
        want = roundup(hdr.end + bsize, ALIGN)
        if po % ALIGN:
            self.fail("PAGES_ALIGN", f"block {name} pages_offset {po:#x} is not 1 MiB aligned",
                      hdr.pages_offset.offset, fatal=False)
        elif po >= self.size:
            self.fail("PAGES_OFFSET", f"block {name} pages_offset {po:#x} at/after EOF "
                      f"({self.size:#x})", hdr.pages_offset.offset, fatal=False)
        elif po < hdr.end + bsize or any(pages.overlaps(r) for r in earlier):
            self.fail("OVERLAP", f"block {name} pages [{po:#x}, {pages.end:#x}) overlap its "
                      "header/bitmap or an earlier block", hdr.pages_offset.offset, fatal=False)
        elif po != want:
            self.fail("PAGES_OFFSET", f"block {name} pages_offset {po:#x} != roundup(bitmap "
                      f"end, 1 MiB) = {want:#x}", hdr.pages_offset.offset, fatal=False)
        if pages.end > self.size:
            self.fail("TRUNCATED", f"block {name} pages [{po:#x}, {pages.end:#x}) run past EOF "
                      f"({self.size:#x})", max(po, 0), fatal=False)
        return blk

    def need_entry(self, pos: int) -> None:
        """TRUNCATED if the file ends before a block entry (or the EOS) at *pos* could."""
        n = self.peek(pos, 1)
        if n is None:
            self.fail("TRUNCATED", f"file ends at {self.size:#x} where a block entry or the "
                      "EOS should start", pos)
            return
        need = 1 + n[0] + 8 + (8 if self.ignore_shared else 0) + HEADER_SIZE
        if pos + min(need, 13) > self.size or (pos + need > self.size and n[0] > 0):
            self.fail("TRUNCATED", f"file ends at {self.size:#x} inside the block entry at "
                      f"{pos:#x}", pos)

    def is_eos(self, pos: int, sid: int) -> bool:
        data = self.peek(pos, 13)
        return data is not None and int.from_bytes(data[:8], "big") == RAM_EOS \
            and data[8] == VM_FOOTER and int.from_bytes(data[9:], "big") == sid

    def plausible_block(self, pos: int) -> bool:
        """Does a block entry look like it starts at *pos*?  (2 of 4 header rules hold.)"""
        n = self.peek(pos, 1)
        if n is None:
            return False
        hdr = pos + 1 + n[0] + 8 + (8 if self.ignore_shared else 0)
        raw = self.peek(hdr, HEADER_SIZE)
        if raw is None:
            return False
        version = int.from_bytes(raw[0:4], "big")
        page_size = int.from_bytes(raw[4:12], "big")
        bo = int.from_bytes(raw[12:20], "big")
        po = int.from_bytes(raw[20:28], "big")
        score = (version == HDR_VERSION) + (page_size == self.tps) \
            + (bo == hdr + HEADER_SIZE) + (po % ALIGN == 0 and po > hdr)
        return score >= 2

    def footer(self, pos: int, sid: int, what: str) -> SectionFooter:
        mark = self.uint(pos, 1, f"{what} footer")
        fsid = self.uint(pos + 1, 4, f"{what} footer section id")
        if mark.value != VM_FOOTER or fsid.value != sid:
            self.fail("FOOTER", f"{what}: expected footer 7e {sid:#x}, got {mark.value:#04x} "
                      f"{fsid.value:#x}", pos)
        return SectionFooter(pos, fsid)

    def ram_records(self, pos: int) -> int:
        ram: RamStart = self.out["ram"]
        sid = ram.section_id.value
        records: list[RamRecord | Command] = []
        while True:
            self.out["records"] = tuple(records)
            kind = self.uint(pos, 1, "record type")
            if kind.value in (VM_PART, VM_END):
                rsid = self.uint(pos + 1, 4, "record section id")
                if rsid.value != sid:
                    self.fail("RECORD", f"record {kind.value:#04x} for section {rsid.value} "
                              f"(only the RAM section {sid} is supported before RAM END)", pos)
                eos = self.uint(pos + 5, 8, "RAM record flags")
                if eos.value != RAM_EOS:
                    self.fail("RECORD", f"RAM record flags {eos.value:#x} in a mapped-ram "
                              "stream (only EOS is expected)", eos.offset)
                label = "PART" if kind.value == VM_PART else "END"
                rec = RamRecord(pos, label, rsid, eos, self.footer(eos.end, sid, f"RAM {label}"))
                records.append(rec)
                pos = rec.end
                if label == "END":
                    self.out["records"] = tuple(records)
                    self.out["ram_end"] = rec
                    return pos
            elif kind.value == VM_COMMAND:
                cmd = self.uint(pos + 1, 2, "command")
                length = self.uint(pos + 3, 2, "command length")
                if cmd.value != CMD_SWITCHOVER_START or length.value != 0:
                    # qemu_loadvm_state_main runs any command it meets, but on a
                    # file stream every other one needs a return path or postcopy.
                    self.fail("RECORD", f"command {cmd.value:#x} length {length.value} at "
                              f"{pos:#x} (only SWITCHOVER_START 08 000b 0000 is allowed "
                              "before RAM END)", pos)
                self.read(length.end, length.value, "command data")
                com = Command(pos, cmd, length, ByteRange(length.end, length.end + length.value))
                records.append(com)
                if cmd.value == CMD_SWITCHOVER_START and "switchover_start" not in self.out:
                    self.out["switchover_start"] = com
                pos = com.end
            else:
                self.fail("RECORD", f"unexpected record type {kind.value:#04x} before RAM END",
                          pos)

    def tail(self, dev_start: int) -> None:
        """Device state, EOF byte and VM description, anchored from the end of the file."""
        size = self.size
        window_start = max(dev_start, size - VMDESC_MAX)
        window = self.peek(window_start, size - window_start) or b""
        found = None
        at = len(window)
        for _ in range(4096):
            at = window.rfind(b"\x06", 0, at)
            if at < 0 or at + 5 > len(window):
                break
            length = int.from_bytes(window[at + 1:at + 5], "big")
            if window_start + at + 5 + length == size and window[at + 5:at + 6] == b"{":
                found = window_start + at
                break
        if found is not None:
            eof = found - 1
            if eof < dev_start:
                self.fail("EOF", "VM description without an EOF byte before it", found)
            if self.uint(eof, 1, "EOF").value != VM_EOF:
                self.fail("EOF", "byte before the VM description is not EOF (00)", eof)
            length_field = self.uint(found + 1, 4, "VM description length")
            body = ByteRange(found + 5, size)
            raw = window[body.start - window_start:]
            try:
                data = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
                data = None
                self.fail("VMDESC", f"VM description is not JSON: {err}", body.start,
                          fatal=False)
            vmdesc = VmDescription(found, length_field, body, data)
        else:
            eof = size - 1
            ends_with_footer = size - 5 >= dev_start and window[-5:-4] == bytes([VM_FOOTER])
            good = eof >= dev_start and window[-1:] == b"\x00" and not ends_with_footer and (
                eof == dev_start
                or (eof - 5 >= window_start and window[eof - 5 - window_start] == VM_FOOTER))
            if not good:
                cut = window.rfind(b"\x00\x06")
                what = "inside the VM description" if cut >= 0 and \
                    window[cut + 6:cut + 7] == b"{" else "without the EOF byte"
                self.fail("TRUNCATED", f"the file ends {what} (size {size:#x})", size)
            vmdesc = None
        self.out["device_state"] = ByteRange(dev_start, eof)
        self.out["eof_offset"] = eof
        self.out["vmdesc"] = vmdesc
        if eof > dev_start:
            if self.uint(dev_start, 1, "device state").value != VM_FULL:
                self.fail("RECORD", "device state does not start with a FULL section (04)",
                          dev_start, fatal=False)
            if eof - 5 < dev_start or self.uint(eof - 5, 1, "footer").value != VM_FOOTER:
                self.fail("FOOTER", "device state does not end with a section footer",
                          eof - 5, fatal=False)


def parse(path: str | os.PathLike[str], offset: int | None = None, *,
          lenient: bool = False) -> Snapshot:
    """Parse the mapped-ram stream at *offset* of *path* (see the module docstring).

    Without *offset*: a libvirt save image (:mod:`.libvirt`) is read from the end of
    libvirt's header (``Snapshot.libvirt``), any other file from offset 0.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise FormatError("OPEN", f"{path}: cannot open: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError("NOT_FILE", f"{path}: " + ("is a directory, not a snapshot file"
                              if stat.S_ISDIR(st.st_mode) else "not a regular file"))
        size = st.st_size
        parser = _Parser(fd, size, lenient)
        with contextlib.suppress(_Stop):
            if offset is None:
                parser.out["libvirt"] = _libvirt_header(parser)
                offset = parser.out["libvirt"].stream_offset if parser.out["libvirt"] else 0
            parser.parse(offset)
    finally:
        os.close(fd)
    return Snapshot(path=path, stream_offset=offset or 0, file_size=size, lenient=lenient,
                    problems=tuple(parser.problems), **parser.out)


def _libvirt_header(parser: _Parser) -> LibvirtHeader | None:
    from pytest_fastsnap.snapshot import libvirt

    if not libvirt.is_libvirt_image(parser.fd):
        return None
    try:
        return libvirt.read_header(parser.fd)
    except FormatError as err:
        parser.fail(err.name, err.message, err.offset)
        raise  # not reached: fail() raises


def iter_regions(snapshot: Snapshot) -> Iterator[tuple[str, ByteRange]]:
    """Named file regions in file order (for truncation helpers and reports)."""
    for blk in snapshot.blocks:
        yield f"header:{blk.name}", ByteRange(blk.header.offset, blk.header.end)
        if not blk.ignored:
            yield f"bitmap:{blk.name}", blk.bitmap_range
            yield f"pages:{blk.name}", blk.pages_range
    if snapshot.device_state is not None:
        yield "device_state", snapshot.device_state
    if snapshot.vmdesc is not None:
        yield "vmdesc", snapshot.vmdesc.json_range
