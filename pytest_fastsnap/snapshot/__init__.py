"""Pure-Python view of mapped-ram snapshot files: reader, bitmaps, digests, mutations, writer.

    from pytest_fastsnap.snapshot import parse, FormatError, block_digest
    snap = parse("vm.mig", offset=0)           # strict; lenient=True records problems
    snap.block("pc.ram").header.pages_offset   # Field(value, offset, size)
"""

from pytest_fastsnap.snapshot.digest import (
    block_bytes,
    block_digest,
    iter_restored,
    read_page,
    restored_memory_range,
)
from pytest_fastsnap.snapshot.errors import ERROR_NAMES, FormatError
from pytest_fastsnap.snapshot.format import Block, Field, Snapshot, parse
from pytest_fastsnap.snapshot.mutate import Mutation, all_header_mutations
from pytest_fastsnap.snapshot.writer import BlockSpec, SnapshotSpec, write_snapshot, write_spec

__all__ = [
    "ERROR_NAMES",
    "Block",
    "BlockSpec",
    "Field",
    "FormatError",
    "Mutation",
    "Snapshot",
    "SnapshotSpec",
    "all_header_mutations",
    "block_bytes",
    "block_digest",
    "iter_restored",
    "parse",
    "read_page",
    "restored_memory_range",
    "write_snapshot",
    "write_spec",
]
