"""Guest-visible page latency: the tiny guest times the first read of every
page its TOUCH workload reads (rdtsc, calibrated at boot against the PIT)
and reports a summary in its TOUCH OK line.

What is proven here, with real QEMU, real restores and real userfaultfd:
- the guest's clock is right: its own timing of a long TOUCH agrees with the
  host's wall clock around it (a wrong TSC calibration fails this);
- a booted guest (every page present) reports ~0 faulted reads, and a guest
  restored by the bridge with the eager stream held back (every touched
  page must be requested) reports nearly all reads faulted, above the
  threshold; once loaded, the same guest reports ~0 again;
- a slow page shows: with a relay holding every byte 40 ms on the round trip
  between loader and destination, every faulted read takes at least that long
  in the guest's eyes, while the same restore without the relay stays far
  below it;
- old TOUCH lines (no timing fields) still parse; damaged ones are refused;
- the loader's --eager-holdoff-us holds the eager stream back while requests
  come (main channel and preempt, release and ASan+UBSan builds) and every
  page still arrives intact.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator

import pytest

from pytest_fastsnap.fixtures import GuestFactory, SnapshotFactory, VmFactory
from pytest_fastsnap.guests.pattern import touch_count
from pytest_fastsnap.guests.tiny import TinyGuest, TinyParams
from pytest_fastsnap.guests.touch_latency import TouchLatency, parse_touch_latency
from pytest_fastsnap.native.loader import ASAN_ENV, loader_path
from pytest_fastsnap.qemu.migration import SavedSnapshot
from pytest_fastsnap.restore import restore
from pytest_fastsnap.restore.delay_relay import DelayRelay
from pytest_fastsnap.restore.strategies import RestoredGuest
from pytest_fastsnap.restore.transport import parse_tcp

NEW_LINE = ("TOUCH OK order=rand permille=10 pages=52 gen=0 us=81234 tsc_khz=2995000 "
            "lat_thresh_us=10 faulted=50 lat_p50_us=412 lat_p90_us=880 lat_p99_us=2304 "
            "lat_max_us=9120 lat_res=16")


# -- parsing (no QEMU) --------------------------------------------------------

def test_old_touch_line_has_no_latency() -> None:
    assert parse_touch_latency("TOUCH OK order=seq permille=1000 pages=4096 gen=0") is None


def test_new_touch_line_parses_every_field() -> None:
    lat = parse_touch_latency(NEW_LINE + "\r\n")
    assert lat == TouchLatency(total_us=81234, tsc_khz=2995000, thresh_us=10, faulted=50,
                               p50_us=412, p90_us=880, p99_us=2304, max_us=9120,
                               buckets_per_octave=16)
    assert lat.tail_ratio == pytest.approx(2304 / 412)
    assert lat.as_dict()["p99_over_p50"] == pytest.approx(2304 / 412)


def test_no_faulted_reads_have_no_ratio() -> None:
    line = NEW_LINE.replace("faulted=50", "faulted=0")
    for key in ("lat_p50_us=412", "lat_p90_us=880", "lat_p99_us=2304", "lat_max_us=9120"):
        line = line.replace(key, key.split("=")[0] + "=0")
    lat = parse_touch_latency(line)
    assert lat is not None and lat.faulted == 0 and lat.tail_ratio is None


@pytest.mark.parametrize("line, why", [
    (NEW_LINE.replace(" lat_p99_us=2304", ""), "lacks lat_p99_us"),
    (NEW_LINE.replace("lat_p50_us=412", "lat_p50_us=4x2"), "lat_p50_us='4x2' is not a whole"),
    (NEW_LINE.replace("us=81234", "us=-1"), "us='-1' is not a whole"),
])
def test_damaged_touch_line_is_refused_naming_the_field(line: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_touch_latency(line)


# -- the guest's clock -----------------------------------------------------------


def _latency(verdict: object) -> TouchLatency:
    assert verdict, getattr(verdict, "reason", verdict)
    lat = verdict.details["latency"]  # type: ignore[attr-defined]
    assert isinstance(lat, TouchLatency), verdict.details["line"]  # type: ignore[attr-defined]
    return lat


@pytest.mark.fastsnap
def test_guest_clock_agrees_with_host_wall_time(guest_factory: GuestFactory) -> None:
    """A booted tiny guest (microvm and q35) reports a TSC rate and times a
    long TOUCH within a few percent of the host's wall clock around it; every
    page is present, so (almost) no read counts as faulted."""
    for machine in ("microvm", "q35"):
        guest = guest_factory("tiny", mem="96M", size=64 << 20, zero_ratio=0.0,
                              machine=machine)
        agent = guest.agent
        assert isinstance(agent, TinyGuest)
        ready = re.search(r"FASTSNAP-TINY READY .* tsc_khz=(\d+)", agent.console.text)
        assert ready and int(ready.group(1)) > 100_000, agent.console.text  # > 100 MHz
        ratios = []
        for _ in range(3):
            t0 = time.perf_counter()
            verdict = agent.touch(1000, "rand")
            wall_us = (time.perf_counter() - t0) * 1e6
            lat = _latency(verdict)
            assert lat.tsc_khz > 100_000, lat     # > 100 MHz: a real TSC rate
            # the guest's loop is inside the host's window: never longer, and
            # the command and reply bytes around it cost milliseconds at most
            assert lat.total_us <= wall_us * 1.01, (machine, lat, wall_us)
            ratios.append(lat.total_us / wall_us)
            pages = touch_count(agent.params.pages, 1000)
            assert lat.faulted <= pages // 100, (machine, lat)
        assert max(ratios) >= 0.8, (machine, ratios, "guest clock runs slow or the touch "
                                    "is too short to compare")
        guest.vm.shutdown()


# -- restores ----------------------------------------------------------------------

@pytest.fixture
def tiny_snapshot(guest_factory: GuestFactory, snapshot_factory: SnapshotFactory
                  ) -> tuple[SavedSnapshot, TinyParams]:
    guest = guest_factory("tiny", mem="64M", size=16 << 20, zero_ratio=0.0, machine="q35")
    assert guest.params is not None
    return guest.saved(snapshot_factory), guest.params


def _held(snap: SavedSnapshot, vm_factory: VmFactory, **kw: object) -> RestoredGuest:
    """A bridge restore whose eager stream waits (--eager-delay) until SIGUSR1:
    every page the guest touches before then must be requested."""
    return restore("loader-bridge", snap.path, snap.device_args, vm_factory,
                   loader_args=["--eager-delay", "300"], timeout=120, **kw)  # type: ignore[arg-type]


def _release_and_finish(guest: RestoredGuest) -> None:
    assert guest.loader is not None
    guest.loader.send_signal(signal.SIGUSR1)
    guest.wait_loaded(timeout=300)


@pytest.mark.fastsnap
def test_fetched_pages_show_as_faulted_and_loaded_ones_do_not(
        tiny_snapshot: tuple[SavedSnapshot, TinyParams], vm_factory: VmFactory) -> None:
    snap, params = tiny_snapshot
    guest = _held(snap, vm_factory)
    try:
        pages = touch_count(params.pages, 50)
        lat = _latency(guest.agent.touch(50, "rand"))
        # every touched page was requested; a few may share a host huge page
        # or have been prefetched with a neighbour, none can be present at RUN
        assert lat.faulted >= pages * 9 // 10, lat
        assert lat.p50_us > lat.thresh_us and lat.max_us >= lat.p99_us >= lat.p50_us, lat
        _release_and_finish(guest)
        assert guest.loader_stats["requests"] >= lat.faulted * 9 // 10, guest.loader_stats
        again = _latency(guest.agent.touch(1000, "rand"))
        assert again.faulted <= touch_count(params.pages, 1000) // 100, again
    finally:
        guest.close()


@pytest.fixture
def delayed_transport() -> Iterator[dict[str, object]]:
    relays: list[DelayRelay] = []

    def via(uri: str) -> str:
        relays.append(DelayRelay(parse_tcp(uri[4:]), RTT_MS))
        return f"tcp:127.0.0.1:{relays[-1].port}"
    try:
        yield {"transport": "tcp:127.0.0.1:0", "loader_via": via}
    finally:
        for relay in relays:
            relay.close()


RTT_MS = 40


@pytest.mark.fastsnap
def test_a_slow_page_shows_as_guest_latency(
        tiny_snapshot: tuple[SavedSnapshot, TinyParams], vm_factory: VmFactory,
        delayed_transport: dict[str, object]) -> None:
    """Every byte between loader and destination held RTT_MS/2 each way: each
    requested page reaches the guest no sooner than RTT_MS after its request,
    and the guest's figures say so (p50 is a bucket lower bound, <= 1/16 low);
    without the relay the same workload is far faster, so this could fail."""
    snap, _params = tiny_snapshot
    figures = {}
    for name, kw in (("direct", {"transport": "tcp:127.0.0.1:0"}),
                     ("relay", delayed_transport)):
        guest = _held(snap, vm_factory, **kw)
        try:
            figures[name] = _latency(guest.agent.touch(5, "rand"))
            _release_and_finish(guest)
        finally:
            guest.close()
    slow, fast = figures["relay"], figures["direct"]
    assert slow.faulted >= 1 and fast.faulted >= 1, figures
    floor_us = RTT_MS * 1000
    assert slow.max_us >= floor_us and slow.p50_us >= floor_us * 15 // 16, figures
    assert fast.p50_us < floor_us // 4, figures


@pytest.fixture(params=["release", "asan"])
def loader_variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The loader the restores run: the release build, or ASan+UBSan."""
    if request.param == "asan":
        monkeypatch.setenv("FASTSNAP_LOADER", str(loader_path("asan")))
        for key, value in ASAN_ENV.items():
            monkeypatch.setenv(key, value)
    return str(request.param)


