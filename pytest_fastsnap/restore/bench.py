"""Restore benchmark: QEMU full load vs the loader bridge, side by side.

For each guest size: boot a q35 firmware guest, fill its RAM with unique
data pages (mostly-data memory, see fill.py), save it stopped with
mapped-ram, then restore it with each strategy ``repeat`` times and report

- time to running and time to fully loaded (QMP event timestamps, from
  ``migrate-incoming``), and their ratios against ``qemu-precopy``;
- the bridge's eager throughput against a plain sequential read of the
  same page region (warm page cache, 1 MiB reads);
- ``loader-bridge+preempt``: the bridge with the postcopy-preempt channel;
  ``loader-bridge+preempt+pin``: and its request path and the vCPUs on other
  CPUs than its eager stream (``restore(pin="auto")``, :mod:`.pinning`);
- page-request latency p50/p99 from the bridge's own histogram, in a
  separate bridge run where the QEMU main thread reads random not-yet-sent
  pages (HMP ``xp``) while the eager stream is going (an idle firmware
  guest faults on almost nothing by itself);
- per workload and strategy, latency as the guest sees it: the tiny guest
  times the first read of each page it touches (faulted reads, their
  p50/p99 and p99/p50);
- with *guest_latency* (``--guest-latency rand:1``), the goal measurement of
  issue #11: loader-bridge without preempt, with it and with it pinned, the workload started
  right after RUN while the eager stream runs (:mod:`.guest_latency`).

    fastsnap bench --sizes 256M,1G,4G --repeat 3
    python benchmarks/bench_restore.py --sizes 256M

The PNG needs matplotlib (``pip install 'pytest-fastsnap[bench]'``); without
it the table and the JSON are still written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_fastsnap.guests.fill import data_ranges, fill_guest_ram, lowmem_size
from pytest_fastsnap.guests.tiny import TinyGuest, TinyParams, tiny_args, tiny_kernel
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.migration import save_snapshot
from pytest_fastsnap.qemu.probe import probe
from pytest_fastsnap.restore.ceiling import CEILING_WORKLOAD, postcopy_ceiling
from pytest_fastsnap.restore.guest_latency import fmt_or_dash as _fmt
from pytest_fastsnap.restore.guest_latency import format_rows as guest_latency_rows
from pytest_fastsnap.restore.guest_latency import guest_latency_runs
from pytest_fastsnap.restore.guest_latency import median_present as _med
from pytest_fastsnap.restore.host_memory import describe as describe_memory
from pytest_fastsnap.restore.host_memory import memory_state, memory_state_delta
from pytest_fastsnap.restore.pinning import pinnable
from pytest_fastsnap.restore.strategies import (
    STRATEGIES,
    RestoredGuest,
    RestoreUnsupported,
    loader_binary,
    machine_factory,
    restore,
    use_loader,
)
from pytest_fastsnap.restore.workload import Workload, run_workload
from pytest_fastsnap.snapshot.format import parse

MiB = 1 << 20
BRIDGE = "loader-bridge"
# The bridge with QEMU's postcopy-preempt channel: requested pages do not
# queue behind the eager stream (restore(..., preempt=True)).
BRIDGE_PREEMPT = "loader-bridge+preempt"
# ... and with the request path and vCPUs on other CPUs than the eager stream
# (restore(..., pin="auto"); needs two CPUs: see .pinning)
BRIDGE_PREEMPT_PIN = "loader-bridge+preempt+pin"
_VARIANTS: dict[str, dict[str, Any]] = {BRIDGE_PREEMPT: {"preempt": True},
                                        BRIDGE_PREEMPT_PIN: {"preempt": True, "pin": "auto"}}
BENCH_STRATEGIES = (*STRATEGIES, *_VARIANTS)
DEFAULT_STRATEGIES = ("qemu-precopy", BRIDGE, BRIDGE_PREEMPT,
                      *((BRIDGE_PREEMPT_PIN,) if pinnable() else ()))
DEFAULT_RESULTS = Path("fastsnap-bench-results")  # relative: under the current directory


def matplotlib_missing() -> str | None:
    """None when the PNG can be drawn, else why not (one line, with the fix)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("matplotlib is not installed: writing the table and JSON, no PNG "
                "(pip install 'pytest-fastsnap[bench]')")
    return None


