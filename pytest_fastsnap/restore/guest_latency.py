"""Request latency as the guest sees it, with and without postcopy-preempt.

The issue #11 goal measurement: a guest restored through ``loader-bridge``
starts a random-touch workload right after RUN, while the eager stream runs
at full speed; the tiny guest times the first read of every page it touches
(:mod:`pytest_fastsnap.guests.touch_latency`), so a read that waited for a
requested page shows the whole round trip the vCPU felt: the fault, QEMU's
page request, the loader, the socket (behind eager pages, or on the preempt
channel), QEMU placing the page and waking the vCPU.

    runs = guest_latency_runs(snap, device_args, binary, workdir, log,
                              Workload("rand", 10), repeat=3)
    runs["preempt"]["p99_us"], runs["no-preempt"]["p99_over_p50"]

Each mode runs *repeat* times, interleaved; figures are medians over runs of
each run's guest-side p50/p99 (and of its own p99/p50).  The loader's eager
throughput is reported beside them, so a change that lowers the tail by
slowing the eager stream shows.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pytest_fastsnap.restore.ceiling import CEILING_WORKLOAD, postcopy_ceiling
from pytest_fastsnap.restore.pinning import pinnable
from pytest_fastsnap.restore.workload import Workload

# (name, restore() options); preempt+pin: the request path and vCPUs on other
# CPUs than the eager stream (.pinning), where the host has two or more
MODES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("no-preempt", {}), ("preempt", {"preempt": True}),
    *((("preempt+pin", {"preempt": True, "pin": "auto"}),) if pinnable() else ()))

# one restore with a workload: bench._one's signature, injected to avoid a cycle
OneRestore = Callable[..., dict[str, Any]]


def median_present(values: Sequence[float | None]) -> float | None:
    """Median of the values that are not None; None if there are none."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over restores of the guest-side figures, plus the loader's."""
    lats = [(r.get("workload") or {}).get("latency") or {} for r in runs]
    loaders = [r.get("loader") or {} for r in runs]
    return {
        "p50_us": median_present([x.get("p50_us") for x in lats]),
        "p90_us": median_present([x.get("p90_us") for x in lats]),
        "p99_us": median_present([x.get("p99_us") for x in lats]),
        "max_us": median_present([x.get("max_us") for x in lats]),
        "p99_over_p50": median_present([x.get("p99_over_p50") for x in lats]),
        "faulted": median_present([x.get("faulted") for x in lats]),
        "done_s": median_present([(r.get("workload") or {}).get("done_s") for r in runs]),
        # the loader's eager stream; a ceiling run's postcopy page rate
        "eager_mib_s": median_present([x.get("eager_throughput_mib_s") or r.get("postcopy_mib_s")
                                       for x, r in zip(loaders, runs, strict=True)]),
        "loaded_s": median_present([r.get("time_to_loaded_s") for r in runs]),
        "holdoff_s": median_present([x.get("eager_holdoff_total_s") for x in loaders]),
        "loader_p50_us": median_present([(x.get("latency_us") or {}).get("p50") for x in loaders]),
        "loader_p99_us": median_present([(x.get("latency_us") or {}).get("p99") for x in loaders]),
        # the loader's p99 split: the request's pread() (where the slow 4 GiB
        # restores show, benchmarks/README.md) and its send() on the preempt channel
        "loader_read_p99_us": median_present([_preempt_p99(x, "read_us") for x in loaders]),
        "loader_send_p99_us": median_present([_preempt_p99(x, "send_us") for x in loaders]),
        "requests": median_present([x.get("requests") for x in loaders]),
        "runs": list(runs),
    }


def _preempt_p99(loader: dict[str, Any], part: str) -> float | None:
    """p99 of one part of the loader's preempt-channel serving time, if any."""
    return ((loader.get("preempt") or {}).get(part) or {}).get("p99")


