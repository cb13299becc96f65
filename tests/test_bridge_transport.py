"""The bridge over TCP and with the postcopy-preempt channel, against real QEMU
10.0 destinations and the tiny guest: loopback (127.0.0.1, ::1), two network
namespaces joined by a veth pair with ``tc netem`` delay, and preempt over
unix and tcp.  Each restore: RAM equal to the source's (destination paused,
compared before the guest runs on), then the guest's own self-check passes;
the loader's counters say every data page went out exactly once, and with
preempt that requested pages went out on the second channel.  The release
and the ASan+UBSan loader both run (a leak or UB fails the loader's exit)."""

from __future__ import annotations

import fcntl
import io
import os
import re
import socket
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from pytest_fastsnap import netns
from pytest_fastsnap.fixtures import Guest, SnapshotFactory, VmFactory
from pytest_fastsnap.native.loader import ASAN_ENV, loader_path
from pytest_fastsnap.plugin_state import CONFIG_KEY
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.migration import SavedSnapshot
from pytest_fastsnap.restore import RestoredGuest, restore
from pytest_fastsnap.restore.delay_relay import DelayRelay
from pytest_fastsnap.restore.transport import parse_tcp

pytestmark = pytest.mark.fastsnap
SIOCGSKNS = 0x894C     # linux/sockios.h: the socket's network namespace as an fd


def ram_ranges(vm: QemuMachine) -> list[tuple[int, int]]:
    mem = int(vm.qmp("query-memory-size-summary")["base-memory"])
    return [(0, 0xA0000), (0x100000, mem - 0x100000)]


def ipv6_loopback_missing() -> str | None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as err:
        return f"no IPv6 loopback (::1): {err}"
    return None


@pytest.fixture(params=["release", "asan"])
def loader_variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Restores in the test use this build of the loader."""
    monkeypatch.setenv("FASTSNAP_LOADER", str(loader_path(request.param)))
    if request.param == "asan":
        for k, v in ASAN_ENV.items():
            monkeypatch.setenv(k, v)
    return str(request.param)


@pytest.fixture
def source(guest: Guest, snapshot_factory: SnapshotFactory
           ) -> tuple[Guest, SavedSnapshot, dict[str, str], list[tuple[int, int]]]:
    """The tiny guest saved stopped, with the digests of all its RAM."""
    guest.vm.qmp("stop")
    ranges = ram_ranges(guest.vm)
    want = guest.vm.memory_digests(ranges)
    snap = snapshot_factory(guest.vm)
    return guest, snap, want, ranges


@pytest.fixture
def veth() -> Iterator[netns.VethPair]:
    """Two namespaces joined by a veth pair, removed however the test ends."""
    missing = netns.netns_missing()
    if missing:
        pytest.skip(missing)
    with netns.veth_pair() as link:
        yield link
    assert not link.exists(), f"namespaces {link.ns_a}, {link.ns_b} left behind"


class InNamespace:
    """vm_factory whose destinations start inside network namespace *ns*."""

    def __init__(self, vm_factory: VmFactory, link: netns.VethPair, ns: str) -> None:
        self.vm_factory, self.link, self.ns = vm_factory, link, ns

    def destination(self, source: Any, **kw: Any) -> QemuMachine:
        with self.link.inside(self.ns):
            return self.vm_factory.destination(source, **kw)

    def own(self, resource: Any) -> None:
        self.vm_factory.own(resource)


def probe_pages(g: RestoredGuest, ranges: Sequence[tuple[int, int]], count: int,
                times: list[float] | None = None) -> int:
    """QEMU's main thread reads *count* pages from the top of RAM (the last the
    eager stream reaches) while the loader streams: page requests.  Returns
    how many reads were made before the loader finished; *times* gets each
    read's duration (s)."""
    gpa, length = ranges[-1]
    made = 0
    for i in range(count):
        if g.loader is None or g.loader.poll() is not None:
            break
        t = time.perf_counter()
        g.vm.hmp(f"xp /1xg {gpa + length - (1 + 7 * i) * 4096:#x}")
        if times is not None:
            times.append(time.perf_counter() - t)
        made += 1
    return made


