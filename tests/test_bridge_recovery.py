"""Recovery of a ``loader-bridge`` restore whose loader is SIGKILLed.

Real QEMU, real tiny guests, real userfaultfd.  The loader is killed at
seeded random points of many restores (while the package is sent, during
the eager stream, with page requests outstanding from a guest checking its
memory); every guest must come back with exactly the source's memory and
its own self-check passing.  A guest that cannot be recovered ends with one
clear error and nothing left behind.  Seed: ``FASTSNAP_RECOVERY_SEED``
(printed; random by default).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_fastsnap.config import mem_bytes
from pytest_fastsnap.fixtures import GuestFactory, SnapshotFactory, VmFactory
from pytest_fastsnap.guests.tiny import TinyGuest
from pytest_fastsnap.qemu import process
from pytest_fastsnap.qemu.migration import SavedSnapshot
from pytest_fastsnap.restore import RestoredGuest, RestoreNotRecovered, restore
from pytest_fastsnap.verdict import Verdict

KILLS = int(os.environ.get("FASTSNAP_RECOVERY_KILLS", "20"))
PREEMPT_KILLS = int(os.environ.get("FASTSNAP_RECOVERY_PREEMPT_KILLS", "10"))
PHASES = ("package", "eager", "requests")
BANDWIDTH = "8"     # MiB/s: the eager stream of ~18 MiB of data takes ~2 s


@dataclass
class TinySnapshot:
    snap: SavedSnapshot
    mem: int
    want: dict[str, str]            # digest of all guest RAM as saved


def tiny_snapshot(guest_factory: GuestFactory, snapshot_factory: SnapshotFactory,
                  size: int = 24 << 20) -> TinySnapshot:
    src = guest_factory("tiny", size=size)
    assert src.params is not None
    mem = mem_bytes(src.params.min_mem())
    snap = snapshot_factory(src.vm)    # the source stays stopped: RAM is as saved
    want = src.vm.memory_digests([(0, mem)])
    src.vm.shutdown()
    return TinySnapshot(snap, mem, want)


def assert_nothing_left(g: RestoredGuest, pids: list[int], sock_dirs: list[Path]) -> None:
    """The guest's QEMUs, loaders and socket directories are all gone."""
    time.sleep(0.05)
    left = [p for p in pids if process.running(p)]
    assert not left, f"processes left behind: {left}"
    assert not [d for d in sock_dirs if d.exists()], f"socket directories left: {sock_dirs}"
    assert not [p for p in process.live() if p.pid in pids]


class Tracked:
    """Every pid and socket directory a restored guest ever had (recovery
    replaces its loader, and a restart its QEMU and directory)."""

    def __init__(self, g: RestoredGuest) -> None:
        self.g = g
        self.pids: set[int] = set()
        self.dirs: set[Path] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _note(self) -> None:
        g = self.g
        if g.loader is not None:
            self.pids.add(g.loader.pid)
        if g.vm.pid is not None:
            self.pids.add(g.vm.pid)
        if g.sock_dir is not None:
            self.dirs.add(g.sock_dir)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._note()
            self._stop.wait(0.002)

    def close(self) -> None:
        self._note()
        self._stop.set()
        self._thread.join()
        self.g.close(kill=True)
        assert_nothing_left(self.g, sorted(self.pids), sorted(self.dirs))


@pytest.fixture
def tracked() -> Iterator[list[Tracked]]:
    made: list[Tracked] = []
    yield made
    for t in made:
        t.close()


def bridge(ts: TinySnapshot, vm_factory: VmFactory, tracked: list[Tracked], *,
           paused: bool, attempts: int = 3, bandwidth: str = BANDWIDTH,
           preempt: bool = False) -> RestoredGuest:
    g = restore("loader-bridge", ts.snap.path, ts.snap.device_args, vm_factory,
                offset=ts.snap.offset, paused=paused, wait=False, recover_attempts=attempts,
                loader_args=("--max-bandwidth", bandwidth), preempt=preempt)
    tracked.append(Tracked(g))
    return g


