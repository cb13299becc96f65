"""Guest-visible page latency from the tiny guest's ``TOUCH OK`` line.

The tiny guest times the first read of every page its workload touches with
rdtsc (rate calibrated at boot against the PIT; under TCG both follow host
time) and reports, after the old fields::

    TOUCH OK order=rand permille=10 pages=5200 gen=0 us=812345 tsc_khz=2995000
        lat_thresh_us=10 faulted=5100 lat_p50_us=412 lat_p90_us=880
        lat_p99_us=2304 lat_max_us=9120 lat_res=16

``faulted`` counts reads slower than ``lat_thresh_us`` (pages the destination
had to fetch); the percentiles and max are of those reads only.  Percentiles
are histogram bucket lower bounds: exact below 64 us, at most 1/``lat_res``
of an octave low above.  A line from an older guest has none of these
fields: :func:`parse_touch_latency` returns None for it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

_FIELDS = ("us", "tsc_khz", "lat_thresh_us", "faulted", "lat_p50_us", "lat_p90_us",
           "lat_p99_us", "lat_max_us", "lat_res")


@dataclass(frozen=True)
class TouchLatency:
    """One TOUCH's guest-side timing (microseconds unless named otherwise)."""

    total_us: int        # the whole touch loop
    tsc_khz: int         # 0: the guest found no PIT (figures are TSC cycles / 1000)
    thresh_us: int       # a read slower than this counts as faulted
    faulted: int
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    buckets_per_octave: int

    @property
    def tail_ratio(self) -> float | None:
        """p99 / p50 of the faulted reads (None without faulted reads)."""
        return self.p99_us / self.p50_us if self.faulted and self.p50_us else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "p99_over_p50": self.tail_ratio}


def parse_touch_latency(line: str) -> TouchLatency | None:
    """The timing fields of a ``TOUCH OK`` line; None for a line without them
    (an older guest).  ValueError for a line with some but not all of them,
    or with a number that does not parse, naming the field."""
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    present = [f for f in _FIELDS if f in fields]
    if not present:
        return None
    missing = [f for f in _FIELDS if f not in fields]
    if missing:
        raise ValueError(f"TOUCH line has timing fields but lacks {', '.join(missing)}: "
                         f"{line.strip()!r}")
    values: dict[str, int] = {}
    for name in _FIELDS:
        text = fields[name]
        if not text.isdigit():
            raise ValueError(f"TOUCH line: {name}={text!r} is not a whole number: "
                             f"{line.strip()!r}")
        values[name] = int(text)
    return TouchLatency(total_us=values["us"], tsc_khz=values["tsc_khz"],
                        thresh_us=values["lat_thresh_us"], faulted=values["faulted"],
                        p50_us=values["lat_p50_us"], p90_us=values["lat_p90_us"],
                        p99_us=values["lat_p99_us"], max_us=values["lat_max_us"],
                        buckets_per_octave=values["lat_res"])
