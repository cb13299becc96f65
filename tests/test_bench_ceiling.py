"""The bench's ceiling run: a QEMU-to-QEMU postcopy migration of the bench
guest really goes through postcopy, even for a guest small enough that QEMU
could finish it in precopy before the switch."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_fastsnap.config import FastsnapConfig
from pytest_fastsnap.guests.pattern import touch_count
from pytest_fastsnap.guests.tiny import TinyGuest, TinyParams
from pytest_fastsnap.qemu.probe import probe
from pytest_fastsnap.restore.bench import make_snapshot
from pytest_fastsnap.restore.ceiling import postcopy_ceiling
from pytest_fastsnap.restore.strategies import RestoreFailed
from pytest_fastsnap.restore.workload import Workload, touch_workload
from pytest_fastsnap.verdict import Verdict

pytestmark = pytest.mark.fastsnap


def test_ceiling_sends_the_guest_in_postcopy(fastsnap_workdir: Path,
                                             fastsnap_config: FastsnapConfig) -> None:
    binary = fastsnap_config.qemu_binary
    machine = probe(binary).resolve_machine("q35")
    snap, device_args, ranges, _ = make_snapshot(24 << 20, binary=binary,
                                                 workdir=fastsnap_workdir, machine=machine,
                                                 log=lambda _msg: None)
    data = sum(n for _, n in ranges)
    result = postcopy_ceiling(snap, device_args, binary, fastsnap_workdir)
    # the data pages went after the switch, but for what precopy sends at its
    # 1 MiB/s cap in the one 100 ms rate-limit slice before it (~100 KiB)
    assert result["postcopy_bytes"] >= data - (256 << 10), result
    assert result["postcopy_s"] > 0 and result["postcopy_mib_s"] > 0, result
    assert result["blocktime"]["vcpu_ms"] is not None, result


def test_ceiling_runs_the_workload_on_the_destination_with_preempt(
        fastsnap_workdir: Path, fastsnap_config: FastsnapConfig) -> None:
    """The ceiling's workload row: the destination guest reads and checks the
    pages it was told to (the count its own order gives), timed from the
    destination's RESUME, with postcopy-preempt on both sides."""
    binary = fastsnap_config.qemu_binary
    machine = probe(binary).resolve_machine("q35")
    snap, device_args, _, _ = make_snapshot(24 << 20, binary=binary, workdir=fastsnap_workdir,
                                            machine=machine, log=lambda _msg: None)
    params = TinyParams.from_cmdline(device_args[device_args.index("-append") + 1])
    result = postcopy_ceiling(snap, device_args, binary, fastsnap_workdir,
                              workload=Workload("rand", 100), preempt=True)
    work = result["workload"]
    assert result["preempt"] is True
    assert work["workload"] == "rand:10"
    assert work["pages"] == touch_count(params.pages, 100), work
    assert work["line"].startswith("TOUCH OK"), work
    # RESUME -> TOUCH OK, and no longer than the whole migration took
    assert 0 < work["done_s"] < result["total_s"] + 5, result
    lat = work["latency"]
    assert lat is not None and lat["total_us"] > 0 and lat["faulted"] <= work["pages"], work


class _FailingTiny(TinyGuest):
    def __init__(self) -> None:     # no VM: only touch() is called
        pass

    def touch(self, permille: int, order: str = "seq", timeout: float = 300.0) -> Verdict:
        return Verdict(False, "page 0x1234 holds generation 7, want 3", {})


def test_a_failed_touch_raises_naming_the_run_and_the_page() -> None:
    with pytest.raises(RestoreFailed, match=r"ceiling: workload rand 10%: page 0x1234 holds"):
        touch_workload(_FailingTiny(), Workload("rand", 100), 0.0, "ceiling")


def test_a_guest_without_the_workload_is_refused() -> None:
    with pytest.raises(RestoreFailed, match="ceiling: the workload needs the tiny guest"):
        touch_workload(object(), Workload("seq", 10), 0.0, "ceiling")
