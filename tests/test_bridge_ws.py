"""Working-set prefetch of the bridge (``serve --record-ws`` / ``--ws``) and
what the guest feels (QEMU's postcopy blocktime, the tiny guest's workload).

A real tiny guest is restored by the bridge while it touches 10% of its
pages in its random order; the recorded file lists exactly those pages in
that order, and the next restores send them first (before / after RUN) with
the guest's memory intact.  Corrupt, truncated or foreign working-set files
are refused with one E_WS line (release and ASan+UBSan builds).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from pytest_fastsnap.fixtures import GuestFactory, SnapshotFactory, VmFactory
from pytest_fastsnap.guests.pattern import touch_order
from pytest_fastsnap.guests.tiny import TinyParams
from pytest_fastsnap.native.loader import ASAN_ENV, loader_path
from pytest_fastsnap.qemu.migration import SavedSnapshot
from pytest_fastsnap.restore import restore
from pytest_fastsnap.restore.strategies import RestoreRefused
from pytest_fastsnap.restore.wsfile import WorkingSet, encode_ws, read_ws, write_ws
from pytest_fastsnap.snapshot.format import parse
from pytest_fastsnap.snapshot.writer import write_snapshot

pytestmark = pytest.mark.fastsnap

PERMILLE = 100      # the workload: 10% of the pattern range, random order


@pytest.fixture(params=["release", "asan"])
def loader_variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The loader the restores run: the release build, or ASan+UBSan."""
    if request.param == "asan":
        monkeypatch.setenv("FASTSNAP_LOADER", str(loader_path("asan")))
        for key, value in ASAN_ENV.items():
            monkeypatch.setenv(key, value)
    return str(request.param)


@pytest.fixture
def tiny_snapshot(guest_factory: GuestFactory, snapshot_factory: SnapshotFactory
                  ) -> tuple[SavedSnapshot, TinyParams]:
    guest = guest_factory("tiny", mem="64M", size=40 << 20, zero_ratio=0.1, machine="q35")
    assert guest.params is not None
    return guest.saved(snapshot_factory), guest.params


def test_recorded_working_set_replays_before_and_after_run(
        tiny_snapshot: tuple[SavedSnapshot, TinyParams], vm_factory: VmFactory,
        tmp_path: Path, loader_variant: str) -> None:
    snap, params = tiny_snapshot
    ws_file = tmp_path / "snap.ws"
    touched = [params.first_pfn + i
               for i in touch_order(params.seed, params.pages, PERMILLE, True)]

    # 1. record: the eager stream held back until the workload is done
    guest = restore("loader-bridge", snap.path, snap.device_args, vm_factory,
                    record_ws=ws_file, loader_args=["--eager-delay", "300"])
    try:
        work = guest.agent.touch(PERMILLE, "rand")
        assert work and work.details["pages"] == len(touched), work.reason
        assert guest.loader is not None
        guest.loader.send_signal(signal.SIGUSR1)    # ends --eager-delay
        guest.wait_loaded(timeout=300)
        stats = guest.loader_stats
        assert stats["pages_eager"] > 0 and stats["eager_hold_end_s"] > 0, stats
        blocktime = guest.blocktime()
        assert blocktime is not None and len(blocktime["vcpu_ms"]) == 1, blocktime
        assert blocktime["vcpu_ms"][0] >= 0 and blocktime["total_ms"] >= 0
        assert guest.self_check()
    finally:
        guest.close()
    recorded = read_ws(ws_file)
    assert not list(tmp_path.glob("*.tmp"))
    blocks = parse(snap.path, snap.offset).blocks
    assert recorded.blocks == [(b.id.value, b.used_length.value) for b in blocks]
    assert len(recorded.entries) == stats["ws_recorded"]
    position = {page: i for i, (block, page) in enumerate(recorded.entries)
                if recorded.blocks[block][0] == "pc.ram"}
    missing = [pfn for pfn in touched if pfn not in position]
    assert not missing, f"{len(missing)} touched pages not recorded, e.g. {missing[:5]}"
    order = [position[pfn] for pfn in touched]
    assert order == sorted(order), "pages not recorded in the order the guest touched them"

    # 2. replay, both ways: the guest's memory is intact, the listed pages went first
    for mode in ("before-run", "after-run"):
        guest = restore("loader-bridge", snap.path, snap.device_args, vm_factory,
                        ws=ws_file, ws_mode=mode)
        try:
            work = guest.agent.touch(PERMILLE, "rand")
            assert work, f"{mode}: {work.reason}"
            guest.wait_loaded(timeout=300)
            stats = guest.loader_stats
            assert stats["ws_mode"] == mode and stats["ws_loaded"] == len(recorded.entries)
            assert 0 < stats["pages_ws"] <= len(recorded.entries), stats
            if mode == "before-run":
                # no request can precede LISTEN: every listed page went as listed,
                # so no touched page was ever requested
                assert stats["pages_ws"] == len(recorded.entries), stats
                assert stats["requests"] < len(touched), stats
            assert guest.blocktime() is not None
            assert guest.self_check()
        finally:
            guest.close()