@pytest.mark.parametrize("preempt", [False, True], ids=["one-channel", "preempt"])
def test_loader_killed_at_random_points_recovers(
        vm_factory: VmFactory, guest_factory: GuestFactory, snapshot_factory: SnapshotFactory,
        tracked: list[Tracked], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        preempt: bool) -> None:
    """KILLS restores (20 by default), each SIGKILLs its loader once at a seeded
    random point (`package`: the loader stops half-way through the package
    (FASTSNAP_LOADER_INJECT=serve-hang-in-package, one loader) and is killed
    there, so the destination fails before RUN and is restarted; `eager`:
    while pages stream; `requests`: while the guest touches memory); each
    guest recovers with memory identical to the source's
    (whole-RAM digest for guests restored paused) and its self-check passing
    (run *while* the kill happens in the `requests` phase, so page requests
    are outstanding).  Prints the seed and, per kill, the phase, delay, how
    it was recovered and the time from the kill to RESUME_ACK (resume) or to
    the new destination's postcopy start (restart).

    With `preempt` (FASTSNAP_RECOVERY_PREEMPT_KILLS restores, 10 by default)
    the destination has postcopy-preempt on: each resumed loader reopens the
    preempt channel before POSTCOPY_RESUME and answers the re-sent requests
    there (its `preempt` stats are present; in the `requests` phase it
    answered requests on that channel: there the first loader holds the
    guest's first request (FASTSNAP_LOADER_INJECT=serve-hang-in-preempt), as
    its return-path thread would otherwise answer them all before the kill)."""
    seed = int(os.environ.get("FASTSNAP_RECOVERY_SEED", str(time.time_ns() % (1 << 32))))
    print(f"\nFASTSNAP_RECOVERY_SEED={seed}")
    rng = random.Random(seed)
    flag = tmp_path / "hang"
    ts = tiny_snapshot(guest_factory, snapshot_factory)
    rows = []
    kills = PREEMPT_KILLS if preempt else KILLS
    for i in range(kills):
        phase = rng.choice(PHASES)
        paused = phase != "requests"
        # With preempt the return-path thread answers requests at once, so a
        # guest could finish its check before the kill: its first request on
        # the preempt channel is held there instead (the `preempt` hang point)
        # and stays outstanding until the kill.
        hold = phase == "package" or (preempt and phase == "requests")
        monkeypatch.setenv("FASTSNAP_LOADER_INJECT",
                           f"serve-hang-in-{'preempt' if phase == 'requests' else 'package'}:"
                           f"{flag}")
        if hold:
            flag.touch()
        g = bridge(ts, vm_factory, tracked, paused=paused, preempt=preempt)
        checked: list[Verdict] = []
        checker = None
        if phase == "package":
            deadline = time.monotonic() + 30
            while flag.exists():    # the loader took it: it stops inside the package
                assert time.monotonic() < deadline, "loader never reached the package"
                time.sleep(0.001)
            delay = rng.uniform(0.0, 0.1)
        else:
            g.wait_running()
            delay = rng.uniform(0.05, 1.2) if phase == "eager" else rng.uniform(0.01, 0.3)
        if phase == "requests":
            agent = g.agent
            checker = threading.Thread(target=lambda a=agent, out=checked: out.append(
                a.self_check(timeout=240)), daemon=True)
            checker.start()
        if hold and phase == "requests":
            deadline = time.monotonic() + 30
            while flag.exists():    # the guest's first request is held
                assert time.monotonic() < deadline, "no request on the preempt channel"
                time.sleep(0.001)
        time.sleep(delay)
        t_kill = time.time()
        rc = g.kill_loader()
        g.wait_running(timeout=120)
        g.wait_loaded(timeout=240)
        assert g.recovery is not None
        attempts = g.recovery.attempts
        if rc == 0:
            rows.append((i, phase, delay, "loader had finished", None))
            assert not attempts
        else:
            assert attempts, f"kill {i} ({phase}): loader exited {rc}, nothing recovered"
            a = attempts[0]
            if a.kind == "resume":
                ack = a.resume_ack_at
                assert ack is not None, a.loader_stats()
                took = ack - t_kill
                stats = a.loader_stats()
                assert stats["ok"] and stats["double_sends"] == 0, stats
                assert stats["pages_present"] > 0, stats
                if phase == "requests":     # the checking guest's faults reached it
                    assert stats["requests_served"] > 0, stats
                if preempt:     # the resumed loader had its preempt channel again
                    assert stats["preempt"] is not None and \
                        stats["time_preempt_resumed_s"] > 0, stats
                    if phase == "requests":
                        assert stats["preempt"]["requests_served"] > 0, stats
            else:
                assert phase == "package", f"kill {i} ({phase}) restarted: {a.cause}"
                assert g.time_to_running is not None
                took = g.t0_wall + g.time_to_running - t_kill
            rows.append((i, phase, delay, a.kind, took))
        assert g.loader_stats["ok"] and g.loader_stats["double_sends"] == 0, g.loader_stats
        if paused:
            assert g.vm.memory_digests([(0, ts.mem)]) == ts.want, f"kill {i} ({phase})"
            g.vm.qmp("cont")
            g.vm.wait_status("running")
            assert g.self_check(), f"kill {i} ({phase})"
        else:
            assert checker is not None
            checker.join(timeout=300)
            assert checked and checked[0], f"kill {i} ({phase}): {checked}"
            assert isinstance(g.agent, TinyGuest)
            assert g.agent.host_check(), f"kill {i} ({phase})"
        tracked.pop().close()
    print(f"{'#':>3} {'phase':9} {'delay_s':>8} {'recovery':20} {'kill_to_resumed_s':>18}")
    for i, phase, delay, kind, took in rows:
        print(f"{i:>3} {phase:9} {delay:8.3f} {kind:20} "
              + (f"{took:18.3f}" if took is not None else f"{'-':>18}"))
    killed = [r for r in rows if r[4] is not None]

    def spread(kind: str) -> str:
        t = sorted(r[4] for r in killed if r[3] == kind)
        return (f"{len(t)}: min {t[0]:.3f} median {t[len(t) // 2]:.3f} max {t[-1]:.3f}"
                if t else "0")
    print(f"preempt={preempt} kills: {len(killed)} of {len(rows)} landed, {len(killed)} recovered; "
          f"resume (kill -> RESUME_ACK s) {spread('resume')}; "
          f"restart (kill -> new destination in postcopy s) {spread('restart')}")
    assert len(killed) >= kills * 3 // 4, "too many kills landed after the loader finished"


