"""What the guest feels after a restore: a memory workload in the tiny guest.

As soon as a restored tiny guest runs, it is told to read and check a share
of its pattern range (``TinyGuest.touch``: ascending or in a seeded random
order); the time from ``migrate-incoming`` to its ``TOUCH OK`` line is the
workload time.  A ``qemu-precopy`` guest runs only after the full load; a
postcopy guest runs at once and faults the pages in as it touches them.

    spec = parse_workloads("rand:10,seq:100")      # [Workload("rand", 100), ...]
    result = run_workload(guest, spec[0])          # after restore(..., wait=True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_fastsnap.restore.strategies import RestoreFailed

if TYPE_CHECKING:
    from pytest_fastsnap.restore.strategies import RestoredGuest



@dataclass(frozen=True)
class Workload:
    order: str          # "seq" | "rand"
    permille: int       # share of the pattern range's pages, 0..1000

    @property
    def name(self) -> str:
        return f"{self.order} {self.permille / 10:g}%"

    @property
    def key(self) -> str:
        return f"{self.order}:{self.permille / 10:g}"


def parse_workloads(text: str) -> list[Workload]:
    """``ORDER:PERCENT[,...]`` (ORDER seq or rand; PERCENT 0.1..100, steps of
    0.1) into workloads; ValueError naming the bad item."""
    out = []
    for item in text.split(","):
        order, sep, pct = item.strip().partition(":")
        try:
            value = float(pct)
        except ValueError:
            value = -1.0
        permille = round(value * 10)
        if not sep or order not in ("seq", "rand") or not 1 <= permille <= 1000 \
                or abs(permille - value * 10) > 1e-6:
            raise ValueError(f"{item!r}: want ORDER:PERCENT with ORDER seq or rand and "
                             "PERCENT from 0.1 to 100 (e.g. rand:10)")
        out.append(Workload(order, permille))
    return out


def run_workload(guest: RestoredGuest, workload: Workload,
                 timeout: float = 900.0) -> dict[str, Any]:
    """Start *workload* in the running restored tiny guest and wait for it:
    ``done_s`` (from migrate-incoming), ``pages``, the guest's line and
    ``latency``: the guest's own timing of each touched page's first read
    (``TouchLatency.as_dict()``: faulted reads, their p50/p90/p99/max in us,
    ``p99_over_p50``; None from a guest that does not report it).
    Raises RestoreFailed when the guest's check of a touched page fails."""
    return touch_workload(guest.agent, workload, guest.t0_wall, guest.strategy, timeout)


def touch_workload(agent: Any, workload: Workload, t0_wall: float, what: str,
                   timeout: float = 900.0) -> dict[str, Any]:
    """*workload* through a running tiny guest's *agent*, ``done_s`` counted
    from *t0_wall* (``time.time()``); figures as :func:`run_workload`'s.
    RestoreFailed (naming *what*) for another guest or a failed page check."""
    from pytest_fastsnap.guests.tiny import TinyGuest

    if not isinstance(agent, TinyGuest):
        raise RestoreFailed(f"{what}: the workload needs the tiny guest")
    verdict = agent.touch(workload.permille, workload.order, timeout=timeout)
    done = time.time() - t0_wall
    if not verdict:
        raise RestoreFailed(f"{what}: workload {workload.name}: {verdict.reason}")
    latency = verdict.details.get("latency")
    return {"workload": workload.key, "done_s": done, "pages": verdict.details["pages"],
            "line": verdict.details["line"],
            "latency": latency.as_dict() if latency is not None else None}


def parse_one_workload(text: str) -> Workload:
    """Exactly one ``ORDER:PERCENT`` workload; ValueError naming what is wrong."""
    found = parse_workloads(text)
    if len(found) != 1:
        raise ValueError(f"{text!r}: one workload, e.g. rand:1")
    return found[0]
