"""The native loader as a postcopy source (`fastsnap-loader serve`) feeding a
stock QEMU destination: exact memory, the guest running before RAM is all
in, pages served on demand, and clean failure when the loader dies, the
file is cut short or the destination dies mid-restore."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_fastsnap.fixtures import SnapshotFactory, VmFactory
from pytest_fastsnap.guests.fill import fill_guest_ram
from pytest_fastsnap.qemu import process
from pytest_fastsnap.qemu.migration import SavedSnapshot
from pytest_fastsnap.restore import RestoredGuest, RestoreFailed, restore
from pytest_fastsnap.restore.strategies import loader_binary
from pytest_fastsnap.snapshot.format import parse

MiB = 1 << 20
CHUNK = 16 * MiB


@dataclass
class FilledSnapshot:
    snap: SavedSnapshot
    mem: int
    data: list[tuple[int, int]]     # filled (gpa, length): the firmware never touches them
    want: dict[str, str]            # digests of all RAM below 4 GiB before the save
    want_data: dict[str, str]       # digests of the data ranges
    registers: str


def make_snapshot(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                  mem_mib: int) -> FilledSnapshot:
    mem = mem_mib * MiB
    src = vm_factory(name="src", mem=f"{mem_mib}M")
    src.wait_status("running")
    time.sleep(0.2)     # let the firmware reach its idle loop
    data = fill_guest_ram(src, "q35", mem)
    snap = snapshot_factory(src)
    want = src.memory_digests([(0, mem)])
    want_data = src.memory_digests(data)
    regs = src.registers()
    src.shutdown()
    return FilledSnapshot(snap, mem, data, want, want_data, regs)


@pytest.fixture
def guests() -> Iterator[list[RestoredGuest]]:
    """Restored guests of a test; every loader and QEMU is killed at the end and
    checked gone."""
    made: list[RestoredGuest] = []
    yield made
    pids = []
    sock_dirs = [g.sock_dir for g in made if g.sock_dir is not None]
    for g in made:
        if g.loader is not None:
            pids.append(g.loader.pid)
        if g.vm.pid is not None:
            pids.append(g.vm.pid)
        g.close(kill=True)
    for g in made:
        assert g.vm.exitcode is not None
        assert g.loader is None or g.loader.poll() is not None
    time.sleep(0.05)
    left = [p for p in pids if process.running(p)]
    assert not left, f"processes left behind: {left}"
    assert not [d for d in sock_dirs if d.exists()], "socket directories left behind"


def bridge(fs: FilledSnapshot, vm_factory: VmFactory, guests: list[RestoredGuest], *,
           paused: bool = False, loader_args: tuple[str, ...] = (),
           recover_attempts: int = 3) -> RestoredGuest:
    g = restore("loader-bridge", fs.snap.path, fs.snap.device_args, vm_factory,
                offset=fs.snap.offset, paused=paused, loader_args=loader_args,
                recover_attempts=recover_attempts)
    guests.append(g)
    return g


def wait_migration_state(g: RestoredGuest, states: set[str], timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        if not g.vm.is_running():
            return "exited"
        status = g.vm.qmp("query-migrate", timeout=5).get("status", "")
        if status in states:
            return status
        time.sleep(0.05)
    raise AssertionError(f"destination migration status {status!r}, wanted {states}")


@pytest.mark.parametrize("zero_pages, transport", [("requested", "unix"), ("all", "unix"),
                                                  ("requested", "fd")])
def test_memory_identical(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                          guests: list[RestoredGuest], zero_pages: str, transport: str) -> None:
    """Restored paused (-S), every byte of RAM and every register equals the
    source before the save (zero pages on request or all sent; the loader
    connecting itself or handed a connected fd)."""
    fs = make_snapshot(vm_factory, snapshot_factory, 128)
    g = restore("loader-bridge", fs.snap.path, fs.snap.device_args, vm_factory,
                offset=fs.snap.offset, paused=True, loader_args=("--zero-pages", zero_pages),
                transport=transport)
    guests.append(g)
    g.wait_loaded()
    stats = g.loader_stats
    assert stats["ok"] and stats["shut"] == 0
    assert stats["double_sends"] == 0
    assert stats["pages_data"] == stats["file_pages_set"]
    if zero_pages == "all":
        assert stats["pages_data"] + stats["pages_zero"] == stats["ram_bytes"] // 4096
    assert g.vm.memory_digests([(0, fs.mem)]) == fs.want
    assert g.vm.registers() == fs.registers
    assert g.vm.status() == "paused"
    g.vm.qmp("cont")
    g.vm.wait_status("running")


def test_running_before_loaded(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                               guests: list[RestoredGuest]) -> None:
    """The guest runs as soon as the device state is in; the last page leaves
    the loader later.  Data ranges are exact after the load."""
    fs = make_snapshot(vm_factory, snapshot_factory, 256)
    g = bridge(fs, vm_factory, guests)
    assert g.time_to_running is not None
    assert g.vm.status() == "running"
    g.wait_loaded()
    all_sent = g.loader_all_sent
    assert all_sent is not None
    assert g.time_to_running < all_sent, (g.time_to_running, all_sent)
    assert g.time_to_loaded is not None and g.time_to_running < g.time_to_loaded
    assert g.vm.memory_digests(fs.data) == fs.want_data
    assert g.vm.status() == "running"


def test_requests_served_first(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                               guests: list[RestoredGuest]) -> None:
    """With the eager stream throttled to 16 MiB/s (8 s for 128 MiB), reading
    the top of RAM is served on demand: the loader counts those pages as
    requested, not as sent by the eager stream (no wall-clock bound: it failed
    at 3.12 s against 3.0 s on a loaded 2-core machine)."""
    fs = make_snapshot(vm_factory, snapshot_factory, 128)
    g = bridge(fs, vm_factory, guests, loader_args=("--max-bandwidth", "16"))
    gpa, length = fs.data[-1]
    top = (gpa + length - 4 * MiB, 4 * MiB)
    assert g.vm.memory_digests([top]) == digests_from(fs, top)
    g.wait_loaded()
    stats = g.loader_stats
    assert stats["pages_on_request"] >= 1024 - 8, stats
    assert stats["double_sends"] == 0
    assert stats["requests_served"] >= 1
    assert stats["latency_us"]["count"] == stats["requests_served"]
    assert stats["pages_on_request"] + stats["pages_eager"] >= stats["file_pages_set"]
    assert g.vm.memory_digests(fs.data) == fs.want_data


def digests_from(fs: FilledSnapshot, rng: tuple[int, int]) -> dict[str, str]:
    """Digest of *rng* computed from the snapshot file itself (pc.ram pages)."""
    from pytest_fastsnap.guests.fill import lowmem_size

    gpa, n = rng
    low = lowmem_size("q35", fs.mem)
    off = gpa if gpa < 4 << 30 else gpa - (4 << 30) + low
    info = _block_info(fs.snap.path, "pc.ram")
    with open(fs.snap.path, "rb") as f:
        f.seek(info + off)
        return {f"{gpa:#x}+{n:#x}": hashlib.sha256(f.read(n)).hexdigest()}


def _block_info(path: Path, block: str) -> int:
    """pages_offset of *block*, from the Python reader."""
    return parse(path).block(block).pages_range.start


def test_loader_killed_mid_restore(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                                   guests: list[RestoredGuest]) -> None:
    """With recovery off (recover_attempts=0; tests/test_bridge_recovery.py has
    it on), SIGKILL the loader while pages are still streaming: the
    destination pauses postcopy (or fails), says why, and everything is
    cleaned up."""
    fs = make_snapshot(vm_factory, snapshot_factory, 128)
    g = bridge(fs, vm_factory, guests, loader_args=("--max-bandwidth", "16"),
               recover_attempts=0)
    time.sleep(0.3)
    assert g.loader is not None and g.loader.poll() is None, "loader finished too early"
    g.kill_loader()
    status = wait_migration_state(g, {"postcopy-paused", "failed"})
    assert status in ("postcopy-paused", "failed")
    with pytest.raises(RestoreFailed, match=r"loader exited with -9.*destination migration "
                       r"status '(postcopy-paused|failed)'") as err:
        g.wait_loaded(timeout=5)
    if status == "postcopy-paused":
        assert "Migration paused" in str(err.value)     # QEMU's own words, from its log


def test_file_truncated_mid_restore(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                                    guests: list[RestoredGuest]) -> None:
    """Cut the snapshot file short while the eager stream is in the middle of
    pc.ram: the loader stops with a clear error and a non-zero exit, the
    destination is left paused/failed, and cleanup leaves nothing behind
    (recovery off: a resumed loader would refuse the cut file, exit 2)."""
    fs = make_snapshot(vm_factory, snapshot_factory, 128)
    g = bridge(fs, vm_factory, guests, loader_args=("--max-bandwidth", "16"),
               recover_attempts=0)
    pages_offset = _block_info(fs.snap.path, "pc.ram")
    os.truncate(fs.snap.path, pages_offset + fs.mem // 2)
    assert g.loader is not None
    rc = g.loader.wait(30)
    assert rc == 1
    with pytest.raises(RestoreFailed, match="snapshot file is short"):
        g.wait_loaded(timeout=5)
    assert g.loader_stats["error_name"] == "E_FILE_SHORT"
    status = wait_migration_state(g, {"postcopy-paused", "failed"})
    assert status in ("postcopy-paused", "failed")


def test_destination_dies_mid_restore(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                                      guests: list[RestoredGuest]) -> None:
    """SIGKILL the destination mid-stream: the loader notices at once and
    exits 1 naming the cause; it never hangs."""
    fs = make_snapshot(vm_factory, snapshot_factory, 128)
    g = bridge(fs, vm_factory, guests, loader_args=("--max-bandwidth", "16"))
    g.vm.kill()
    assert g.loader is not None
    t = time.monotonic()
    rc = g.loader.wait(10)
    assert rc == 1
    assert time.monotonic() - t < 5
    g._read_loader_stats()
    assert g.loader_stats["error_name"] == "E_DEST_GONE", g.loader_stats


def test_invalid_snapshot_refused(tmp_path: Path) -> None:
    """A file that is not a mapped-ram snapshot: exit 2 and a named error,
    before any connection is made."""
    bad = tmp_path / "bad.img"
    bad.write_bytes(b"QEVM\0\0\0\x03\x07" + b"\0" * 64)
    proc = subprocess.run([str(loader_binary()), "serve", str(bad), "--to",
                           f"unix:{tmp_path}/none.sock", "--json", "--connect-timeout", "0.1"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    name = json.loads(proc.stdout)["error_name"]
    assert name and name.startswith("E_"), name     # the strict parser's stable name
    assert f"fastsnap-loader serve: {name}: {bad}" in proc.stderr


def test_idle_guest_zero_pages_on_request(vm_factory: VmFactory,
                                          snapshot_factory: SnapshotFactory,
                                          guests: list[RestoredGuest]) -> None:
    """A mostly-zero guest: the eager stream is over in a few ms, long before
    the destination has loaded the device state.  EOF must wait for that
    (PONG of the PING before RUN), or a device faulting on a zero page after
    EOF deadlocks the destination.  Regression: this hung until SHUT timeout."""
    src = vm_factory(name="src", mem="1G")
    src.wait_status("running")
    snap = snapshot_factory(src)
    want = src.memory_digests([(0, 2 * MiB)])
    src.shutdown()
    for paused in (False, True, False, True):
        g = bridge_snap(snap, vm_factory, guests, paused=paused,
                        loader_args=("--shut-timeout", "5"))
        g.wait_loaded(timeout=20)
        assert g.loader_stats["pages_zero"] <= g.loader_stats["pages_on_request"]
        assert g.loader_stats["time_device_state_loaded_s"] <= g.loader_stats["time_to_all_sent_s"]
        if paused:  # a running guest's BIOS timer tick moves on
            assert g.vm.memory_digests([(0, 2 * MiB)]) == want
        g.close(kill=True)


def bridge_snap(snap: SavedSnapshot, vm_factory: VmFactory, guests: list[RestoredGuest], *,
                paused: bool = False, loader_args: tuple[str, ...] = ()) -> RestoredGuest:
    g = restore("loader-bridge", snap.path, snap.device_args, vm_factory, offset=snap.offset,
                paused=paused, loader_args=loader_args)
    guests.append(g)
    return g


@pytest.mark.parametrize("offset", [0, 0x10000])
def test_describe_matches_python_reader(vm_factory: VmFactory,
                                        snapshot_factory: SnapshotFactory, offset: int) -> None:
    """The bridge's own framing parse and the Python reader agree on every
    range the bridge serves: device state, early setup, blocks, bitmaps."""
    src = vm_factory(name="src", mem="64M")
    src.wait_status("running")
    snap = snapshot_factory(src, offset=offset)
    src.shutdown()
    proc = subprocess.run([str(loader_binary()), "serve", str(snap.path), "--offset",
                           str(offset), "--describe"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    ref = parse(snap.path, offset)
    assert ref.ok, ref.problems
    assert ref.device_state is not None and ref.early_setup is not None
    assert got["machine"] == ref.machine
    assert got["ram_section_id"] == ref.ram_section_id
    assert got["device_state"] == [ref.device_state.start, ref.device_state.end]
    assert got["eof_offset"] == ref.eof_offset
    assert got["early_setup"] == [ref.early_setup.start, ref.early_setup.end]
    assert [b["id"] for b in got["blocks"]] == [b.name for b in ref.blocks]
    for mine, theirs in zip(got["blocks"], ref.blocks, strict=True):
        assert mine["length"] == theirs.used_length.value
        assert mine["pages_offset"] == theirs.pages_range.start
        assert mine["bitmap_offset"] == theirs.bitmap_range.start
        bits = int.from_bytes(theirs.read_bitmap(snap.path), "little")
        assert mine["pages_set"] == (bits & ((1 << theirs.num_pages) - 1)).bit_count()


def test_uuid_configuration_is_replayed(vm_factory: VmFactory,
                                        snapshot_factory: SnapshotFactory,
                                        guests: list[RestoredGuest]) -> None:
    """A snapshot saved with validate-uuid carries a configuration/uuid
    subsection; the bridge replays it verbatim (the destination checks it
    against its own -uuid) and drops only the capabilities subsection."""
    uuid = "6a1f2e3d-4c5b-4a69-8877-665544332211"
    src = vm_factory(name="src", mem="64M", extra_args=["-uuid", uuid])
    src.wait_status("running")
    snap = snapshot_factory(src, capabilities={"validate-uuid": True})
    assert parse(snap.path).configuration.uuid is not None
    g = restore("loader-bridge", snap.path, snap.device_args, vm_factory, paused=True)
    guests.append(g)
    g.wait_loaded()
    assert g.loader_stats["ok"] and g.loader_stats["shut"] == 0
    assert g.vm.status() == "paused"
    # A destination with another UUID must refuse the replayed subsection.
    other = [*snap.device_args[:-2], "-uuid", "00000000-0000-4000-8000-000000000001"]
    assert snap.device_args[-2] == "-uuid"
    bad = restore("loader-bridge", snap.path, other, vm_factory, paused=True, wait=False)
    guests.append(bad)
    with pytest.raises(RestoreFailed):
        bad.wait_running(timeout=30)
