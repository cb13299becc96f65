"""fastsnap-loader's parser on hostile-but-well-formed framing (needs --fastsnap).

The mutation suite in test_native_loader.py covers every broken field; this
file covers inputs that break no rule but try to make the parser slow or
expose what it parses (configuration details, regions).
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest

from pytest_fastsnap.fixtures import SnapshotFactory, VmFactory
from pytest_fastsnap.native.loader import run_loader
from pytest_fastsnap.qemu.migration import SavedSnapshot
from pytest_fastsnap.snapshot.sparse import sparse_copy

pytestmark = pytest.mark.fastsnap


@pytest.fixture
def saved(vm_factory: VmFactory, snapshot_factory: SnapshotFactory) -> SavedSnapshot:
    vm = vm_factory(machine="q35", mem="64M")
    vm.wait_status("running", timeout=10)
    snap = snapshot_factory(vm)
    vm.shutdown()
    return snap


def _inspect(path: Path, offset: int = 0) -> dict:
    res = run_loader(["inspect", str(path), "--offset", str(offset), "--json"], timeout=10)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_flood_of_ram_part_records_parses_fast(saved: SavedSnapshot, tmp_path: Path) -> None:
    """Three million legal 18-byte RAM PART records (QEMU writes one per save
    iteration) must not cost one pread per field: verify stays well under the
    10 s budget (it took ~14 s before the parser read ahead)."""
    info = _inspect(saved.path)
    sid = info["ram_section_id"]
    last = info["blocks"][-1]
    after_start = last["pages_offset"] + last["length"] + 13  # EOS + footer
    record = (bytes([2]) + struct.pack(">I", sid) + struct.pack(">Q", 0x10) + b"\x7e"
              + struct.pack(">I", sid))
    with open(saved.path, "rb") as f:
        f.seek(after_start)
        rest = f.read()
    assert rest[:18] == record or rest[:1] == b"\x08"
    dst = tmp_path / "flood.img"
    sparse_copy(saved.path, dst)
    with open(dst, "r+b") as f:
        f.truncate(after_start)
        f.seek(after_start)
        chunk = record * 100_000
        for _ in range(30):
            f.write(chunk)
        f.write(rest)
    t0 = time.monotonic()
    res = run_loader(["verify", str(dst), "--json"], timeout=30)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert elapsed < 5.0, f"verify took {elapsed:.1f} s"
    info2 = _inspect(dst)
    assert info2["device_state"]["start"] == info["device_state"]["start"] + 18 * 3_000_000
    os.unlink(dst)


def test_inspect_exposes_configuration_like_the_python_reader(
        vm_factory: VmFactory, snapshot_factory: SnapshotFactory) -> None:
    """Capabilities, uuid (validate-uuid), configuration and early-setup
    ranges as mr_parse exposes them to the bridge, on a save at offset=."""
    from pytest_fastsnap.snapshot.format import parse

    uuid = "6c4ad1f0-54f3-4a0e-9d0f-3b7b2b8a1c2e"
    vm = vm_factory(machine="q35", mem="64M", extra_args=["-uuid", uuid])
    vm.wait_status("running", timeout=10)
    saved = snapshot_factory(vm, offset=0x3000, capabilities={"validate-uuid": True})
    vm.shutdown()
    info = _inspect(saved.path, saved.offset)
    ref = parse(saved.path, saved.offset)
    cfg = ref.configuration
    assert cfg is not None and ref.early_setup is not None
    assert info["configuration"] == {
        "start": cfg.offset, "end": cfg.end,
        "capabilities": list(cfg.capability_names),
        "target_page_bits": None,
        "uuid": uuid.replace("-", ""),
    }
    assert cfg.uuid is not None and cfg.uuid.value.hex() == uuid.replace("-", "")
    assert "validate-uuid" not in info["configuration"]["capabilities"]  # not a validated cap
    assert "mapped-ram" in info["configuration"]["capabilities"]
    assert info["early_setup"] == {"start": ref.early_setup.start, "end": ref.early_setup.end}
    assert info["configuration"]["start"] == saved.offset + 8


VMDESC_BODIES = [
    (b'{}', None),
    (b'{"a": [1, 2.5e3, -0, 1E+2, true, false, null, NaN, -Infinity, Infinity]} \n', None),
    (b'{"s": "\\u00e9\\n\\"\\\\\\/\\b\\f\\r\\t", "\xc3\xa9": {"x": []}}', None),
    (b'{"deep": ' + b"[" * 200 + b"]" * 200 + b"}", None),
    (b'{', "E_VMDESC"), (b'{"a":}', "E_VMDESC"), (b'{"a":1,}', "E_VMDESC"),
    (b'{"a":01}', "E_VMDESC"), (b'{"a":"\x01"}', "E_VMDESC"), (b'{"a":"\\q"}', "E_VMDESC"),
    (b'{} x', "E_VMDESC"), (b'{"a":"\xff"}', "E_VMDESC"), (b'{"a":"\xed\xa0\x80"}', "E_VMDESC"),
    (b'{"a":"\xc0\xaf"}', "E_VMDESC"), (b'{"a":1.}', "E_VMDESC"), (b'{"a":-}', "E_VMDESC"),
    (b'{"a":"\\u12"}', "E_VMDESC"), (b'{"a" 1}', "E_VMDESC"), (b'{"a":[1 2]}', "E_VMDESC"),
    (b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", "E_VMDESC"),
    (b'{"a":tru}', "E_VMDESC"), (b'{"a":"\xf4\x90\x80\x80"}', "E_VMDESC"),
]


@pytest.mark.parametrize("build", ["release", "asan"])
def test_vm_description_must_be_json_like_the_python_reader(
        saved: SavedSnapshot, tmp_path: Path, build: str) -> None:
    """A VM description with the right length but a body that is not UTF-8
    JSON is E_VMDESC in both readers; valid JSON of every kind passes."""
    from pytest_fastsnap.snapshot.errors import FormatError
    from pytest_fastsnap.snapshot.format import parse

    info = _inspect(saved.path)
    assert info["vmdesc"] is not None
    at = info["vmdesc"]["offset"]
    failures = []
    for body, want in VMDESC_BODIES:
        dst = tmp_path / "v.img"
        dst.unlink(missing_ok=True)
        sparse_copy(saved.path, dst)
        with open(dst, "r+b") as f:
            f.truncate(at)
            f.seek(at)
            f.write(b"\x06" + struct.pack(">I", len(body)) + body)
        res = run_loader(["verify", str(dst), "--json"], variant=build, timeout=10)
        got = json.loads(res.stdout).get("error") if res.returncode == 2 else None
        try:
            parse(dst)
            py = None
        except FormatError as err:
            py = f"E_{err.name}"
        if res.returncode not in (0, 2) or got != want or py != want:
            failures.append(f"{body[:40]!r}: C exit {res.returncode} {got}, Python {py}, "
                            f"want {want}: {res.stderr.strip()[:200]}")
    assert not failures, "\n".join(failures)


def test_error_names_match_between_readers() -> None:
    """The C reader raises exactly the Python reader's names (with E_), plus its
    own E_MAX_LENGTH (--max-length) and E_INTERNAL (I/O).  It raises them as
    mr_errors.h identifiers, never as string literals, so a misspelt name
    does not compile."""
    import re

    from pytest_fastsnap.snapshot.errors import ERROR_NAMES
    src = Path(__file__).parents[1] / "pytest_fastsnap" / "native" / "src"
    c_names: set[str] = set()
    for f in ("mr_format.c", "mr_libvirt.c"):
        code = re.sub(r"/\*.*?\*/", "", (src / f).read_text(), flags=re.S)
        assert not re.findall(r'"E_[A-Z0-9_]+"', code), f"{f} spells an error name as a string"
        c_names |= set(re.findall(r"\bE_([A-Z0-9_]+)\b", code))
    assert c_names - {"MAX_LENGTH", "INTERNAL"} == set(ERROR_NAMES)