def check_restore(g: RestoredGuest, want: dict[str, str], ranges: list[tuple[int, int]],
                  *, probes: int = 0, read_times: list[float] | None = None) -> dict[str, Any]:
    prober = None
    if probes:
        prober = threading.Thread(target=probe_pages, args=(g, ranges, probes, read_times))
        prober.start()
    g.wait_loaded()
    if prober is not None:
        prober.join()
    stats = g.loader_stats
    assert stats["ok"], stats
    assert g.vm.memory_digests(ranges) == want, "restored RAM differs from the source's"
    # every data page exactly once, on whichever channel
    assert stats["double_sends"] == 0, stats
    assert stats["pages_data"] == stats["file_pages_set"], stats
    g.vm.qmp("cont")
    verdict = g.self_check()
    assert verdict, verdict
    return stats


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tcp_loopback(source: Any, vm_factory: VmFactory, loader_variant: str,
                      host: str) -> None:
    """--to tcp:HOST:PORT over loopback: the destination listens on a free port
    (migrate-incoming tcp:HOST:0), the loader connects there."""
    if host == "::1" and (why := ipv6_loopback_missing()):
        pytest.skip(why)
    _guest, snap, want, ranges = source
    spec = f"tcp:[{host}]:0" if ":" in host else f"tcp:{host}:0"
    g = restore("loader-bridge", snap.path, snap.device_args, vm_factory, offset=snap.offset,
                paused=True, transport=spec, loader_args=("--max-bandwidth", "8"))
    stats = check_restore(g, want, ranges, probes=40)
    assert stats["transport"] == "tcp" and stats["preempt"] is None
    assert stats["requests_served"] > 0, "no page was requested: the probe reads did nothing"


DELAYS_MS = (0, 1, 10)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``delay_mech``: how delay is added between the namespaces here, probed
    once (``netem``, or ``relay`` on a kernel without sch_netem), so the test
    id says which one ran.  Without --fastsnap or namespaces nothing is probed
    (``unprobed``: the test skips, saying why)."""
    if "delay_mech" not in metafunc.fixturenames:
        return
    mech = "unprobed"
    if metafunc.config.stash[CONFIG_KEY].enabled and netns.netns_missing() is None:
        mech = netns.delay_mechanism()[0]
    metafunc.parametrize("delay_mech", [mech])


class DelayedPath:
    """The delay *mech* adds to the loader -> destination direction of a veth
    pair: ``netem`` on ns_a's end, or a :class:`DelayRelay` inside ns_a (the
    loader connects to it on ns_a's loopback, it connects to the destination
    in ns_b across the veth) holding every byte to the destination *ms* ms.
    Either way a page request's round trip grows by *ms*."""

    def __init__(self, link: netns.VethPair, mech: str, ms: float, vm_factory: VmFactory
                 ) -> None:
        self.link, self.mech, self.ms, self.vm_factory = link, mech, ms, vm_factory
        self.relays: list[DelayRelay] = []

    def __enter__(self) -> DelayedPath:
        if self.ms and self.mech == "netem":
            self.link.delay(self.ms)
        return self

    def via(self, uri: str) -> str:
        relay = DelayRelay(parse_tcp(uri[4:]), self.ms, to_upstream=1.0,
                           new_socket=lambda fam: self.link.socket_in(self.link.ns_a, fam))
        self.vm_factory.own(relay)      # closed at teardown even if we fail first
        self.relays.append(relay)
        return f"tcp:127.0.0.1:{relay.port}"

    def restore_args(self) -> dict[str, Any]:
        return {"loader_via": self.via} if self.ms and self.mech == "relay" else {}

    def __exit__(self, *exc: object) -> None:
        for relay in self.relays:
            relay.close()
        if self.ms and self.mech == "netem":
            self.link.delay(0)


