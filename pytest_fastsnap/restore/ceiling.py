"""The postcopy ceiling: a QEMU-to-QEMU postcopy migration of a restored guest.

Any postcopy source (the loader bridge included) feeds the same destination
code: the listen thread places every page with its own UFFDIO_COPY.  So the
page rate QEMU reaches when QEMU is the source is what a postcopy source can
reach on this destination.  The guest is the snapshot's, restored with a
full load into a source QEMU and left running; a destination with
``postcopy-ram`` (and ``postcopy-blocktime``) takes it over a unix socket,
and the source switches to postcopy at once (``migrate-start-postcopy``
right after ``migrate``, precopy capped at 1 MiB/s meanwhile), so nearly
all pages travel in postcopy's background stream, which is not capped.

With a *workload*, the destination guest is told to run it the moment it
runs (the destination's RESUME), with ``postcopy-preempt`` on both sides
when *preempt*: what the guest feels with QEMU as the postcopy source, the
bound for any postcopy source of this destination (the loader bridge's
workload and guest-latency rows are compared with it).

    result = postcopy_ceiling(snap, device_args, binary, workdir)
    result["postcopy_mib_s"]     # postcopy bytes / (completed - postcopy-active)
    result = postcopy_ceiling(snap, device_args, binary, workdir,
                              workload=Workload("rand", 100), preempt=True)
    result["workload"]["done_s"] # destination's RESUME -> the guest's TOUCH OK
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_fastsnap.guests import guest_agent
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.migration import set_capabilities, set_parameters, wait_migration
from pytest_fastsnap.restore.strategies import (
    RestoreFailed,
    machine_factory,
    restore,
)
from pytest_fastsnap.restore.workload import Workload, touch_workload

MiB = 1 << 20
# the name the bench's workload and guest-latency rows give the ceiling run
# that carries a workload (QEMU as the postcopy source, preempt on)
CEILING_WORKLOAD = "qemu-postcopy+preempt"


def _event_time(ev: dict[str, Any]) -> float:
    ts = ev["timestamp"]
    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


def postcopy_ceiling(snapshot: Path, device_args: Sequence[str], binary: str, workdir: Path,
                     *, timeout: float = 600.0, workload: Workload | None = None,
                     preempt: bool = False) -> dict[str, Any]:
    """Migrate the restored snapshot QEMU-to-QEMU in postcopy; return its
    figures: ``postcopy_mib_s`` (postcopy bytes / postcopy time, the
    destination's own event timestamps), ``postcopy_s``, ``total_s``,
    ``postcopy_bytes``, ``pages``, the destination's ``blocktime``,
    ``preempt`` and, with *workload*, ``workload``: ``done_s`` (from the
    destination's RESUME to the guest's TOUCH OK), ``pages``, ``line``,
    ``latency`` (the guest-timed first reads, as ``run_workload`` gives).
    RestoreFailed if the guest's check of a touched page fails."""
    source = restore("qemu-precopy", snapshot, device_args,
                     machine_factory(binary, workdir, name="ceiling-src"), timeout=timeout)
    # our pid in the name: workdirs.sweep_stale removes it if we are SIGKILLed
    sock_dir = Path(tempfile.mkdtemp(prefix=f"fsb-{os.getpid()}-", dir="/tmp"))
    dst = QemuMachine(binary, workdir, name="ceiling-dst", incoming="defer",
                      device_args=device_args, qmp_timeout=timeout)
    try:
        dst.launch()
        set_capabilities(dst, {"postcopy-ram": True, "postcopy-blocktime": True,
                               **_preempt(preempt), "events": True})
        src = source.vm
        set_capabilities(src, {"mapped-ram": False, "postcopy-ram": True,
                               **_preempt(preempt), "events": True})
        # A low precopy cap (1 MiB/s) keeps QEMU from finishing a small guest
        # in precopy before the switch (its threshold is bandwidth x downtime);
        # postcopy's own cap, max-postcopy-bandwidth, is 0: unlimited.
        set_parameters(src, {"max-bandwidth": 1 << 20, "max-postcopy-bandwidth": 0})
        sock = sock_dir / "m.sock"
        mark = dst.qmp_connection.event_mark()
        dst.qmp("migrate-incoming", uri=f"unix:{sock}")
        t0 = time.time()
        src.qmp("migrate", uri=f"unix:{sock}")
        src.qmp("migrate-start-postcopy")
        touched = _run_workload(dst, workload, mark, timeout) if workload is not None else None
        info = wait_migration(src, "ceiling migration", timeout)
        wait_migration(dst, "ceiling destination", timeout)
        events = [e for e in dst.qmp_connection.events_since(mark)
                  if e.get("event") == "MIGRATION"]
        times = {e["data"]["status"]: _event_time(e) for e in events}
        if "postcopy-active" not in times or "completed" not in times:
            raise RestoreFailed(f"ceiling: the destination never reported postcopy-active "
                                f"and completed (events: {sorted(times)})")
        ram = info.get("ram", {})
        post_s = times["completed"] - times["postcopy-active"]
        post_bytes = int(ram.get("postcopy-bytes", 0))
        dinfo = dst.qmp("query-migrate")
        return {"postcopy_s": post_s, "total_s": times["completed"] - t0,
                "postcopy_bytes": post_bytes, "pages": int(ram.get("normal", 0)),
                "postcopy_mib_s": post_bytes / MiB / post_s if post_s > 0 else None,
                "blocktime": {"total_ms": dinfo.get("postcopy-blocktime"),
                              "vcpu_ms": dinfo.get("postcopy-vcpu-blocktime")},
                "preempt": preempt, **({"workload": touched} if touched is not None else {})}
    finally:
        dst.kill()
        source.close(kill=True)
        shutil.rmtree(sock_dir, ignore_errors=True)


def _preempt(on: bool) -> dict[str, bool]:
    """The preempt capability when wanted (left alone otherwise)."""
    return {"postcopy-preempt": True} if on else {}


def _run_workload(dst: QemuMachine, workload: Workload, mark: int,
                  timeout: float) -> dict[str, Any]:
    """*workload* in the destination guest, timed from its RESUME."""
    resumed = _event_time(dst.wait_event("RESUME", timeout=timeout, since=mark))
    return touch_workload(guest_agent(dst), workload, resumed, "ceiling", timeout)
