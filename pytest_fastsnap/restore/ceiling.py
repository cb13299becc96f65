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

    result = postcopy_ceiling(snap, device_args, binary, workdir)
    result["postcopy_mib_s"]     # postcopy bytes / (completed - postcopy-active)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.migration import set_capabilities, set_parameters, wait_migration
from pytest_fastsnap.restore.strategies import (
    RestoreFailed,
    machine_factory,
    restore,
)

MiB = 1 << 20


def _event_time(ev: dict[str, Any]) -> float:
    ts = ev["timestamp"]
    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


def postcopy_ceiling(snapshot: Path, device_args: Sequence[str], binary: str, workdir: Path,
                     *, timeout: float = 600.0) -> dict[str, Any]:
    """Migrate the restored snapshot QEMU-to-QEMU in postcopy; return its
    figures: ``postcopy_mib_s`` (postcopy bytes / postcopy time, the
    destination's own event timestamps), ``postcopy_s``, ``total_s``,
    ``postcopy_bytes``, ``pages`` and the destination's ``blocktime``."""
    source = restore("qemu-precopy", snapshot, device_args,
                     machine_factory(binary, workdir, name="ceiling-src"), timeout=timeout)
    # our pid in the name: workdirs.sweep_stale removes it if we are SIGKILLed
    sock_dir = Path(tempfile.mkdtemp(prefix=f"fsb-{os.getpid()}-", dir="/tmp"))
    dst = QemuMachine(binary, workdir, name="ceiling-dst", incoming="defer",
                      device_args=device_args, qmp_timeout=timeout)
    try:
        dst.launch()
        set_capabilities(dst, {"postcopy-ram": True, "postcopy-blocktime": True,
                               "events": True})
        src = source.vm
        set_capabilities(src, {"mapped-ram": False, "postcopy-ram": True, "events": True})
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
                              "vcpu_ms": dinfo.get("postcopy-vcpu-blocktime")}}
    finally:
        dst.kill()
        source.close(kill=True)
        shutil.rmtree(sock_dir, ignore_errors=True)