def test_tcp_between_namespaces(source: Any, vm_factory: VmFactory, veth: netns.VethPair,
                                delay_mech: str, record_property: Any) -> None:
    """Destination QEMU in one namespace listening on its veth address, the
    loader in the other; restores with 0, 1 and 10 ms added to the round trip
    (by *delay_mech*).  Each: RAM identical to the source's, self-check passes,
    each end in its namespace, and every page QEMU read through the delayed
    path (HMP reads of not-yet-streamed pages: fault, request, page back) took
    at least the added delay -- a lower bound the delay imposes, not a speed
    goal.  Reads at 10 ms are slower than at 0 ms.  Request latency and time to
    loaded per delay are printed, not asserted."""
    _guest, snap, want, ranges = source
    mech_why = netns.delay_mechanism()[1]
    record_property("delay_mechanism", delay_mech)
    rows = []
    def one(path: DelayedPath, reads: list[float] | None) -> tuple[dict[str, Any], float, float]:
        """A restore over *path*: throttled to 8 MiB/s with page reads while it
        streams when *reads* is a list, else at full speed.  Returns the
        loader's stats, time to loaded and the whole restore's time."""
        throttled = reads is not None
        t = time.monotonic()
        g = restore("loader-bridge", snap.path, snap.device_args,
                    InNamespace(vm_factory, veth, veth.ns_b), offset=snap.offset,
                    paused=True, transport=f"tcp:{veth.addr_b}:0",
                    loader_prefix=veth.exec_prefix(veth.ns_a),
                    loader_args=("--max-bandwidth", "8") if throttled else (),
                    **path.restore_args())
        if throttled:
            # Each end really is in its namespace (the loader still streams).
            assert g.loader is not None and g.vm.pid is not None
            assert net_ns(g.vm.pid) == net_ns_of(veth.ns_b)
            assert net_ns(g.loader.pid) == net_ns_of(veth.ns_a) != net_ns(os.getpid())
        stats = check_restore(g, want, ranges, probes=10 if throttled else 0, read_times=reads)
        elapsed = time.monotonic() - t
        assert stats["transport"] == "tcp"
        g.close()
        return stats, g.time_to_loaded or 0.0, elapsed

    for delay_ms in DELAYS_MS:
        reads: list[float] = []
        with DelayedPath(veth, delay_mech, delay_ms, vm_factory) as path:
            stats, _, _ = one(path, reads)
            _, loaded, elapsed = one(path, None)
            for relay in path.relays:
                # the relay (in ns_a) carried the stream to ns_b's address, across the veth
                assert relay.errors == [], relay.errors
                assert relay.peers and relay.peers[0][0] == veth.addr_b, relay.peers
                assert net_ns_of_socket(relay.socks[1]) == net_ns_of(veth.ns_a)
                assert relay.wait_forwarded_up(stats["pages_data"] * 4096) \
                    >= stats["pages_data"] * 4096
            if delay_ms:
                assert len(path.relays) == 2 or delay_mech == "netem", "no delay on the path"
                # A restore costs at least a few round trips.
                assert elapsed >= 3 * delay_ms / 1000
        assert reads, "no page was read while the loader streamed"
        slow = [r for r in reads if r < delay_ms / 1000]
        assert not slow, (f"{len(slow)} of {len(reads)} reads through a {delay_ms} ms delay "
                          f"took less: {[round(r * 1000, 2) for r in slow]} ms")
        rows.append((delay_ms, reads, stats, loaded, elapsed))
    how = {"netem": "tc netem on ns_a's veth end",
           "relay": f"userspace DelayRelay in ns_a -> veth -> ns_b ({mech_why})"}[delay_mech]
    print(f"\ndelay added by {how}; page reads during an 8 MiB/s stream, time to loaded "
          "and the whole restore at full speed")
    print(" delay ms | reads | read p50 / max ms | loader p50 us | time to loaded s | restore s")
    for delay_ms, reads, stats, loaded, elapsed in rows:
        print(f" {delay_ms:8} | {len(reads):5} | {statistics.median(reads) * 1000:7.2f} / "
              f"{max(reads) * 1000:6.2f} | {stats['latency_us']['p50']:13.0f} | "
              f"{loaded:16.3f} | {elapsed:9.3f}")
    by_delay = {d: statistics.median(r) for d, r, *_ in rows}
    assert by_delay[DELAYS_MS[-1]] > by_delay[0], by_delay