def guest_latency_runs(one: OneRestore, snap: Path, device_args: Sequence[str], binary: str,
                       workdir: Path, log: Callable[[str], None], workload: Workload,
                       repeat: int, loader_args: Sequence[str] = (),
                       ceiling: bool = False) -> dict[str, Any]:
    """*workload* right after RUN of a loader-bridge restore in each of
    :data:`MODES`, *repeat* times each (interleaved); medians per mode.
    *ceiling*: also the same workload right after the destination's RESUME
    in a QEMU-to-QEMU postcopy migration with preempt (``CEILING_WORKLOAD``):
    what the guest feels with QEMU itself as the source."""
    modes = [name for name, _ in MODES] + ([CEILING_WORKLOAD] if ceiling else [])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for r in range(repeat):
        for name, mode_kw in MODES:
            kw: dict[str, Any] = dict(mode_kw)
            if loader_args:
                kw["loader_args"] = list(loader_args)
            res = one("loader-bridge", snap, device_args, binary, workdir, workload=workload,
                      **kw)
            runs[name].append(res)
            _log_run(log, r, repeat, workload, name, res)
        if ceiling:
            res = postcopy_ceiling(snap, device_args, binary, workdir, workload=workload,
                                   preempt=True)
            runs[CEILING_WORKLOAD].append(res)
            _log_run(log, r, repeat, workload, CEILING_WORKLOAD, res)
    return {"workload": workload.key, "loader_args": list(loader_args), "modes": modes,
            **{name: summarize(these) for name, these in runs.items()}}


def _log_run(log: Callable[[str], None], r: int, repeat: int, workload: Workload, name: str,
             res: dict[str, Any]) -> None:
    lat = res["workload"].get("latency") or {}
    loader = res.get("loader") or {}
    eager = loader.get("eager_throughput_mib_s")
    read, send = _preempt_p99(loader, "read_us"), _preempt_p99(loader, "send_us")
    log(f"  [{r + 1}/{repeat}] guest latency {workload.name}, {name}: "
        f"{lat.get('faulted', 0)} faulted, p50 {lat.get('p50_us', 0)}us "
        f"p99 {lat.get('p99_us', 0)}us max {lat.get('max_us', 0)}us, "
        f"done {res['workload']['done_s']:.3f}s"
        + (f", eager {eager:.0f} MiB/s" if eager else "")
        + (f", loader read/send p99 {read:.0f}/{send:.0f}us"
           if read is not None and send is not None else ""))


def format_rows(results: Sequence[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Table rows (header first) for the bench report; [] without such runs."""
    rows: list[tuple[str, ...]] = [("size", "workload", "channel", "faulted", "guest p50 us",
                                    "guest p99 us", "p99/p50", "max us", "loader p99 us",
                                    "read p99", "send p99", "eager MiB/s", "done s")]
    for res in results:
        gl = res.get("guest_latency")
        if not gl:
            continue
        for name in gl.get("modes", [m for m, _ in MODES]):
            st = gl[name]
            rows.append((f"{res['size_bytes'] >> 20} MiB", gl["workload"], name,
                         fmt_or_dash(st["faulted"], ".0f"), fmt_or_dash(st["p50_us"], ".0f"),
                         fmt_or_dash(st["p99_us"], ".0f"), fmt_or_dash(st["p99_over_p50"], ".2f"),
                         fmt_or_dash(st["max_us"], ".0f"), fmt_or_dash(st["loader_p99_us"], ".0f"),
                         fmt_or_dash(st.get("loader_read_p99_us"), ".0f"),
                         fmt_or_dash(st.get("loader_send_p99_us"), ".0f"),
                         fmt_or_dash(st["eager_mib_s"], ".0f"), fmt_or_dash(st["done_s"], ".3f")))
    return rows if len(rows) > 1 else []


def fmt_or_dash(v: float | None, spec: str = ".3f") -> str:
    """*v* formatted with *spec*, or "-" for a missing figure."""
    return format(v, spec) if v is not None else "-"
