"""libvirt save images in both readers (needs --fastsnap): a real mapped-ram
stream QEMU wrote behind a synthetic libvirt header, found without --offset,
and every generated header mutation refused with the same named error by the
Python reader and by fastsnap-loader (release and ASan builds)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pytest_fastsnap.fixtures import SnapshotFactory, VmFactory
from pytest_fastsnap.native.loader import run_loader
from pytest_fastsnap.qemu.migration import SavedSnapshot
from pytest_fastsnap.snapshot.errors import FormatError
from pytest_fastsnap.snapshot.format import parse
from pytest_fastsnap.snapshot.libvirt import HEADER_SIZE, build_header, read_header
from pytest_fastsnap.snapshot.libvirt_mutate import libvirt_header_mutations

pytestmark = pytest.mark.fastsnap

DOMAIN = "fastsnap-lv1"
XML = (f"<domain type='qemu'>\n  <name>{DOMAIN}</name>\n  <memory unit='KiB'>65536</memory>\n"
       "  <os><type arch='x86_64' machine='pc-q35-10.0'>hvm</type></os>\n</domain>\n").encode()
COOKIE = b"<cookie>\n  <cpu mode='custom'/>\n</cookie>\n"
STREAM_OFFSET = 0x10683  # unaligned, like the 67,207-byte header libvirt wrote here


@pytest.fixture
def image(vm_factory: VmFactory, snapshot_factory: SnapshotFactory) -> SavedSnapshot:
    vm = vm_factory(machine="q35", mem="64M")
    vm.wait_status("running", timeout=10)
    header = build_header(XML, stream_offset=STREAM_OFFSET, cookie=COOKIE, was_running=1)
    saved = snapshot_factory(vm, offset=STREAM_OFFSET, prefix_bytes=header)
    vm.shutdown()
    return saved


def _loader_json(*args: str, variant: str = "release") -> tuple[int, dict, str]:
    res = run_loader([*args, "--json"], variant=variant, timeout=20)
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else {}, res.stderr


def test_inspect_finds_the_stream_without_offset(image: SavedSnapshot) -> None:
    path = str(image.path)
    rc, info, err = _loader_json("inspect", path)
    assert rc == 0, err
    assert info["libvirt"] == {
        "domain": DOMAIN, "version": 2, "format": "sparse", "format_id": 6,
        "was_running": True, "data_len": STREAM_OFFSET - HEADER_SIZE,
        "cookie_offset": len(XML) + 1, "xml_length": len(XML), "stream_offset": STREAM_OFFSET}
    assert info["stream_offset"] == STREAM_OFFSET
    rc, explicit, err = _loader_json("inspect", path, "--offset", str(STREAM_OFFSET))
    assert rc == 0, err
    assert explicit["libvirt"] is None
    assert info["blocks"] == explicit["blocks"] and len(info["blocks"]) >= 1
    text = run_loader(["inspect", path], timeout=20)
    assert text.returncode == 0, text.stderr
    first, second = text.stdout.splitlines()[:2]
    assert first == (f"libvirt save image: domain {DOMAIN}, format sparse, was_running 1, "
                     f"domain XML {len(XML)} bytes, QEMU stream at {STREAM_OFFSET:#x} "
                     f"({STREAM_OFFSET})")
    assert second.startswith("machine pc-q35-") and "stream at 0x10683" in second
    assert "pc.ram" in text.stdout
    verify = run_loader(["verify", path], timeout=20)
    assert verify.returncode == 0 and "in a libvirt save image" in verify.stdout, verify.stderr
    # The Python reader agrees.
    snap = parse(path)
    assert snap.ok and snap.stream_offset == STREAM_OFFSET and snap.libvirt is not None
    assert (snap.libvirt.domain_name, snap.libvirt.format_name) == (DOMAIN, "sparse")
    assert [b.name for b in snap.blocks] == [b["id"] for b in info["blocks"]]
    assert [b.header.pages_offset.value for b in snap.blocks] == \
        [b["pages_offset"] for b in info["blocks"]]
    # An explicit offset 0 means "the QEMU stream is at 0": libvirt's magic is no QEVM.
    with pytest.raises(FormatError) as bad:
        parse(path, 0)
    assert bad.value.name == "MAGIC"
    rc, out, _ = _loader_json("verify", path, "--offset", "0")
    assert (rc, out["error"]) == (2, "E_MAGIC")


def _c_error(path: Path, variant: str) -> str | None:
    try:
        res = run_loader(["verify", str(path), "--json"], variant=variant, timeout=10)
    except subprocess.TimeoutExpired:
        return "TIMEOUT"
    assert res.returncode in (0, 2), f"exit {res.returncode}: {res.stderr}"
    out = json.loads(res.stdout)
    assert res.returncode == (0 if out["valid"] else 2)
    if not out["valid"]:
        # One line on stderr naming the error.
        assert res.stderr.strip().splitlines() == [f"fastsnap-loader: {out['error']}: "
                                                   f"{out['message']}"]
    return None if out["valid"] else out["error"].removeprefix("E_")


def _py_error(path: Path) -> str | None:
    try:
        parse(path)
    except FormatError as err:
        return err.name
    return None


def test_every_header_mutation_refused_by_both_readers(image: SavedSnapshot,
                                                        tmp_path: Path) -> None:
    with open(image.path, "rb") as f:
        hdr = read_header(f.fileno())
    mutations = list(libvirt_header_mutations(image.path, hdr))
    assert len(mutations) >= 35
    wrong = []
    for mut in mutations:
        dst = mut.apply(tmp_path / "m.img")
        got = {"python": _py_error(dst), "c": _c_error(dst, "release"),
               "c-asan": _c_error(dst, "asan")}
        if set(got.values()) != {mut.expected_error}:
            wrong.append(f"{mut}: want {mut.expected_error}, got {got}")
        dst.unlink()
    assert not wrong, "\n".join(wrong)
    names = {m.expected_error for m in mutations}
    assert {"LIBVIRT_PARTIAL", "LIBVIRT_HEADER", "LIBVIRT_VERSION", "LIBVIRT_DATA_LEN",
            "LIBVIRT_FORMAT", "LIBVIRT_COOKIE", "LIBVIRT_XML", "LIBVIRT_NOT_SPARSE",
            None} <= names


def test_not_sparse_is_named_not_corrupt(image: SavedSnapshot, tmp_path: Path) -> None:
    """A raw/compressed libvirt image is reported as what it is, on one line."""
    data = image.path.read_bytes()[:STREAM_OFFSET]
    for fmt, name in ((0, "raw"), (5, "zstd")):
        path = tmp_path / f"{name}.img"
        path.write_bytes(build_header(XML, stream_offset=STREAM_OFFSET, fmt=fmt)
                         + b"\x00" * 64 + data[:16])
        res = run_loader(["inspect", str(path)], timeout=10)
        assert res.returncode == 2
        assert res.stderr == (f"fastsnap-loader: E_LIBVIRT_NOT_SPARSE: libvirt save image in "
                              f"format {name}, not mapped-ram (only --image-format sparse "
                              "writes mapped-ram)\n")
        with pytest.raises(FormatError) as err:
            parse(path)
        assert err.value.name == "LIBVIRT_NOT_SPARSE" and f"format {name}," in err.value.message