@pytest.mark.parametrize("how", ["attempts-exhausted", "snapshot-removed"])
def test_unrecoverable_guest_ends_with_one_error(
        vm_factory: VmFactory, guest_factory: GuestFactory,
        snapshot_factory: SnapshotFactory, tracked: list[Tracked], how: str) -> None:
    """With one attempt allowed, killing the resumed loader too (or removing
    the snapshot so the resumed loader refuses to start) ends the restore
    with one RestoreNotRecovered naming the losses, and the destination,
    every loader and the socket directory are gone before it is raised."""
    ts = tiny_snapshot(guest_factory, snapshot_factory)
    g = bridge(ts, vm_factory, tracked, paused=True, attempts=1, bandwidth="2")
    g.wait_running()
    time.sleep(0.2)
    first = g.loader
    if how == "snapshot-removed":
        ts.snap.path.unlink()
    assert g.kill_loader() not in (0, None)
    if how == "attempts-exhausted":
        deadline = time.monotonic() + 30
        assert g.recovery is not None
        while g.loader is first or not g.recovery.attempts:
            assert time.monotonic() < deadline, "no resumed loader"
            time.sleep(0.005)
        time.sleep(0.1)
        assert g.kill_loader() not in (0, None)
    with pytest.raises(RestoreNotRecovered) as failed:
        g.wait_loaded(timeout=60)
    msg = str(failed.value)
    print(msg)
    assert "guest not recovered" in msg and "destination and loader killed" in msg
    if how == "snapshot-removed":
        assert "E_OPEN" in msg and "refused its input" in msg
    else:
        assert "all 1 recovery attempts used" in msg and "#1 resume" in msg
    assert not g.vm.is_running()
    assert g.loader is not None and g.loader.poll() is not None
    assert g.sock_dir is not None and not g.sock_dir.exists()
    t = tracked.pop()
    t.close()