def net_ns_of_socket(sock: socket.socket) -> int:
    """The network namespace (inode) a socket was made in (SIOCGSKNS)."""
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def net_ns(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def net_ns_of(name: str) -> int:
    return os.stat(netns.NETNS_DIR / name).st_ino


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_preempt_channel(source: Any, vm_factory: VmFactory, loader_variant: str,
                         transport: str) -> None:
    """postcopy-preempt on the destination, --preempt on the loader: requested
    pages go out on the second connection while the (throttled) eager stream
    holds the first; RAM identical, self-check passes, each page once."""
    _guest, snap, want, ranges = source
    g = restore("loader-bridge", snap.path, snap.device_args, vm_factory, offset=snap.offset,
                paused=True, transport=transport, preempt=True,
                loader_args=("--max-bandwidth", "8"))
    caps = {c["capability"]: c["state"] for c in g.vm.qmp("query-migrate-capabilities")}
    assert caps["postcopy-preempt"] is True
    stats = check_restore(g, want, ranges, probes=40)
    pre = stats["preempt"]
    assert pre is not None, stats
    assert pre["requests_served"] > 0 and pre["pages_on_request"] > 0, stats
    # with preempt, every request is answered on the preempt channel
    assert pre["pages_on_request"] == stats["pages_on_request"], stats
    assert stats["pages_on_request"] + stats["pages_eager"] == \
        stats["pages_data"] + stats["pages_zero"], stats


def test_preempt_running_guest(guest: Guest, snapshot_factory: SnapshotFactory,
                               vm_factory: VmFactory) -> None:
    """The guest runs while RAM streams slowly (4 MiB/s): its own faults are
    served on the preempt channel and its self-check passes.  Regression: the
    loader used to end the preempt channel with EOS before EOF, so a zero
    page the guest requested after that never arrived and the destination's
    cleanup waited for it forever (self-check timed out)."""
    snap = snapshot_factory(guest.vm)
    g = restore("loader-bridge", snap.path, snap.device_args, vm_factory, offset=snap.offset,
                transport="tcp", preempt=True, loader_args=("--max-bandwidth", "4"))
    verdict = g.self_check()
    assert verdict, verdict
    g.wait_loaded()
    stats = g.loader_stats
    assert stats["preempt"]["pages_on_request"] > 0, stats
    assert stats["double_sends"] == 0 and stats["pages_data"] == stats["file_pages_set"], stats


def test_preempt_on_a_destination_without_it(source: Any, vm_factory: VmFactory,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """--preempt against a destination whose postcopy-preempt is off: QEMU drops
    the second connection ("Extra incoming migration connection; ignoring"); the
    restore fails naming the capability, before the guest could run on a
    channel nobody reads (it used to hang on the first requested page)."""
    from pytest_fastsnap.restore import RestoreFailed, strategies

    _guest, snap, _want, _ranges = source
    real = strategies._caps
    monkeypatch.setattr(strategies, "_caps", lambda g, caps: real(
        g, {k: v for k, v in caps.items() if k != "postcopy-preempt"}))
    with pytest.raises(RestoreFailed, match="postcopy-preempt capability on"):
        # Refused at PONG 2 almost always; if QEMU dropped the connection only
        # after that, the first request (the guest runs) or the check before
        # EOF refuses it, and no EOF is sent.
        g = restore("loader-bridge", snap.path, snap.device_args, vm_factory,
                    offset=snap.offset, transport="tcp", preempt=True, timeout=30)
        g.wait_loaded(timeout=60)


def test_preempt_needs_a_second_connection(source: Any, vm_factory: VmFactory) -> None:
    _guest, snap, _want, _ranges = source
    with pytest.raises(ValueError, match="second connection"):
        restore("loader-bridge", snap.path, snap.device_args, vm_factory, transport="fd",
                preempt=True)


def test_netns_removed_on_failure() -> None:
    """A failing block inside veth_pair still removes both namespaces; a
    namespace named for a dead pid is swept."""
    if why := netns.netns_missing():
        pytest.skip(why)
    with pytest.raises(RuntimeError, match="boom"), netns.veth_pair() as link:
        assert link.exists()
        raise RuntimeError("boom")
    assert not link.exists()
    dead = 2 ** 22 + 17     # above pid_max's default: no such process
    while os.path.exists(f"/proc/{dead}"):
        dead += 1
    name = f"fsn{dead}x0a"
    netns._run("ip", "netns", "add", name)
    assert name in netns.sweep_stale()
    assert not (netns.NETNS_DIR / name).exists()


def test_restore_cli_over_tcp_with_preempt(guest: Guest, snapshot_factory: SnapshotFactory
                                           ) -> None:
    """`fastsnap restore SNAP --to tcp:127.0.0.1:0 --preempt` restores and says so."""
    from pytest_fastsnap.cli.restore import restore_cli
    from pytest_fastsnap.restore.manifest import write_manifest

    snap = snapshot_factory(guest.vm)
    write_manifest(snap.path, guest.vm, offset=snap.offset)
    out = io.StringIO()
    rc = restore_cli(snap.path, guest.vm.binary, to="tcp:127.0.0.1:0", preempt=True, out=out)
    text = out.getvalue()
    assert rc == 0, text
    assert re.search(r"loader-bridge: fully loaded after \d+\.\d+ s", text), text
    assert re.search(r"MiB/s over tcp, \d+ pages on the preempt channel", text), text
