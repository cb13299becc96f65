"""The Python snapshot reader, writer, bitmaps, digests and mutations on synthetic files.

No QEMU: files come from the pure-Python writer (which re-serialises QEMU's own
files byte for byte, see test_snapshot_qemu.py).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from pathlib import Path

import pytest

from pytest_fastsnap.snapshot import bitmap as bm
from pytest_fastsnap.snapshot import mutate
from pytest_fastsnap.snapshot.digest import (
    block_bytes,
    block_digest,
    read_page,
    restored_memory_range,
    sha256_of_file_content,
)
from pytest_fastsnap.snapshot.errors import ERROR_NAMES, FormatError
from pytest_fastsnap.snapshot.format import ALIGN, HEADER_SIZE, Snapshot, parse, roundup
from pytest_fastsnap.snapshot.sparse import sparse_copy
from pytest_fastsnap.snapshot.writer import (
    PART,
    SWITCHOVER_START,
    BlockSpec,
    device_section,
    spec_from_snapshot,
    write_snapshot,
    write_spec,
)

PS = 4096


def _page(seed: int) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (PS // 32)


def _content(pages: int, data_pages: set[int], seed: int = 0) -> bytes:
    return b"".join(_page(seed * 100000 + i) if i in data_pages else bytes(PS)
                    for i in range(pages))


RAM = _content(96, {0, 1, 5, 63, 64, 65, 95}, 1)  # crosses a 64-page bitmap word
BIOS = _content(16, {0, 15}, 2)
DEVICES = device_section(2, "timer", bytes(range(256)) * 16) \
    + device_section(3, "cpu", b"\x11" * 3000, instance_id=0, version_id=3)
BLOCKS = [("pc.ram", RAM), ("pc.bios", BIOS), ("/rom@etc/acpi/rsdp", _content(1, {0}, 3))]


def _write(path: Path, offset: int = 0, blocks: list[tuple[str, bytes]] | None = None
           ) -> Snapshot:
    if offset:
        path.write_bytes(b"\xa5" * offset)
    write_snapshot(path, "pc-q35-10.0", BLOCKS if blocks is None else blocks, DEVICES, offset,
                   vmdesc={"page_size": PS, "devices": [{"name": "timer"}]})
    return parse(path, offset)


@pytest.fixture
def snap(tmp_path: Path) -> Snapshot:
    return _write(tmp_path / "synthetic.img")


# -- layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 0x10000, 0x123])
def test_placement_rules(tmp_path: Path, offset: int) -> None:
    snap = _write(tmp_path / "s.img", offset)
    assert snap.ok and snap.stream_offset == offset
    assert snap.header is not None and snap.header.magic.offset == offset
    assert snap.configuration is not None
    assert snap.configuration.capability_names == ("mapped-ram",)
    assert snap.ram is not None and snap.ram.total == sum(len(c) for _, c in BLOCKS)
    assert sum(b.used_length.value for b in snap.blocks) == snap.ram.total
    for prev, blk in zip((None, *snap.blocks), snap.blocks, strict=False):
        if prev is not None:
            assert blk.offset == prev.header.pages_offset.value + prev.used_length.value
        assert blk.header.offset == blk.used_length.end
        assert blk.header.bitmap_offset.value == blk.header.offset + HEADER_SIZE
        assert blk.bitmap_size == roundup(blk.num_pages, 64) // 8
        assert blk.header.pages_offset.value == roundup(
            blk.header.bitmap_offset.value + blk.bitmap_size, ALIGN)
        assert blk.header.version.value == 1 and blk.header.page_size.value == PS
    assert [b.name for b in snap.blocks] == [n for n, _ in BLOCKS]
    assert snap.ram_end is not None and snap.switchover_start is not None
    assert [getattr(r, "kind", "CMD") for r in snap.records] == ["PART", "CMD", "END"]
    assert snap.device_state is not None and snap.device_state.size == len(DEVICES)
    assert snap.eof_offset == snap.device_state.end
    assert snap.vmdesc is not None and snap.vmdesc.data["devices"] == [{"name": "timer"}]
    assert snap.vmdesc.json_range.end == snap.file_size
    with open(tmp_path / "s.img", "rb") as f:
        data = f.read()
    assert data[:offset] == b"\xa5" * offset  # bytes before the stream are kept
    assert data[snap.device_state.start:snap.device_state.end] == DEVICES


def test_field_offsets_point_at_their_bytes(snap: Snapshot) -> None:
    data = snap.path.read_bytes()
    blk = snap.block("pc.bios")
    for name in ("version", "page_size", "bitmap_offset", "pages_offset"):
        fld = blk.header.field(name)
        assert int.from_bytes(data[fld.offset:fld.end], "big") == fld.value
    assert data[blk.id.offset] == len("pc.bios") and data[blk.id.offset + 1:blk.id.end] == \
        b"pc.bios"
    assert snap.ram is not None
    mem = snap.ram.mem_size
    assert int.from_bytes(data[mem.offset:mem.end], "big") == snap.ram.total | 0x04
    assert data[snap.ram.offset] == 0x01 and data[snap.eof_offset or 0] == 0


def test_holes_stay_holes(tmp_path: Path) -> None:
    big = [("pc.ram", _content(8192, {0, 4000}, 4))]  # 32 MiB, two data pages
    snap = _write(tmp_path / "big.img", blocks=big)
    st = os.stat(snap.path)
    assert st.st_size > 32 << 20
    assert st.st_blocks * 512 < 1 << 20, "page holes were written"
    copy = sparse_copy(snap.path, tmp_path / "copy.img")
    assert os.stat(copy).st_blocks * 512 < 1 << 20
    assert sha256_of_file_content(copy) == sha256_of_file_content(snap.path)


def test_options_configuration_and_records(tmp_path: Path) -> None:
    uuid = bytes(range(16))
    path = tmp_path / "opt.img"
    write_snapshot(path, "virt-10.0", [("ram", _content(8, {1}))], b"", 0,
                   capabilities=("x-ignore-shared", "mapped-ram"), uuid=uuid,
                   target_page_bits=12, ram_section_id=7,
                   records=(PART, PART, SWITCHOVER_START), vmdesc=None)
    snap = parse(path)
    assert snap.ok and snap.vmdesc is None and snap.eof_offset == snap.file_size - 1
    assert snap.configuration is not None and snap.configuration.uuid is not None
    assert snap.configuration.uuid.value == uuid
    assert snap.configuration.target_page_bits is not None
    assert snap.ram_section_id == 7 and snap.device_state is not None
    assert snap.device_state.size == 0
    assert [getattr(r, "kind", "CMD") for r in snap.records] == ["PART", "PART", "CMD", "END"]
    assert snap.blocks[0].gpa is not None


def test_ignored_block_with_ignore_shared(tmp_path: Path) -> None:
    path = tmp_path / "ign.img"
    blocks = [BlockSpec("shared", 8 * PS, ignored=True, gpa=0x1000_0000),
              BlockSpec("pc.ram", 8 * PS, {2: _page(2)}, gpa=0)]
    write_snapshot(path, "pc-q35-10.0", blocks, DEVICES,
                   capabilities=("mapped-ram", "x-ignore-shared"))
    snap = parse(path)
    shared, ram = snap.blocks
    assert shared.ignored and shared.gpa is not None and shared.gpa.value == 0x1000_0000
    assert ram.offset == shared.header.end
    assert read_page(snap, "pc.ram", 2) == _page(2)


# -- round trip ------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 0x10000])
def test_writer_round_trip(tmp_path: Path, offset: int) -> None:
    snap = _write(tmp_path / "a.img", offset)
    spec = spec_from_snapshot(snap)
    assert [b.id for b in spec.blocks] == [n for n, _ in BLOCKS]
    assert spec.device_state == DEVICES and spec.offset == offset
    for (_, content), b in zip(BLOCKS, spec.blocks, strict=True):
        assert {i: b.pages[i] for i in b.pages} == {
            i: content[i * PS:(i + 1) * PS] for i in range(len(content) // PS)
            if any(content[i * PS:(i + 1) * PS])}
    again = write_spec(tmp_path / "b.img", spec)
    assert sha256_of_file_content(again) == sha256_of_file_content(snap.path)
    reparsed = parse(again, offset)
    assert reparsed.blocks == snap.blocks
    assert reparsed.ram == snap.ram and reparsed.records == snap.records
    assert reparsed.configuration == snap.configuration
    assert reparsed.device_state == snap.device_state and reparsed.vmdesc == snap.vmdesc


def test_zero_pages_as_data(tmp_path: Path) -> None:
    path = tmp_path / "z.img"
    write_snapshot(path, "pc-q35-10.0", [("pc.ram", _content(70, {3}))], DEVICES,
                   zero_pages_as_data=True)
    snap = parse(path)
    assert bm.popcount(snap.bitmap("pc.ram"), 70) == 70
    assert block_bytes(snap, "pc.ram") == _content(70, {3})


# -- bitmaps and digests ---------------------------------------------------------------------------


def test_bit_order_is_little_endian_bytes() -> None:
    bits = bytearray(16)
    for i in (0, 9, 63, 64, 127):
        bm.set_bit(bits, i)
    assert bits[0] == 0x01 and bits[1] == 0x02 and bits[7] == 0x80 and bits[8] == 0x01
    assert bits[15] == 0x80
    assert list(bm.iter_set_pages(bits)) == [0, 9, 63, 64, 127]
    assert bm.popcount(bits) == 5 and bm.popcount(bits, 64) == 3
    bm.clear_bit(bits, 9)
    assert not bm.bit_is_set(bits, 9) and bm.bit_is_set(bits, 63)
    assert list(bm.iter_runs(bits, 4)) == [(0, 1, True), (1, 3, False)]
    assert bm.diff_pages(bits, bytes(16), 128) == [0, 63, 64, 127]


def test_bitmap_matches_content(snap: Snapshot) -> None:
    for name, content in BLOCKS:
        blk = snap.block(name)
        file_bits = snap.bitmap(blk)
        assert len(file_bits) == blk.bitmap_size
        assert bm.diff_pages(file_bits, bm.expected_bitmap(content), blk.num_pages) == []


def test_digests_and_ranges(snap: Snapshot) -> None:
    for name, content in BLOCKS:
        assert block_digest(snap, name) == hashlib.sha256(content).hexdigest()
        assert block_bytes(snap, name) == content
    assert restored_memory_range(snap, "pc.ram", 4 * PS + 100, 3 * PS) == \
        RAM[4 * PS + 100:7 * PS + 100]
    assert read_page(snap, "pc.ram", 64) == RAM[64 * PS:65 * PS]
    with pytest.raises(ValueError):
        restored_memory_range(snap, "pc.ram", len(RAM) - 10, 20)
    with pytest.raises(IndexError):
        read_page(snap, "pc.ram", 96)


def test_stale_data_under_a_clear_bit_is_ignored(snap: Snapshot, tmp_path: Path) -> None:
    m = mutate.write_page_data(snap.path, tmp_path / "stale.img", "pc.ram", 2)
    assert m.expected_error is None
    stale = parse(tmp_path / "stale.img")
    with open(stale.path, "rb") as f:
        f.seek(m.offset or 0)
        assert any(f.read(PS))
    assert block_digest(stale, "pc.ram") == hashlib.sha256(RAM).hexdigest()
    m = mutate.set_bitmap_bit(tmp_path / "stale.img", tmp_path / "set.img", "pc.ram", 2)
    assert m.old is False and m.new is True
    assert read_page(parse(tmp_path / "set.img"), "pc.ram", 2) != bytes(PS)


# -- strictness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 0x10000])
def test_every_standard_mutation_is_rejected_with_its_name(tmp_path: Path, offset: int) -> None:
    snap = _write(tmp_path / "base.img", offset)
    mutations = list(mutate.all_header_mutations(snap))
    assert len({m.name for m in mutations}) == len(mutations)
    assert {m.expected_error for m in mutations} >= {
        "HDR_VERSION", "PAGE_SIZE", "BITMAP_OFFSET", "PAGES_OFFSET", "PAGES_ALIGN", "OVERLAP",
        "BLOCK_LENGTH", "BLOCK_ID", "TOTAL", "TRUNCATED", "MAGIC", "VERSION"}
    wrong = []
    for m in mutations:
        dst = tmp_path / "m.img"
        done = m.apply(dst)
        assert done.name == m.name and done.expected_error == m.expected_error
        with pytest.raises(FormatError) as err:
            parse(dst, offset)
        if err.value.name != m.expected_error:
            wrong.append(f"{m}: expected {m.expected_error}, got {err.value}")
        lenient = parse(dst, offset, lenient=True)
        assert m.expected_error in lenient.problem_names(), m
    assert wrong == []


def test_mutation_descriptions(snap: Snapshot, tmp_path: Path) -> None:
    blk = snap.block("pc.bios")
    m = mutate.set_header_field(snap.path, tmp_path / "x.img", "pc.bios", "page_size", 512)
    assert (m.field, m.offset, m.old, m.new, m.expected_error, m.block) == \
        ("page_size", blk.header.page_size.offset, PS, 512, "PAGE_SIZE", "pc.bios")
    assert str(m) == "pc.bios:page_size=512"
    m = mutate.set_header_field(snap.path, tmp_path / "x.img", "pc.bios", "page_size", PS)
    assert m.expected_error is None and parse(tmp_path / "x.img").ok
    m = mutate.set_block_id(snap.path, tmp_path / "y.img", "pc.bios", "pc.boot")
    assert m.expected_error is None and parse(tmp_path / "y.img").block("pc.boot")
    m = mutate.set_block_id(snap.path, tmp_path / "y.img", "pc.bios", "a-much-longer-id")
    renamed = parse(tmp_path / "y.img")
    assert m.expected_error is None and renamed.block("a-much-longer-id").num_pages == 16
    assert block_digest(renamed, "/rom@etc/acpi/rsdp") == block_digest(snap, "/rom@etc/acpi/rsdp")
    with pytest.raises(KeyError):
        snap.block("nope")


def test_lenient_mode_keeps_what_it_could_parse(snap: Snapshot, tmp_path: Path) -> None:
    mutate.set_header_field(snap.path, tmp_path / "a.img", "pc.ram", "page_size", 0)
    mutate.set_header_field(tmp_path / "a.img", tmp_path / "b.img", "pc.bios", "version", 9)
    broken = parse(tmp_path / "b.img", lenient=True)
    assert broken.problem_names() == ("PAGE_SIZE", "HDR_VERSION")
    assert broken.eof_offset == snap.eof_offset and len(broken.blocks) == 3
    assert not broken.ok
    # a helper still works on the broken file
    m = mutate.set_header_field(tmp_path / "b.img", tmp_path / "c.img", "pc.ram", "page_size",
                                PS)
    assert m.old == 0
    assert parse(tmp_path / "c.img", lenient=True).problem_names() == ("HDR_VERSION",)
    cut = mutate.truncate_at(snap.path, tmp_path / "t.img", "pages", "pc.bios")
    partial = parse(tmp_path / "t.img", lenient=True)
    assert partial.problem_names() == ("TRUNCATED",) and partial.eof_offset is None
    assert [b.name for b in partial.blocks] == ["pc.ram", "pc.bios"] and cut.offset


@pytest.mark.parametrize("field,value", [("used_length", 1 << 62), ("used_length", 2**64 - 4096),
                                         ("bitmap_offset", 2**64 - 1), ("pages_offset", 1 << 63)])
def test_hostile_values_are_bounded(snap: Snapshot, tmp_path: Path, field: str,
                                    value: int) -> None:
    dst = tmp_path / "h.img"
    if field == "used_length":
        mutate.set_block_length(snap.path, dst, "pc.ram", value)
    else:
        mutate.set_header_field(snap.path, dst, "pc.ram", field, value)
    with pytest.raises(FormatError):
        parse(dst)
    assert parse(dst, lenient=True).problems


def test_garbage_and_tiny_files(tmp_path: Path) -> None:
    for data, name in [(b"", "TRUNCATED"), (b"QEV", "TRUNCATED"), (b"\x00" * 64, "MAGIC"),
                       (struct.pack(">II", 0x5145564D, 3) + b"\x04", "CONFIG"),
                       (os.urandom(4096), "MAGIC")]:
        path = tmp_path / "g.img"
        path.write_bytes(data)
        with pytest.raises(FormatError) as err:
            parse(path)
        assert err.value.name == name
        assert parse(path, lenient=True).problem_names() == (name,)


def test_format_error_is_stable() -> None:
    err = FormatError("PAGE_SIZE", "bad", 0x10)
    again = pickle.loads(pickle.dumps(err))
    assert (again.name, again.message, again.offset) == ("PAGE_SIZE", "bad", 0x10)
    assert str(err) == "PAGE_SIZE: bad at 0x10"
    with pytest.raises(ValueError):
        FormatError("NOT_A_NAME", "x")
    assert len(set(ERROR_NAMES)) == len(ERROR_NAMES)
    import pytest_fastsnap.snapshot.format as fmt
    import pytest_fastsnap.snapshot.libvirt as libvirt
    for name in ERROR_NAMES:
        assert name in (fmt.__doc__ or "") + (libvirt.__doc__ or ""), f"{name} not documented"


def test_summary_is_json(snap: Snapshot) -> None:
    import json

    from pytest_fastsnap.snapshot.summary import to_dict
    info = json.loads(json.dumps(to_dict(snap, bitmaps=True, digests=True)))
    assert [b["id"] for b in info["blocks"]] == [n for n, _ in BLOCKS]
    ram = info["blocks"][0]
    assert ram["pages_set"] == 7 and ram["sha256"] == hashlib.sha256(RAM).hexdigest()
    assert ram["bitmap_offset"] == ram["header_offset"] + HEADER_SIZE
    assert info["problems"] == [] and info["eof_offset"] == snap.eof_offset