def _pc_ram_region(path: Path) -> tuple[int, int]:
    """(pages_offset, used_length) of pc.ram, from the Python reader."""
    pages = parse(path).block("pc.ram").pages_range
    return pages.start, pages.size


def sequential_read_mib_s(path: Path, offset: int, length: int, chunk: int = MiB) -> float:
    """Plain sequential read throughput of [offset, offset+length) (warm cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(chunk)
        view = memoryview(buf)
        t = time.perf_counter()
        pos = 0
        while pos < length:
            n = os.preadv(fd, [view[:min(chunk, length - pos)]], offset + pos)
            if n <= 0:
                break
            pos += n
        return pos / (time.perf_counter() - t) / MiB
    finally:
        os.close(fd)


def _probe_demand(guest: RestoredGuest, ranges: list[tuple[int, int]], count: int,
                  out: list[float]) -> None:
    """Read random pages from the top of guest RAM (last to be streamed) via
    HMP `xp` until *count* reads or the loader is done; keep round-trip times."""
    rng = random.Random(7)
    gpa, length = ranges[-1]
    top = [gpa + length - (i + 1) * 4096 for i in range(min(length // 4096, 65536))]
    rng.shuffle(top)
    for addr in top[:count]:
        if guest.loader is None or guest.loader.poll() is not None:
            return
        t = time.perf_counter()
        guest.vm.hmp(f"xp /1xg {addr:#x}")
        out.append((time.perf_counter() - t) * 1e6)


def bench_strategy(name: str) -> tuple[str, dict[str, Any]]:
    """A bench strategy name as (restore strategy, its restore() options)."""
    if name not in BENCH_STRATEGIES:
        raise ValueError(f"unknown bench strategy {name!r}; one of {', '.join(BENCH_STRATEGIES)}")
    return (BRIDGE, dict(_VARIANTS[name])) if name in _VARIANTS else (name, {})


def _one(strategy: str, snap: Path, device_args: Sequence[str], binary: str, workdir: Path,
         *, probes: int = 0, ranges: list[tuple[int, int]] | None = None,
         workload: Workload | None = None, eager_hold: float = 0.0,
         **restore_kw: Any) -> dict[str, Any]:
    """One restore with bench strategy *strategy* (:data:`BENCH_STRATEGIES`);
    with *eager_hold* the bridge serves only requests until the workload is
    done (``--eager-delay``, ended by SIGUSR1)."""
    strategy, variant_kw = bench_strategy(strategy)
    restore_kw = {**variant_kw, **restore_kw}
    if eager_hold:
        restore_kw["loader_args"] = [*restore_kw.get("loader_args", ()),
                                     "--eager-delay", f"{eager_hold:g}"]
    guest = restore(strategy, snap, device_args, machine_factory(binary, workdir, name=strategy),
                    timeout=600, **restore_kw)
    try:
        rtts: list[float] = []
        prober = None
        work = run_workload(guest, workload) if workload is not None else None
        if eager_hold and guest.loader is not None and guest.loader.poll() is None:
            guest.loader.send_signal(signal.SIGUSR1)
        if probes and ranges:
            prober = threading.Thread(target=_probe_demand, args=(guest, ranges, probes, rtts))
            prober.start()
        guest.wait_loaded(timeout=900)
        if prober is not None:
            prober.join()
        guest.blocktime()
        result = guest.summary()
        if work is not None:
            result["workload"] = work
        if rtts:
            rtts.sort()
            result["probe_rtt_us"] = {"count": len(rtts), "p50": rtts[len(rtts) // 2],
                                      "p99": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]}
        return result
    finally:
        guest.close()


def bench_params(machine: str, size: int) -> TinyParams:
    """The tiny guest's pattern range for a *size* guest: from 4 MiB to the
    top of low memory less 16 MiB (the firmware's tables), all data pages."""
    low = lowmem_size(machine, size)
    return TinyParams(seed=0xB3C4, start=4 * MiB, size=low - 16 * MiB - 4 * MiB,
                      zero_ratio=0.0)


def make_snapshot(size: int, *, binary: str, workdir: Path, machine: str,
                  log: Any) -> tuple[Path, list[str], list[tuple[int, int]], float]:
    """Boot the tiny guest (its range filled by itself), fill RAM above 4 GiB
    from the host, save stopped; (snapshot, device args, data ranges, save s)."""
    params = bench_params(machine, size)
    src = QemuMachine(binary, workdir, name=f"src{size >> 20}", mem=f"{size >> 20}M",
                      machine=machine, qmp_timeout=600,
                      extra_args=tiny_args(tiny_kernel(), params))
    src.launch()
    try:
        t = time.monotonic()
        TinyGuest(src, params).wait_ready(60 + size / (64 * MiB))
        src.qmp("stop")
        ranges = [(params.start, params.size)]
        high = [(gpa, off, n) for gpa, off, n in data_ranges(machine, size) if gpa >= 4 << 30]
        if high:
            ranges += fill_guest_ram(src, machine, size, only=high)
        fill_s = time.monotonic() - t
        snap = workdir / f"snap-{size >> 20}M.img"
        saved = save_snapshot(src, snap, timeout=900)
        # Let writeback finish now, not during the restores being timed.
        fd = os.open(snap, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        device_args = list(src.device_args)
    finally:
        src.shutdown()
    data_bytes = sum(n for _, n in ranges)
    log(f"{size >> 20} MiB: tiny guest filled {data_bytes / size:.0%} in {fill_s:.1f}s, "
        f"saved in {saved.save_seconds:.1f}s ({snap.stat().st_size >> 20} MiB file)")
    return snap, device_args, ranges, saved.save_seconds


def _blocktime_ms(run: dict[str, Any]) -> float | None:
    bt = run.get("blocktime") or {}
    return float(bt["total_ms"]) if bt.get("total_ms") is not None else None


def bench_size(size: int, *, binary: str, workdir: Path, repeat: int,
               strategies: Sequence[str], probes: int, log: Any,
               machine: str = "q35", workloads: Sequence[Workload] = (),
               ceiling: bool = True, ws: bool = True,
               guest_latency: Workload | None = None,
               guest_latency_loader_args: Sequence[str] = ()) -> dict[str, Any]:
    snap, device_args, ranges, save_s = make_snapshot(size, binary=binary, workdir=workdir,
                                                      machine=machine, log=log)
    data_bytes = sum(n for _, n in ranges)
    pages_offset, length = _pc_ram_region(snap)
    seq = [sequential_read_mib_s(snap, pages_offset, length) for _ in range(max(1, repeat))]
    runs: dict[str, list[dict[str, Any]]] = {}
    ceil_runs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}

    def one(strategy: str, **kw: Any) -> dict[str, Any] | None:
        if strategy in skipped:
            return None
        try:
            return _one(strategy, snap, device_args, binary, workdir, **kw)
        except RestoreUnsupported as err:
            skipped[strategy] = err.reason
            log(f"  {strategy}: skipped: {err.reason}")
            return None

    for r in range(repeat):
        for strategy in strategies:     # interleaved, so drift hits all alike
            res = one(strategy)
            runs.setdefault(strategy, [])
            if res is None:
                continue
            runs[strategy].append(res)
            bt = _blocktime_ms(res)
            log(f"  [{r + 1}/{repeat}] {strategy}: running {res['time_to_running_s']:.3f}s, "
                f"loaded {res['time_to_loaded_s']:.3f}s"
                + (f", blocktime {bt:.0f} ms" if bt is not None else ""))
        if ceiling:     # in the same round, so the host's drift hits it as it hits them
            c = postcopy_ceiling(snap, device_args, binary, workdir)
            ceil_runs.append(c)
            log(f"  [{r + 1}/{repeat}] ceiling: QEMU-to-QEMU postcopy "
                f"{c['postcopy_mib_s']:.0f} MiB/s ({c['postcopy_bytes'] >> 20} MiB in "
                f"{c['postcopy_s']:.2f}s)")
    work: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in range(repeat):
        for wl in workloads:
            for strategy in strategies:
                res = one(strategy, workload=wl)
                if res is None:
                    continue
                work.setdefault(wl.key, {}).setdefault(strategy, []).append(res)
                bt = _blocktime_ms(res)
                log(f"  [{r + 1}/{repeat}] workload {wl.name}, {strategy}: done "
                    f"{res['workload']['done_s']:.3f}s"
                    + (f", blocktime {bt:.0f} ms" if bt is not None else ""))
            if ceiling:     # the same workload with QEMU as the postcopy source
                res = postcopy_ceiling(snap, device_args, binary, workdir, workload=wl,
                                       preempt=True)
                work.setdefault(wl.key, {}).setdefault(CEILING_WORKLOAD, []).append(res)
                log(f"  [{r + 1}/{repeat}] workload {wl.name}, {CEILING_WORKLOAD}: done "
                    f"{res['workload']['done_s']:.3f}s, blocktime "
                    f"{_blocktime_ms(res) or 0:.0f} ms")
    ceil = None
    if ceiling:
        ceil = {"postcopy_mib_s": _med([c["postcopy_mib_s"] for c in ceil_runs]),
                "postcopy_bytes": ceil_runs[0]["postcopy_bytes"], "runs": ceil_runs}
    ws_runs = None
    if ws and "loader-bridge" in strategies and "loader-bridge" not in skipped:
        ws_runs = working_set_runs(snap, device_args, binary, workdir, log,
                                   Workload("rand", 100), repeat)
    glat = None
    if guest_latency is not None and "loader-bridge" in strategies \
            and "loader-bridge" not in skipped:
        glat = guest_latency_runs(_one, snap, device_args, binary, workdir, log,
                                  guest_latency, repeat, guest_latency_loader_args,
                                  ceiling=ceiling)
    demand = None
    if probes and "loader-bridge" in strategies and "loader-bridge" not in skipped:
        demand = _one("loader-bridge", snap, device_args, binary, workdir, probes=probes,
                      ranges=ranges)
        lat = (demand.get("loader") or {}).get("latency_us", {})
        log(f"  demand run: {lat.get('count', 0)} requests served, p50 {lat.get('p50', 0):.0f}us "
            f"p99 {lat.get('p99', 0):.0f}us")
    snap.unlink(missing_ok=True)

    summary: dict[str, Any] = {"size_bytes": size, "data_bytes": data_bytes, "save_s": save_s,
                               "sequential_read_mib_s": statistics.median(seq),
                               "strategies": {}, "skipped": skipped, "workloads": {},
                               "ceiling": ceil}
    for strategy, these in runs.items():
        if not these:
            continue
        entry: dict[str, Any] = {
            "time_to_running_s": _med([x["time_to_running_s"] for x in these]),
            "time_to_loaded_s": _med([x["time_to_loaded_s"] for x in these]),
            "blocktime_ms": _med([_blocktime_ms(x) for x in these]),
            "runs": these}
        loader_runs = [x["loader"] for x in these if x.get("loader")]
        if loader_runs:
            entry["eager_throughput_mib_s"] = statistics.median(
                x["eager_throughput_mib_s"] for x in loader_runs)
            entry["loader_time_to_run_sent_s"] = statistics.median(
                x["time_to_run_sent_s"] for x in loader_runs)
        summary["strategies"][strategy] = entry
    for key, per in work.items():
        summary["workloads"][key] = {
            strategy: {"done_s": _med([x["workload"]["done_s"] for x in these]),
                       "blocktime_ms": _med([_blocktime_ms(x) for x in these]),
                       **_guest_figures(these),
                       "runs": these}
            for strategy, these in per.items()}
    if ws_runs is not None:
        summary["working_set"] = ws_runs
    if glat is not None:
        summary["guest_latency"] = glat
    if demand is not None:
        summary["demand_run"] = demand
    return summary


def working_set_runs(snap: Path, device_args: Sequence[str], binary: str, workdir: Path,
                     log: Any, workload: Workload, repeat: int = 1) -> dict[str, Any]:
    """Working-set prefetch: a bridge restore running *workload* records the
    pages it requested (``--record-ws``; the eager stream held back until the
    workload is done, so every page it touched is requested); then the same
    restore and workload again without the file, and with it sent before /
    right after RUN (*repeat* times each, interleaved; medians)."""
    ws_file = workdir / f"{snap.stem}.ws"
    out: dict[str, Any] = {"workload": workload.key}
    try:
        rec = _one("loader-bridge", snap, device_args, binary, workdir, workload=workload,
                   record_ws=ws_file, eager_hold=600.0)
        out["record"] = rec
        out["ws_pages"] = (rec.get("loader") or {}).get("ws_recorded", 0)
        modes: list[tuple[str, dict[str, Any]]] = [
            ("none", {}), ("before-run", {"ws": ws_file, "ws_mode": "before-run"}),
            ("after-run", {"ws": ws_file, "ws_mode": "after-run"})]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in modes}
        for r in range(repeat):
            for name, kw in modes:
                res = _one("loader-bridge", snap, device_args, binary, workdir,
                           workload=workload, **kw)
                runs[name].append(res)
                log(f"  [{r + 1}/{repeat}] working set {name}: {workload.name} done "
                    f"{res['workload']['done_s']:.3f}s, blocktime "
                    f"{_blocktime_ms(res) or 0:.0f} ms")
        for name, these in runs.items():
            out[name] = {"done_s": _med([x["workload"]["done_s"] for x in these]),
                         "blocktime_ms": _med([_blocktime_ms(x) for x in these]),
                         "runs": these}
    finally:
        ws_file.unlink(missing_ok=True)
    return out


