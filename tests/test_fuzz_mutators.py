"""Locations and edits of the QEMU campaign, on a synthetic snapshot (no QEMU needed)."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from pytest_fastsnap.fuzz.locations import find_locations
from pytest_fastsnap.fuzz.mutators import Edit, Mutator, apply_edits, edits_from_json, edits_to_json
from pytest_fastsnap.fuzz.signature import field_signature, frames_signature, generic_target
from pytest_fastsnap.snapshot.format import parse
from pytest_fastsnap.snapshot.writer import device_section, write_snapshot

PS = 4096
# Two device sections the VM description describes field by field; the second
# has a subsection.
TIMER = struct.pack(">IQ", 3, 0x1122334455667788) + bytes(range(16))
DMA = struct.pack(">H", 7) + b"\x05" + bytes([len("dma/sub")]) + b"dma/sub" \
    + struct.pack(">I", 1) + struct.pack(">I", 0xABCD)
VMDESC = {"page_size": PS, "devices": [
    {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 1, "fields": [
        {"name": "num_timers", "type": "uint32", "size": 4},
        {"name": "offset", "type": "int64", "size": 8},
        {"name": "regs", "type": "buffer", "size": 16}]},
    {"name": "dma", "instance_id": 1, "vmsd_name": "dma", "version": 1, "fields": [
        {"name": "idx", "array_len": 2, "type": "uint8", "size": 1}],
     "subsections": [{"vmsd_name": "dma/sub", "version": 1, "fields": [
         {"name": "count", "type": "uint32", "size": 4}]}]}]}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    ram = bytearray(16 * PS)
    ram[0:PS] = b"\x11" * PS
    devices = device_section(2, "timer", TIMER) + device_section(3, "dma", DMA, 1)
    return write_snapshot(tmp_path / "base.img", "pc-q35-10.0",
                          [("pc.ram", bytes(ram)), ("pc.bios", b"\x5a" * (2 * PS))],
                          devices, vmdesc=VMDESC)


def test_locations_cover_headers_block_list_framing_and_vmstate_fields(base: Path) -> None:
    snap = parse(base)
    locs = {loc.name: loc for loc in find_locations(snap)}
    hdr = snap.block("pc.ram").header
    assert locs["pc.ram.header.pages_offset"].offset == hdr.pages_offset.offset
    assert locs["pc.bios.used_length"].offset == snap.block("pc.bios").used_length.offset
    assert locs["ram.mem_size"].offset == snap.ram.mem_size.offset
    # Device fields: offsets from walking the sections with the VM description.
    dev = snap.device_state.start
    timer_fields = dev + 1 + 4 + 1 + len("timer") + 8
    assert locs["dev:timer/0.num_timers"].offset == timer_fields
    assert locs["dev:timer/0.num_timers"].hint == "count"
    assert locs["dev:timer/0.offset"].offset == timer_fields + 4
    assert locs["dev:timer/0.regs"].size == 16 and not locs["dev:timer/0.regs"].numeric
    with open(base, "rb") as f:
        f.seek(locs["dev:dma/1/sub.count"].offset)
        assert f.read(4) == struct.pack(">I", 0xABCD)
        f.seek(locs["dev:dma/1.idx[1]"].offset)
        assert f.read(1) == b"\x07"
    assert locs["dev:dma/1.footer_sid"].end == snap.device_state.end
    assert locs["pc.ram.header.version"].memory_safe
    assert not locs["pc.ram.bitmap"].memory_safe and not locs["dev:timer/0.offset"].memory_safe


def test_edits_apply_by_name_and_keep_the_file_sparse(base: Path, tmp_path: Path) -> None:
    snap = parse(base)
    locs = {loc.name: loc for loc in find_locations(snap)}
    edits = [Edit("pc.ram.header.page_size", "set", 0, (0).to_bytes(8, "big").hex(), "ps=0",
                  True),
             Edit("dev:timer/0.regs", "truncate", 3, "", "cut", True)]
    dst = apply_edits(base, tmp_path / "m.img", edits, locs)
    assert dst.stat().st_size == locs["dev:timer/0.regs"].offset + 3
    mutated = parse(dst, lenient=True)
    assert mutated.block("pc.ram").header.page_size.value == 0
    assert base.stat().st_blocks > 0 and dst.stat().st_blocks <= base.stat().st_blocks + 8
    assert edits_from_json(edits_to_json(edits)) == edits
    with pytest.raises(KeyError, match=r"no\.such"):
        apply_edits(base, tmp_path / "x.img", [Edit("no.such", "set", 0, "00", "", True)], locs)


def test_mutator_is_deterministic_and_reaches_every_group(base: Path) -> None:
    snap = parse(base)
    locs = find_locations(snap)
    mutator = Mutator(base, locs, max_edits=3)
    first = [mutator.draw(random.Random(f"7:{i}")) for i in range(400)]
    again = [mutator.draw(random.Random(f"7:{i}")) for i in range(400)]
    assert first == again
    by_name = {loc.name: loc for loc in locs}
    groups = {by_name[e.target].group if e.kind == "set" else "truncate"
              for edits in first for e in edits}
    assert {"ram_header", "block_list", "mem_size", "bitmap", "framing", "device",
            "truncate"} <= groups
    assert all(1 <= len(edits) <= 3 for edits in first)
    values = {int(e.data, 16) for edits in first for e in edits
              if e.target.endswith("pages_offset") and e.kind == "set"}
    assert {0, (1 << 64) - 1} & values  # boundary values are drawn


def test_signatures_mask_indices_but_keep_block_names() -> None:
    assert generic_target("dev:cpu/0.env.regs[3]") == "dev:cpu/N.env.regs[N]"
    assert generic_target("/rom@etc/acpi/rsdp.id_length") == "/rom@etc/acpi/rsdp.id_length"
    edits = [Edit("pc.ram.header.bitmap_offset", "set", 0, "00", "", True),
             Edit("dev:dma/1.idx[1]", "truncate", 0, "", "", True)]
    assert field_signature("wrong_memory", edits) == \
        "wrong_memory:pc.ram.header.bitmap_offset+truncate@dev:dma/N.idx[N]"


def test_frame_signature_skips_abort_and_error_plumbing() -> None:
    # The SIGABRT backtrace of the fw_cfg finding on QEMU 10.2.2 (debug build).
    frames = ["__pthread_kill_implementation", "__pthread_kill_internal", "__GI_raise",
              "__GI_abort", "error_handle", "error_handle", "error_setv",
              "error_setg_errno_internal", "qemu_ram_resize", "memory_region_ram_resize",
              "fw_cfg_update_mr"]
    assert frames_signature(frames) == \
        "qemu_ram_resize<memory_region_ram_resize<fw_cfg_update_mr"
    assert frames_signature(["??", "??"]) is None