def _valid_ws(snapshot: Path) -> WorkingSet:
    blocks = parse(snapshot).blocks
    return WorkingSet(4096, [(b.id.value, b.used_length.value) for b in blocks],
                      [(0, 3), (0, 1), (1, 0)])


def _serve_describe(snapshot: Path, ws: Path, variant: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(loader_path(variant)), "serve", str(snapshot), "--ws", str(ws),
                           "--describe"], capture_output=True, text=True, timeout=60,
                          check=False,
                          env={**os.environ, **(ASAN_ENV if variant == "asan" else {})})


BAD_FILES = {
    "flipped byte": (lambda ws: _flip(encode_ws(ws), 30), "does not match the contents"),
    "truncated": (lambda ws: encode_ws(ws)[:-5], "truncated or trailing bytes"),
    "trailing bytes": (lambda ws: encode_ws(ws) + b"\0" * 12, "truncated or trailing bytes"),
    "empty": (lambda ws: b"", "shorter than"),
    "bad magic": (lambda ws: b"FSNAPWS2" + encode_ws(ws)[8:], "not a working-set file"),
    "page past the block": (lambda ws: encode_ws(WorkingSet(
        ws.page_size, ws.blocks, [(0, ws.blocks[0][1] // 4096)])), "names page"),
    "no such block": (lambda ws: encode_ws(WorkingSet(
        ws.page_size, ws.blocks, [(len(ws.blocks), 0)])), "names block"),
    "repeated page": (lambda ws: encode_ws(WorkingSet(
        ws.page_size, ws.blocks, [(0, 1), (0, 2), (0, 1)])), "repeats page"),
    "another snapshot": (lambda ws: encode_ws(WorkingSet(
        ws.page_size, [(ws.blocks[0][0], ws.blocks[0][1] * 2), *ws.blocks[1:]],
        ws.entries)), "recorded on another snapshot"),
    "other page size": (lambda ws: encode_ws(WorkingSet(
        8192, ws.blocks, ws.entries)), "target page size 8192"),
    "more entries than pages": (lambda ws: _count(encode_ws(ws), 1 << 40),
                                "more than the snapshot's"),
}


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1:]


def _count(data: bytes, n: int) -> bytes:
    return data[:16] + n.to_bytes(8, "little") + data[24:]


@pytest.mark.parametrize("variant", ["release", "asan"])
def test_corrupt_working_set_is_refused_with_one_line(tmp_path: Path, variant: str) -> None:
    """Every damaged file: exit 2, one stderr line naming E_WS and the problem;
    the intact file is accepted and reads back the same in Python."""
    snap = write_snapshot(tmp_path / "s.img", "pc-q35-10.0",
                          [("pc.ram", bytes(64 * 4096)), ("pc.bios", bytes(4 * 4096))])
    ws = _valid_ws(snap)
    good = tmp_path / "good.ws"
    write_ws(good, ws)
    assert read_ws(good) == ws
    res = _serve_describe(snap, good, variant)
    assert res.returncode == 0, res.stderr
    for name, (make, phrase) in BAD_FILES.items():
        bad = tmp_path / "bad.ws"
        bad.write_bytes(make(ws))
        res = _serve_describe(snap, bad, variant)
        lines = res.stderr.splitlines()
        assert res.returncode == 2, (name, res.returncode, res.stderr)
        assert len(lines) == 1 and lines[0].startswith("fastsnap-loader serve: E_WS: "), \
            (name, res.stderr)
        assert phrase in lines[0], (name, lines[0])


def test_restore_refuses_a_corrupt_working_set_before_starting_qemu(
        tiny_snapshot: tuple[SavedSnapshot, TinyParams], vm_factory: VmFactory,
        tmp_path: Path) -> None:
    snap, _ = tiny_snapshot
    bad = tmp_path / "bad.ws"
    bad.write_bytes(_flip(encode_ws(_valid_ws(snap.path)), 40))
    before = len(vm_factory.machines)
    with pytest.raises(RestoreRefused) as err:
        restore("loader-bridge", snap.path, snap.device_args, vm_factory, ws=bad)
    assert err.value.error_name == "E_WS" and "does not match" in str(err.value)
    assert len(vm_factory.machines) == before, "a destination was started"