def _loaders_of(snapshot: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every live ``fastsnap-loader serve`` of *snapshot*."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(args) > 2 and args[0].endswith(b"fastsnap-loader") and args[1] == b"serve" \
                and args[2] == os.fsencode(snapshot) and process.running(int(proc.name)):
            found.append((int(proc.name), b" ".join(args).decode(errors="replace")))
    return found


@pytest.mark.parametrize("point, kind, preempt", [("package", "restart", False),
                                                  ("eager", "resume", False),
                                                  ("eager", "resume", True)])
def test_fastsnap_restore_recovers_a_killed_loader(
        guest_factory: GuestFactory, snapshot_factory: SnapshotFactory, tmp_path: Path,
        point: str, kind: str, preempt: bool) -> None:
    """`fastsnap restore` (default --recover-attempts 3): its loader, stopped in
    the package or half-way through the eager stream and SIGKILLed there, is
    recovered (a fresh start before RUN, QEMU's postcopy recovery after); the
    command says so, finishes with exit 0 and leaves no loader behind; also
    `fastsnap restore --preempt` (its resumed loader has `--preempt`)."""
    ts = tiny_snapshot(guest_factory, snapshot_factory)
    flag = tmp_path / "hang"
    flag.touch()
    env = {**os.environ, "FASTSNAP_LOADER_INJECT": f"serve-hang-in-{point}:{flag}"}
    cli = subprocess.Popen([sys.executable, "-m", "pytest_fastsnap.cli", "restore",
                            str(ts.snap.path), *(["--preempt"] if preempt else [])],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while flag.exists():
            assert cli.poll() is None, cli.communicate()
            assert time.monotonic() < deadline, "the loader never reached the hang point"
            time.sleep(0.005)
        (pid, cmd), = _loaders_of(ts.snap.path)
        assert "--resume" not in cmd and ("--preempt" in cmd) == preempt
        os.kill(pid, signal.SIGKILL)
        out, err = cli.communicate(timeout=240)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    print(out)
    assert cli.returncode == 0, err
    assert f"recovery 1: {kind} after loader exited with -9" in out, out
    assert "fully loaded after" in out
    # The last loader's stats (the resumed one's) have its preempt channel.
    assert ("pages on the preempt channel" in out) == preempt, out
    assert not _loaders_of(ts.snap.path)


@pytest.mark.parametrize("point, preempt", [("eager", False), ("requests", False),
                                            ("requests", True)])
def test_asan_loader_resumes(vm_factory: VmFactory, guest_factory: GuestFactory,
                             snapshot_factory: SnapshotFactory, tracked: list[Tracked],
                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             point: str, preempt: bool) -> None:
    """The ASan+UBSan loader (first and resumed) under a real recovery: stopped
    half-way through the eager stream and killed there, with the guest idle
    (`eager`) or checking its memory meanwhile (`requests`); the resumed
    loader exits 0 (a sanitizer report would exit 98/99), memory is exact.
    With `preempt` the resumed loader reopens the preempt channel and answers
    the re-sent requests there."""
    from pytest_fastsnap.native.loader import ASAN_ENV, loader_path

    monkeypatch.setenv("FASTSNAP_LOADER", str(loader_path("asan")))
    for key, value in ASAN_ENV.items():
        monkeypatch.setenv(key, value)
    flag = tmp_path / "hang"
    flag.touch()
    # With preempt the return-path thread answers requests while the main
    # thread hangs in the eager stream: hang that thread instead (before its
    # first answer), under a slow eager stream, so requests stay outstanding.
    monkeypatch.setenv("FASTSNAP_LOADER_INJECT",
                       f"serve-hang-in-{'preempt' if preempt else 'eager'}:{flag}")
    ts = tiny_snapshot(guest_factory, snapshot_factory)
    g = bridge(ts, vm_factory, tracked, paused=point == "eager",
               bandwidth="2" if preempt else "0", preempt=preempt)
    g.wait_running()
    checked: list[Verdict] = []
    checker = None
    if point == "requests":
        agent = g.agent
        checker = threading.Thread(target=lambda: checked.append(agent.self_check(240)),
                                   daemon=True)
        checker.start()
    deadline = time.monotonic() + 60
    while flag.exists():
        assert time.monotonic() < deadline, "the loader never reached its hang point"
        time.sleep(0.002)
    time.sleep(0.2)     # let the checking guest fault on pages that are not there
    assert g.loader is not None and "/asan-" in str(g.loader.args[0])
    assert g.kill_loader() == -9
    g.wait_loaded(timeout=240)
    assert "/asan-" in str(g.loader.args[0])     # the resumed loader too
    assert g.recovery is not None and [a.kind for a in g.recovery.attempts] == ["resume"]
    stats = g.recovery.attempts[0].loader_stats()
    assert stats["ok"] and stats["double_sends"] == 0 and stats["pages_present"] > 0, stats
    if checker is not None:
        checker.join(timeout=300)
        assert checked and checked[0], checked
        assert stats["requests_served"] > 0, stats
        # The vCPU waited on a page since the loader hung: QEMU re-sent that
        # request after RESUME_ACK and it left before any eager page (with
        # preempt: on the reopened preempt channel, from the return path).
        if preempt:
            assert stats["preempt"]["requests_served"] >= 1, stats
        else:
            assert stats["resume_requests_first"] >= 1, stats
    else:
        assert g.vm.memory_digests([(0, ts.mem)]) == ts.want
        g.vm.qmp("cont")
        g.vm.wait_status("running")
        assert g.self_check()


def _resumed_once_and_whole(g: RestoredGuest, ts: TinySnapshot, cause: str) -> None:
    """One recovery, a resume whose cause names *cause*, that found pages the
    destination had; RAM equal to the source's and the self-check passing."""
    assert g.recovery is not None
    (a,) = g.recovery.attempts
    assert a.kind == "resume" and cause in a.cause, a
    assert a.loader_stats()["pages_present"] > 0
    assert g.vm.memory_digests([(0, ts.mem)]) == ts.want
    g.vm.qmp("cont")
    g.vm.wait_status("running")
    assert g.self_check()


def test_connection_dropped_by_the_destination_recovers(
        vm_factory: VmFactory, guest_factory: GuestFactory,
        snapshot_factory: SnapshotFactory, tracked: list[Tracked]) -> None:
    """The loader lives but its connection drops (QMP `migrate-pause` on the
    destination shuts the migration socket mid-stream): the loader exits 1
    (E_DEST_GONE), the restore resumes on a new socket, RAM equals the source's."""
    ts = tiny_snapshot(guest_factory, snapshot_factory)
    g = bridge(ts, vm_factory, tracked, paused=True)
    g.wait_running()
    time.sleep(0.3)
    first = g.loader
    assert first is not None and first.poll() is None, "loader finished too early"
    g.vm.qmp("migrate-pause")
    g.wait_loaded(timeout=240)
    assert first.poll() == 1
    _resumed_once_and_whole(g, ts, "E_DEST_GONE")


@pytest.mark.parametrize("point, preempt", [("resume-connect", False), ("resume-connect", True),
                                            ("resume-preempt", True), ("resume-ack", True)])
def test_resumed_loader_lost_before_it_connects(
        vm_factory: VmFactory, guest_factory: GuestFactory,
        snapshot_factory: SnapshotFactory, tracked: list[Tracked], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, point: str, preempt: bool) -> None:
    """The first resumed loader is SIGKILLed before it connects
    (`resume-connect`: the destination has a `migrate-recover` listener and
    nobody on it) or, with preempt, after its main connection and the
    RECV_BITMAPs but before the preempt channel (`resume-preempt`), or with
    both channels up but before POSTCOPY_RESUME (`resume-ack`: the
    destination has counted a preempt channel that its resume never
    consumed).  The destination is `postcopy-paused` (nobody connected on
    the migrate-recover listener) or `postcopy-recover` (checked with
    query-migrate while the loader hangs), and goes back to paused when the
    loader dies; the restore resumes again with a second `migrate-recover`,
    and RAM equals the source's; nothing is left."""
    flag = tmp_path / "hang"
    monkeypatch.setenv("FASTSNAP_LOADER_INJECT", f"serve-hang-in-{point}:{flag}")
    ts = tiny_snapshot(guest_factory, snapshot_factory)
    g = bridge(ts, vm_factory, tracked, paused=True, bandwidth="2", preempt=preempt)
    g.wait_running()
    time.sleep(0.2)
    first = g.loader
    flag.touch()
    assert g.kill_loader() not in (0, None)
    deadline = time.monotonic() + 30
    # The resumed loader took the flag (it hangs at `point`); it may do so
    # before the watcher thread has stored it in g.loader.
    while flag.exists() or g.loader is first:
        assert time.monotonic() < deadline, "no resumed loader reached " + point
        time.sleep(0.002)
    status = g.vm.qmp("query-migrate").get("status")
    print(f"destination while the resumed loader hangs at {point}: {status}")
    assert status in ("postcopy-paused", "postcopy-recover"), status
    assert g.kill_loader() == -9
    g.wait_loaded(timeout=240)
    assert g.recovery is not None
    kinds = [(a.kind, a.error) for a in g.recovery.attempts]
    assert kinds == [("resume", ""), ("resume", "")], kinds
    stats = g.recovery.attempts[1].loader_stats()
    assert stats["ok"] and stats["double_sends"] == 0 and stats["pages_present"] > 0, stats
    assert (stats["preempt"] is not None) == preempt, stats
    assert g.vm.memory_digests([(0, ts.mem)]) == ts.want
    g.vm.qmp("cont")
    g.vm.wait_status("running")
    assert g.self_check()


class HoldingRelay:
    """A TCP relay between the loader and the destination that, when the
    loader's side ends, keeps the destination's side open: what a network
    partition looks like to the destination (no FIN, no RST)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                loader_side, _ = self.lsock.accept()
                dest_side = socket.create_connection(self.upstream)
                self.socks += [loader_side, dest_side]
                self._spawn(self._pump, loader_side, dest_side, False)
                self._spawn(self._pump, dest_side, loader_side, True)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, pass_eof: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
            if pass_eof:        # the destination's end reaches the loader
                dst.shutdown(socket.SHUT_WR)

    def via(self, uri: str) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def close(self) -> None:
        for s in [self.lsock, *self.socks]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self.threads:
            t.join(timeout=10)


def test_destination_left_postcopy_active_is_paused_and_resumed(
        vm_factory: VmFactory, guest_factory: GuestFactory,
        snapshot_factory: SnapshotFactory, tracked: list[Tracked]) -> None:
    """The loader (over TCP, through a relay) is SIGKILLed and its connection
    stays open on the destination's side (a partition): the destination stays
    postcopy-active and would never pause by itself.  Recovery tells it to
    (QMP migrate-pause after PAUSE_AFTER s), then resumes it on a new socket;
    RAM equals the source's; nothing is left."""
    ts = tiny_snapshot(guest_factory, snapshot_factory)
    relays: list[HoldingRelay] = []

    def via(uri: str) -> str:
        host, port = uri.removeprefix("tcp:").rsplit(":", 1)
        relays.append(HoldingRelay((host, int(port))))
        return relays[-1].via(uri)

    try:
        g = restore("loader-bridge", ts.snap.path, ts.snap.device_args, vm_factory,
                    offset=ts.snap.offset, paused=True, wait=False, recover_attempts=1,
                    loader_args=("--max-bandwidth", BANDWIDTH), transport="tcp", loader_via=via)
        tracked.append(Tracked(g))
        g.wait_running()
        time.sleep(0.3)
        assert g.kill_loader() == -9
        time.sleep(0.5)     # the destination has not noticed: its connection is open
        assert g.vm.qmp("query-migrate").get("status") == "postcopy-active"
        g.wait_loaded(timeout=240)
        _resumed_once_and_whole(g, ts, "migrate-pause")
    finally:
        for r in relays:
            r.close()


def test_resumed_loader_is_the_one_use_loader_fixed(
        vm_factory: VmFactory, guest_factory: GuestFactory, snapshot_factory: SnapshotFactory,
        tracked: list[Tracked], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """use_loader() fixes the binary for every restore in its block, and a
    recovery spawns its resumed loader from its own thread: that loader runs
    the fixed binary too (here the ASan build, where the default is release),
    so a bench that recovers a restore still runs one binary throughout."""
    from pytest_fastsnap.native.loader import ASAN_ENV, loader_path
    from pytest_fastsnap.restore.strategies import use_loader

    for key, value in ASAN_ENV.items():
        monkeypatch.setenv(key, value)
    flag = tmp_path / "hang"
    flag.touch()
    monkeypatch.setenv("FASTSNAP_LOADER_INJECT", f"serve-hang-in-eager:{flag}")
    ts = tiny_snapshot(guest_factory, snapshot_factory)
    asan = loader_path("asan")
    with use_loader(asan):
        g = bridge(ts, vm_factory, tracked, paused=True)
        deadline = time.monotonic() + 60
        while flag.exists():
            assert time.monotonic() < deadline, "the loader never reached its hang point"
            time.sleep(0.002)
    assert g.loader is not None and g.loader.args[0] == str(asan), g.loader.args
    assert g.kill_loader() == -9
    g.wait_loaded(timeout=240)
    assert g.recovery is not None and [a.kind for a in g.recovery.attempts] == ["resume"]
    assert g.loader.args[0] == str(asan), g.loader.args     # the resumed one too
    assert g.vm.memory_digests([(0, ts.mem)]) == ts.want
