"""The C and Python readers agree, on the commands QEMU's loader allows before RAM END."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import pytest

from pytest_fastsnap.fuzz.differential import compare_readers
from pytest_fastsnap.snapshot.writer import (
    PART,
    SWITCHOVER_START,
    BlockSpec,
    SnapshotSpec,
    write_spec,
)

PS = 4096
MIG_CMD_PING = 0x02


def _write(path: Path, records: tuple[str | tuple[int, bytes], ...]) -> Path:
    spec = SnapshotSpec("pc-q35-10.0", [BlockSpec("pc.ram", 8 * PS, {0: b"\x11" * PS})],
                        records=records)
    write_spec(path, spec)
    return path


@pytest.mark.parametrize("records, verdict", [
    ((PART, SWITCHOVER_START), None),
    ((PART,), None),
    ((PART, (MIG_CMD_PING, b"\0\0\0\1")), "E_RECORD"),  # needs a return path
    ((SWITCHOVER_START, (0x0B, b"\0")), "E_RECORD"),  # SWITCHOVER_START has no payload
    (((0x0C, b""),), "E_RECORD"),  # past MIG_CMD_MAX
])
def test_readers_agree_on_commands_before_ram_end(
        tmp_path: Path, records: tuple[str | tuple[int, bytes], ...],
        verdict: str | None) -> None:
    got = compare_readers(_write(tmp_path / "cmd.img", records))
    assert got.agree, str(got)
    assert got.python == verdict, str(got)


# Found by the libFuzzer differential run in CI (tests/test_native_loader.py::
# test_fuzz_parser): a configuration subsection named "configuration/capabilities"
# followed by a NUL and junk. C strcmp()ed the name (as QEMU does) and read on
# into a truncated capability list; Python compared all 40 bytes and refused
# an unknown subsection.
LIBFUZZER_FINDINGS = {
    "2fe89ed1": "eNoLdA3zZWBgYGYHEtwFybqFxqa6hgZ6Bqwayfl5aZnppUWJJZn5efrJiQWJSZk5mSWZqcVApYw"
                "gzJWbWFCQGohmQv8lqAnv3r5lAIP/+AADBgAAA4Y1cQ==",
    "997e4f78": "eNoLdA3zZWBgYGYHEtwFybqFxqa6hgZ6Bqwayfl5aZnppUWJJZn5efrJiQWJSZk5mSWZqcVApYw"
                "gzJWbWFCQGohmQv8lqAnv3r5lAIH/uIGQkBBIBQsDFAhATGZgQNCEwX9KAF6TASFucII=",
}


@pytest.mark.parametrize("name", sorted(LIBFUZZER_FINDINGS))
def test_readers_agree_on_libfuzzer_findings(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(zlib.decompress(base64.b64decode(LIBFUZZER_FINDINGS[name])))
    got = compare_readers(path)
    assert got.agree, str(got)
    assert got.python == "E_TRUNCATED", str(got)


def _spec_with(capabilities: tuple[str, ...], machine: str = "pc-q35-10.0") -> SnapshotSpec:
    return SnapshotSpec(machine, [BlockSpec("pc.ram", 8 * PS, {0: b"\x11" * PS})],
                        capabilities=capabilities)


@pytest.mark.parametrize("capabilities, verdict", [
    (("mapped-ram\0junk",), None),  # strcmp sees "mapped-ram"
    (("mapped-ra\0m",), "E_CONFIG"),  # strcmp sees "mapped-ra": mapped-ram is missing
    (("\0mapped-ram",), "E_CONFIG"),
])
def test_capability_names_end_at_their_first_nul(
        tmp_path: Path, capabilities: tuple[str, ...], verdict: str | None) -> None:
    path = write_spec(tmp_path / "caps.img", _spec_with(capabilities))
    got = compare_readers(path)
    assert got.agree, str(got)
    assert got.python == verdict, str(got)


@pytest.mark.parametrize("tail, verdict", [
    (b"\0junk", None),  # QEMU's strcmp() matches configuration/capabilities
    (b"Xjunk", "E_CONFIG"),  # an unknown subsection
])
def test_subsection_names_end_at_their_first_nul(tmp_path: Path, tail: bytes,
                                                 verdict: str | None) -> None:
    # Room for the longer name is taken from the machine name, so nothing after
    # the configuration record moves.
    padded = "pc-q35-10.0" + "x" * len(tail)
    path = write_spec(tmp_path / "sub.img", _spec_with(("mapped-ram",), padded))
    data = bytearray(path.read_bytes())
    name = b"configuration/capabilities"
    old = struct.pack(">I", 11 + len(tail)) + b"pc-q35-10.0" + b"x" * len(tail) \
        + b"\x05" + bytes([len(name)]) + name
    new = struct.pack(">I", 11) + b"pc-q35-10.0" + b"\x05" + bytes([len(name) + len(tail)]) \
        + name + tail
    at = data.index(old)
    data[at:at + len(old)] = new
    path.write_bytes(bytes(data))
    got = compare_readers(path)
    assert got.agree, str(got)
    assert got.python == verdict, str(got)


def test_reader_verdicts_are_falsy_when_the_readers_disagree() -> None:
    from pytest_fastsnap.fuzz.differential import ReaderVerdicts
    assert not ReaderVerdicts("E_TRUNCATED", "E_CONFIG", 2)
    assert not ReaderVerdicts("E_CONFIG", "E_CONFIG", -11)  # a crash never agrees
    assert ReaderVerdicts("E_CONFIG", "E_CONFIG", 2)
    assert ReaderVerdicts(None, None, 0)
