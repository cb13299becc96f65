"""Restore benchmark: QEMU full load vs the loader bridge, side by side.

For each guest size: boot a q35 firmware guest, fill its RAM with unique
data pages (mostly-data memory, see fill.py), save it stopped with
mapped-ram, then restore it with each strategy ``repeat`` times and report

- time to running and time to fully loaded (QMP event timestamps, from
  ``migrate-incoming``), and their ratios against ``qemu-precopy``;
- the bridge's eager throughput against a plain sequential read of the
  same page region (warm page cache, 1 MiB reads);
- page-request latency p50/p99 from the bridge's own histogram, in a
  separate bridge run where the QEMU main thread reads random not-yet-sent
  pages (HMP ``xp``) while the eager stream is going (an idle firmware
  guest faults on almost nothing by itself).

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
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_fastsnap.guests.fill import fill_guest_ram
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.migration import save_snapshot
from pytest_fastsnap.restore.strategies import (
    RestoredGuest,
    RestoreUnsupported,
    loader_binary,
    machine_factory,
    restore,
)
from pytest_fastsnap.snapshot.format import parse

MiB = 1 << 20
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


def _one(strategy: str, snap: Path, device_args: Sequence[str], binary: str, workdir: Path,
         *, probes: int = 0, ranges: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    guest = restore(strategy, snap, device_args, machine_factory(binary, workdir, name=strategy),
                    timeout=600)
    try:
        rtts: list[float] = []
        prober = None
        if probes and ranges:
            prober = threading.Thread(target=_probe_demand, args=(guest, ranges, probes, rtts))
            prober.start()
        guest.wait_loaded(timeout=900)
        if prober is not None:
            prober.join()
        result = guest.summary()
        if rtts:
            rtts.sort()
            result["probe_rtt_us"] = {"count": len(rtts), "p50": rtts[len(rtts) // 2],
                                      "p99": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]}
        return result
    finally:
        guest.close()


def bench_size(size: int, *, binary: str, workdir: Path, repeat: int,
               strategies: Sequence[str], probes: int, log: Any) -> dict[str, Any]:
    src = QemuMachine(binary, workdir, name=f"src{size >> 20}", mem=f"{size >> 20}M",
                      qmp_timeout=600)
    src.launch()
    try:
        src.wait_status("running")
        time.sleep(0.3)
        t = time.monotonic()
        ranges = fill_guest_ram(src, "q35", size)
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
    log(f"{size >> 20} MiB: filled {data_bytes / size:.0%} in {fill_s:.1f}s, "
        f"saved in {saved.save_seconds:.1f}s ({snap.stat().st_size >> 20} MiB file)")
    pages_offset, length = _pc_ram_region(snap)
    seq = [sequential_read_mib_s(snap, pages_offset, length) for _ in range(max(1, repeat))]
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(repeat):
        for strategy in strategies:     # interleaved, so drift hits all alike
            try:
                res = _one(strategy, snap, device_args, binary, workdir)
            except RestoreUnsupported as err:
                log(f"  {strategy}: skipped: {err.reason}")
                runs.setdefault(strategy, [])
                continue
            runs.setdefault(strategy, []).append(res)
            log(f"  [{r + 1}/{repeat}] {strategy}: running {res['time_to_running_s']:.3f}s, "
                f"loaded {res['time_to_loaded_s']:.3f}s")
    demand = None
    if probes and "loader-bridge" in strategies:
        demand = _one("loader-bridge", snap, device_args, binary, workdir, probes=probes,
                      ranges=ranges)
        lat = (demand.get("loader") or {}).get("latency_us", {})
        log(f"  demand run: {lat.get('count', 0)} requests served, p50 {lat.get('p50', 0):.0f}us "
            f"p99 {lat.get('p99', 0):.0f}us")
    snap.unlink(missing_ok=True)

    def med(strategy: str, key: str) -> float | None:
        vals = [x[key] for x in runs.get(strategy, []) if x.get(key) is not None]
        return statistics.median(vals) if vals else None

    summary: dict[str, Any] = {"size_bytes": size, "data_bytes": data_bytes,
                               "save_s": saved.save_seconds,
                               "sequential_read_mib_s": statistics.median(seq),
                               "strategies": {}}
    for strategy in runs:
        entry: dict[str, Any] = {"time_to_running_s": med(strategy, "time_to_running_s"),
                                 "time_to_loaded_s": med(strategy, "time_to_loaded_s"),
                                 "runs": runs[strategy]}
        loader_runs = [x["loader"] for x in runs[strategy] if x.get("loader")]
        if loader_runs:
            entry["eager_throughput_mib_s"] = statistics.median(
                x["eager_throughput_mib_s"] for x in loader_runs)
            entry["loader_time_to_run_sent_s"] = statistics.median(
                x["time_to_run_sent_s"] for x in loader_runs)
        summary["strategies"][strategy] = entry
    if demand is not None:
        summary["demand_run"] = demand
    return summary


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def format_table(results: list[dict[str, Any]]) -> str:
    rows = [("size", "strategy", "running s", "loaded s", "run vs precopy", "loaded vs precopy",
             "eager MiB/s", "seq read MiB/s", "req p50 us", "req p99 us")]
    for res in results:
        base = res["strategies"].get("qemu-precopy", {})
        lat = ((res.get("demand_run") or {}).get("loader") or {}).get("latency_us", {})
        for name, st in res["strategies"].items():
            is_bridge = name == "loader-bridge"
            rows.append((
                f"{res['size_bytes'] >> 20} MiB", name,
                f"{st['time_to_running_s']:.3f}" if st["time_to_running_s"] else "-",
                f"{st['time_to_loaded_s']:.3f}" if st["time_to_loaded_s"] else "-",
                _ratio(st["time_to_running_s"], base.get("time_to_running_s")),
                _ratio(st["time_to_loaded_s"], base.get("time_to_loaded_s")),
                f"{st['eager_throughput_mib_s']:.0f}" if "eager_throughput_mib_s" in st
                else (f"{res['data_bytes'] / MiB / st['time_to_loaded_s']:.0f}*"
                      if st["time_to_loaded_s"] else "-"),
                f"{res['sequential_read_mib_s']:.0f}",
                f"{lat.get('p50', 0):.0f}" if is_bridge and lat else "-",
                f"{lat.get('p99', 0):.0f}" if is_bridge and lat else "-",
            ))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("(* qemu-precopy: data bytes / time to loaded; ratios: this strategy's time "
                 "/ qemu-precopy's, < 1 is faster)")
    return "\n".join(lines)


def log_limits(values: Sequence[float]) -> tuple[float, float]:
    """Log-axis limits that show every positive value: half the smallest below,
    and room above the largest for its label (x4: about two label heights on
    the plot's scale)."""
    positive = [v for v in values if v and v > 0]
    if not positive:
        return 0.1, 1.0
    return min(positive) / 2, max(positive) * 4


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Bar charts of time to running and to fully loaded, saved to *path*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [f"{r['size_bytes'] >> 20} MiB" for r in results]
    strategies = sorted({s for r in results for s in r["strategies"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    width = 0.8 / max(1, len(strategies))
    for ax, key, title in ((axes[0], "time_to_running_s", "time to running"),
                           (axes[1], "time_to_loaded_s", "time to fully loaded")):
        shown: list[float] = []
        for i, strategy in enumerate(strategies):
            vals = [(r["strategies"].get(strategy) or {}).get(key) or 0 for r in results]
            shown += vals
            xs = [x + i * width for x in range(len(results))]
            bars = ax.bar(xs, vals, width, label=strategy)
            ax.bar_label(bars, labels=[f"{v:.3g}" if v else "" for v in vals], fontsize=8)
        ax.set_xticks([x + width * (len(strategies) - 1) / 2 for x in range(len(results))],
                      sizes)
        ax.set_yscale("log")
        ax.set_ylim(*log_limits(shown))
        ax.set_ylabel("seconds (log)")
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("mapped-ram restore: QEMU full load vs loader bridge (TCG, warm cache)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(sizes: Sequence[int] = (256 * MiB, 1 << 30, 4 << 30), *,
              binary: str = "qemu-system-x86_64", repeat: int = 3,
              strategies: Sequence[str] = ("qemu-precopy", "loader-bridge"),
              probes: int = 200, results_dir: Path | None = None,
              workdir: Path | None = None, verbose: bool = True,
              draw: bool = True) -> dict[str, Any]:
    """Run the benchmark; write JSON and (with *draw*) a PNG to *results_dir*
    (default ``./fastsnap-bench-results``); return the report."""
    def log(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    binary = shutil.which(binary) or binary
    results_dir = (Path(results_dir) if results_dir else DEFAULT_RESULTS).absolute()
    results_dir.mkdir(parents=True, exist_ok=True)
    own_workdir = workdir is None
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fsbench-", dir="/var/tmp"))
    results = []
    try:
        log(f"loader: {loader_binary()}; QEMU: {binary}; accel tcg")
        for size in sizes:
            results.append(bench_size(size, binary=binary, workdir=work, repeat=repeat,
                                      strategies=strategies, probes=probes, log=log))
    finally:
        if own_workdir:
            shutil.rmtree(work, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {"binary": binary, "accel": "tcg", "repeat": repeat, "host_cpus": os.cpu_count(),
              "results": results, "table": format_table(results)}
    json_path = results_dir / f"bench-restore-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    report["json_path"] = str(json_path)
    if draw:
        png_path = results_dir / f"bench-restore-{stamp}.png"
        plot(results, png_path)
        report["png_path"] = str(png_path)
    log("\n" + report["table"])
    log(f"\nwrote {json_path}" + (f"\n      {report['png_path']}" if draw else ""))
    return report