def _guest_figures(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over restores of the guest-timed first reads: faulted count,
    p50/p99 (us) and each run's p99/p50."""
    lats = [(x.get("workload") or {}).get("latency") or {} for x in runs]
    return {"guest_faulted": _med([x.get("faulted") for x in lats]),
            "guest_p50_us": _med([x.get("p50_us") for x in lats]),
            "guest_p99_us": _med([x.get("p99_us") for x in lats]),
            "guest_p99_over_p50": _med([x.get("p99_over_p50") for x in lats])}


def _round_ratios(runs: Sequence[dict[str, Any]], ceil_runs: Sequence[dict[str, Any]]
                  ) -> list[str]:
    """Each round's eager throughput over the ceiling measured in that round
    (bench_size runs the ceiling after each round of strategies)."""
    if len(runs) != len(ceil_runs):     # a strategy skipped mid-way: no pairing
        return []
    return [_ratio((r.get("loader") or {}).get("eager_throughput_mib_s"), c.get("postcopy_mib_s"))
            for r, c in zip(runs, ceil_runs, strict=True)]


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _grid(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_table(results: list[dict[str, Any]]) -> str:
    rows = [("size", "strategy", "running s", "loaded s", "run vs precopy", "loaded vs precopy",
             "blocktime ms", "eager MiB/s", "seq read MiB/s", "req p50 us", "req p99 us")]
    for res in results:
        base = res["strategies"].get("qemu-precopy", {})
        lat = ((res.get("demand_run") or {}).get("loader") or {}).get("latency_us", {})
        for name, st in res["strategies"].items():
            is_bridge = name == BRIDGE     # the demand run is a plain bridge restore
            rows.append((
                f"{res['size_bytes'] >> 20} MiB", name,
                _fmt(st["time_to_running_s"]), _fmt(st["time_to_loaded_s"]),
                _ratio(st["time_to_running_s"], base.get("time_to_running_s")),
                _ratio(st["time_to_loaded_s"], base.get("time_to_loaded_s")),
                _fmt(st.get("blocktime_ms"), ".0f"),
                f"{st['eager_throughput_mib_s']:.0f}" if "eager_throughput_mib_s" in st
                else (f"{res['data_bytes'] / MiB / st['time_to_loaded_s']:.0f}*"
                      if st["time_to_loaded_s"] else "-"),
                f"{res['sequential_read_mib_s']:.0f}",
                f"{lat.get('p50', 0):.0f}" if is_bridge and lat else "-",
                f"{lat.get('p99', 0):.0f}" if is_bridge and lat else "-",
            ))
    lines = _grid(rows)
    lines.append("(* qemu-precopy: data bytes / time to loaded; ratios: this strategy's time "
                 "/ qemu-precopy's, < 1 is faster; blocktime: QEMU's postcopy-blocktime)")
    work = [("size", "workload", "strategy", "done s", "vs precopy", "blocktime ms",
             "faulted", "guest p50 us", "guest p99 us", "p99/p50")]
    for res in results:
        for key, per in res.get("workloads", {}).items():
            base = (per.get("qemu-precopy") or {}).get("done_s")
            for name, st in per.items():
                work.append((f"{res['size_bytes'] >> 20} MiB", key, name, _fmt(st["done_s"]),
                             _ratio(st["done_s"], base), _fmt(st["blocktime_ms"], ".0f"),
                             _fmt(st.get("guest_faulted"), ".0f"),
                             _fmt(st.get("guest_p50_us"), ".0f"),
                             _fmt(st.get("guest_p99_us"), ".0f"),
                             _fmt(st.get("guest_p99_over_p50"), ".2f")))
    if len(work) > 1:
        lines += ["", "workload: migrate-incoming -> the guest's TOUCH OK (pages read and "
                  "checked); faulted: first reads slower than 10 us in the guest's own "
                  "timing, p50/p99 of those; " f"{CEILING_WORKLOAD}: the ceiling's "
                  "QEMU-to-QEMU postcopy with preempt, from the destination's RESUME",
                  *_grid(work)]
    glat = guest_latency_rows(results)
    if glat:
        lines += ["", "guest-visible request latency (loader-bridge, workload started right "
                  "after RUN while the eager stream runs; " f"{CEILING_WORKLOAD}: QEMU as the "
                  "postcopy source, from the destination's RESUME; medians over --repeat)",
                  *_grid(glat)]
    ws = [("size", "workload", "prefetch", "done s", "vs none", "blocktime ms")]
    for res in results:
        w = res.get("working_set")
        if not w:
            continue
        for mode in ("none", "before-run", "after-run"):
            ws.append((f"{res['size_bytes'] >> 20} MiB", w["workload"], mode,
                       _fmt(w[mode]["done_s"]), _ratio(w[mode]["done_s"], w["none"]["done_s"]),
                       _fmt(w[mode]["blocktime_ms"], ".0f")))
    if len(ws) > 1:
        lines += ["", "working-set prefetch (loader-bridge, second restore; ws recorded by "
                  "the first)", *_grid(ws)]
    for res in results:
        for name, why in (res.get("skipped") or {}).items():
            lines.append(f"{res['size_bytes'] >> 20} MiB: {name} skipped: {why}")
        ceil = res.get("ceiling")
        for name, st in res["strategies"].items():
            eager = st.get("eager_throughput_mib_s")
            if ceil and ceil.get("postcopy_mib_s") and eager:
                rounds = _round_ratios(st["runs"], ceil["runs"])
                lines.append(f"{res['size_bytes'] >> 20} MiB: ceiling (QEMU-to-QEMU postcopy) "
                             f"{ceil['postcopy_mib_s']:.0f} MiB/s; {name} eager "
                             f"{eager:.0f} MiB/s = "
                             f"{_ratio(eager, ceil['postcopy_mib_s'])} of the ceiling"
                             + (f" (round by round: {', '.join(rounds)})" if rounds else ""))
        for key, per in res.get("workloads", {}).items():
            b = (per.get("qemu-precopy") or {}).get("done_s")
            q = (per.get(CEILING_WORKLOAD) or {}).get("done_s")
            for name, st in per.items():
                a = st.get("done_s")
                if name != "qemu-precopy" and a and b:
                    lines.append(f"{res['size_bytes'] >> 20} MiB: workload {key}%: {name} "
                                 f"{a:.3f}s vs qemu-precopy {b:.3f}s = {a / b:.2f}x"
                                 + (f"; vs QEMU as the postcopy source {q:.3f}s = {a / q:.2f}x"
                                    if q and name != CEILING_WORKLOAD else ""))
    return "\n".join(lines)


def log_limits(values: Sequence[float | None]) -> tuple[float, float]:
    """Log-axis limits that show every positive value: half the smallest below,
    and room above the largest for its label (x4: about two label heights on
    the plot's scale)."""
    positive = [v for v in values if v and v > 0]
    if not positive:
        return 0.1, 1.0
    return min(positive) / 2, max(positive) * 4


def linear_limits(values: Sequence[float | None]) -> tuple[float, float]:
    """Linear-axis limits from 0 (a zero bar is its label) to above the largest."""
    top = max([v for v in values if v is not None] + [0.0])
    return 0.0, (top * 1.3) if top > 0 else 1.0


def _panels(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What each subplot shows: groups (x labels), one value list per series."""
    sizes = [f"{r['size_bytes'] >> 20} MiB" for r in results]
    strategies = sorted({s for r in results for s in r["strategies"]})
    panels = []
    for key, title in (("time_to_running_s", "time to running"),
                       ("time_to_loaded_s", "time to fully loaded")):
        panels.append({"title": title, "log": True, "unit": "s", "groups": sizes,
                       "series": {s: [(r["strategies"].get(s) or {}).get(key) for r in results]
                                  for s in strategies}})
    groups = [(r, w) for r in results for w in r.get("workloads", {})]
    labels = [f"{r['size_bytes'] >> 20} MiB\n{w}%" for r, w in groups]
    work_strategies = sorted({s for r, w in groups for s in r["workloads"][w]})
    title = "workload done (from migrate-incoming" + (
        f"; {CEILING_WORKLOAD}: from the destination's RESUME)"
        if CEILING_WORKLOAD in work_strategies else ")")
    panels.append({"title": title, "log": True, "unit": "s",
                   "groups": labels,
                   "series": {s: [(r["workloads"][w].get(s) or {}).get("done_s")
                                  for r, w in groups] for s in work_strategies}})
    post = [s for s in work_strategies if s != "qemu-precopy"]
    panels.append({"title": "vCPU blocktime during the workload", "log": False, "unit": "ms",
                   "groups": labels,
                   "series": {s: [(r["workloads"][w].get(s) or {}).get("blocktime_ms")
                                  for r, w in groups] for s in post}})
    return [p for p in panels if p["groups"] and p["series"]]


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Bar charts of time to running, time to fully loaded, workload time and
    blocktime, saved to *path*.  Every bar lies inside its axes: log axes
    from half the smallest value (a ~0.01 s bar shows), blocktime (which can
    be 0) on a linear axis from 0; every bar carries its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(results)
    # the two time panels side by side; workload panels (many groups) full width
    mosaic = [[0, 1]] + [[i, i] for i in range(2, len(panels))]
    fig, axd = plt.subplot_mosaic(mosaic, figsize=(14, 4.6 * len(mosaic)),
                                  layout="constrained")
    for n, panel in enumerate(panels):
        ax = axd[n]
        series = panel["series"]
        width = 0.8 / max(1, len(series))
        shown: list[float | None] = []
        for i, (name, vals) in enumerate(series.items()):
            present = [(x + i * width, v) for x, v in enumerate(vals) if v is not None]
            shown += [v for _, v in present]    # a missing value draws no bar
            bars = ax.bar([x for x, _ in present], [v for _, v in present], width,
                          label=name)
            ax.bar_label(bars, labels=[f"{v:.3g}" for _, v in present], fontsize=7)
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(panel["groups"]))],
                      panel["groups"], fontsize=8)
        if panel["log"]:
            ax.set_yscale("log")
            ax.set_ylim(*log_limits(shown))
            ax.set_ylabel(f"{panel['unit']} (log)")
        else:
            ax.set_ylim(*linear_limits(shown))
            ax.set_ylabel(panel["unit"])
        ax.set_title(panel["title"])
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("mapped-ram restore: QEMU full load vs loader bridge (TCG, warm cache)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(sizes: Sequence[int] = (256 * MiB, 1 << 30, 4 << 30), *,
              binary: str = "qemu-system-x86_64", repeat: int = 3,
              strategies: Sequence[str] = DEFAULT_STRATEGIES,
              probes: int = 200, results_dir: Path | None = None,
              workdir: Path | None = None, verbose: bool = True,
              draw: bool = True, machine: str = "q35",
              workloads: Sequence[Workload] = (), ceiling: bool = True,
              ws: bool = True, guest_latency: Workload | None = None,
              guest_latency_loader_args: Sequence[str] = ()) -> dict[str, Any]:
    """Run the benchmark; write JSON and (with *draw*) a PNG to *results_dir*
    (default ``./fastsnap-bench-results``); return the report.

    An alias *machine* runs as the binary's versioned type (q35 -> pc-q35-10.0),
    so the report names the exact type and its snapshots load on newer QEMUs."""
    def log(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    binary = shutil.which(binary) or binary
    machine = probe(binary).resolve_machine(machine)
    results_dir = (Path(results_dir) if results_dir else DEFAULT_RESULTS).absolute()
    results_dir.mkdir(parents=True, exist_ok=True)
    own_workdir = workdir is None
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fsbench-", dir="/var/tmp"))
    results = []
    mem_before = memory_state()
    loader = loader_binary()      # one binary for the whole run (use_loader)
    try:
        with use_loader(loader):
            log(f"loader: {loader}; QEMU: {binary}; machine {machine}; accel tcg")
            log(describe_memory(mem_before))
            for size in sizes:
                results.append(bench_size(
                    size, binary=binary, workdir=work, repeat=repeat, strategies=strategies,
                    probes=probes, log=log, machine=machine, workloads=workloads,
                    ceiling=ceiling, ws=ws, guest_latency=guest_latency,
                    guest_latency_loader_args=guest_latency_loader_args))
    finally:
        if own_workdir:
            shutil.rmtree(work, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {"binary": binary, "loader": str(loader), "machine": machine, "accel": "tcg",
              "repeat": repeat,
              "host_cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "host_memory": memory_state_delta(mem_before, memory_state()),
              "results": results, "table": format_table(results)}
    json_path = results_dir / f"bench-restore-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    report["json_path"] = str(json_path)
    if draw:
        png_path = results_dir / f"bench-restore-{stamp}.png"
        plot(results, png_path)
        report["png_path"] = str(png_path)
    log("\n" + report["table"])
    log("\n" + describe_memory(report["host_memory"]))
    log(f"\nwrote {json_path}" + (f"\n      {report['png_path']}" if draw else ""))
    return report
