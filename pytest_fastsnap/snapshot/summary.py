"""A JSON-able summary of a parsed snapshot (for `fastsnap inspect`, reports, and
comparing the Python reader with the native one)."""

from __future__ import annotations

from typing import Any

from pytest_fastsnap.snapshot.bitmap import popcount
from pytest_fastsnap.snapshot.digest import block_digest
from pytest_fastsnap.snapshot.format import Snapshot

__all__ = ["to_dict"]


def to_dict(snapshot: Snapshot, *, bitmaps: bool = False, digests: bool = False
            ) -> dict[str, Any]:
    """Plain dict of every located field; ``bitmaps`` adds set-page counts, ``digests``
    the sha256 of each block's restored content (reads the pages)."""
    config, ram = snapshot.configuration, snapshot.ram
    blocks = []
    for blk in snapshot.blocks:
        hdr = blk.header
        entry: dict[str, Any] = {
            "id": blk.name, "offset": blk.offset, "used_length": blk.used_length.value,
            "used_length_offset": blk.used_length.offset,
            "gpa": blk.gpa.value if blk.gpa else None, "ignored": blk.ignored,
            "header_offset": hdr.offset, "version": hdr.version.value,
            "page_size": hdr.page_size.value, "bitmap_offset": hdr.bitmap_offset.value,
            "pages_offset": hdr.pages_offset.value, "num_pages": blk.num_pages,
            "bitmap_size": blk.bitmap_size, "next_offset": blk.next_offset,
        }
        if bitmaps:
            entry["pages_set"] = popcount(snapshot.bitmap(blk), blk.num_pages)
        if digests:
            entry["sha256"] = block_digest(snapshot, blk)
        blocks.append(entry)
    dev = snapshot.device_state
    return {
        "path": str(snapshot.path), "stream_offset": snapshot.stream_offset,
        "file_size": snapshot.file_size,
        "stream_version": snapshot.header.version.value if snapshot.header else None,
        "machine": snapshot.machine,
        "capabilities": list(config.capability_names) if config else [],
        "uuid": config.uuid.value.hex() if config and config.uuid else None,
        "page_size": snapshot.page_size,
        "early_setup": [snapshot.early_setup.start, snapshot.early_setup.end]
        if snapshot.early_setup else None,
        "ram": {"offset": ram.offset, "section_id": ram.section_id.value, "total": ram.total,
                "mem_size_offset": ram.mem_size.offset} if ram else None,
        "blocks": blocks,
        "records": [{"offset": r.offset, "kind": getattr(r, "kind", "COMMAND")}
                    for r in snapshot.records],
        "switchover_start": snapshot.switchover_start.offset
        if snapshot.switchover_start else None,
        "device_state": [dev.start, dev.end] if dev else None,
        "eof_offset": snapshot.eof_offset,
        "vmdesc": {"offset": snapshot.vmdesc.offset, "length": snapshot.vmdesc.length.value}
        if snapshot.vmdesc else None,
        "problems": [{"name": p.name, "message": p.message, "offset": p.offset}
                     for p in snapshot.problems],
    }