@pytest.mark.fastsnap
@pytest.mark.parametrize("preempt", [False, True], ids=["main-channel", "preempt"])
def test_eager_holdoff_pauses_the_stream_and_keeps_memory_intact(
        tiny_snapshot: tuple[SavedSnapshot, TinyParams], vm_factory: VmFactory,
        loader_variant: str, preempt: bool) -> None:
    """--eager-holdoff-us: while the guest's requests keep coming, the eager
    stream waits (the loader counts the time held off, > 0), every page still
    arrives, the guest's memory checks out, and the stats echo the option.
    Release and ASan+UBSan builds."""
    snap, params = tiny_snapshot
    # 8 MiB/s: the stream cannot have sent everything before the touch starts
    # (on a busy host it had, once: nothing faulted, nothing to hold off for)
    guest = restore("loader-bridge", snap.path, snap.device_args, vm_factory, timeout=120,
                    preempt=preempt,
                    loader_args=["--eager-holdoff-us", "2000", "--max-bandwidth", "8"])
    try:
        lat = _latency(guest.agent.touch(100, "rand"))
        guest.wait_loaded(timeout=300)
        stats = guest.loader_stats
        assert stats["eager_holdoff_us"] == 2000, stats
        assert lat.faulted > 0 and stats["requests"] > 0, (lat, stats)
        assert stats["eager_holdoff_total_s"] > 0, stats
        assert stats["pages_eager"] + stats["pages_on_request"] >= params.pages, stats
        assert guest.self_check()
    finally:
        guest.close()
