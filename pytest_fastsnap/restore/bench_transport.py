"""Transport benchmark of the loader bridge: what the network round trip and
the postcopy-preempt channel do to page-request latency and time to loaded.

Part 1 (``sizes``): one q35 guest per size, RAM filled with unique pages and
saved stopped; restored over unix, TCP loopback, and TCP with a round trip of
each of ``rtts`` ms (two network namespaces on a veth pair with ``tc netem``
when the kernel has it, else a delaying relay on loopback, see
:mod:`.delay_relay`), each with and without preempt.
Part 2 (``preempt_size``): the largest guest, over unix, full-speed eager
stream, with and without preempt: request latency under full eager load.

Per restore: time to running and to loaded (QMP event timestamps), the
loader's request latency (request read -> page handed to the socket), and
the round trip of HMP ``xp`` reads of not-yet-streamed pages by QEMU's main
thread (fault -> request -> page placed -> read returns: latency as the
destination sees it, plus the monitor's own overhead, measured separately by
the same reads once everything is loaded: ``probe_base``).

    python benchmarks/bench_transport.py --sizes 256M --rtts 0,1,10 --preempt-size 2G
"""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pytest_fastsnap import netns
from pytest_fastsnap.guests.fill import fill_guest_ram
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.migration import save_snapshot
from pytest_fastsnap.qemu.probe import probe
from pytest_fastsnap.restore.delay_relay import DelayRelay
from pytest_fastsnap.restore.strategies import RestoredGuest, machine_factory, restore
from pytest_fastsnap.restore.transport import parse_tcp

MiB = 1 << 20


def _pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (as the loader's mr_stats.c)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] if s else 0.0


def _probe(guest: RestoredGuest, addrs: Sequence[int], out: list[float],
           until_done: bool = True) -> None:
    for addr in addrs:
        if until_done and (guest.loader is None or guest.loader.poll() is not None):
            return
        t = time.perf_counter()
        guest.vm.hmp(f"xp /1xg {addr:#x}")
        out.append((time.perf_counter() - t) * 1e6)


def make_snapshot(size: int, binary: str, workdir: Path, machine: str
                  ) -> tuple[Path, list[str], list[tuple[int, int]]]:
    src = QemuMachine(binary, workdir, name=f"src{size >> 20}", mem=f"{size >> 20}M",
                      machine=machine, qmp_timeout=600)
    src.launch()
    try:
        src.wait_status("running")
        time.sleep(0.3)
        ranges = fill_guest_ram(src, machine, size)
        snap = workdir / f"snap-{size >> 20}M.img"
        save_snapshot(src, snap, timeout=900)
        return snap, list(src.device_args), ranges
    finally:
        src.shutdown()


@contextmanager
def _path(kind: str, rtt_ms: float, binary: str, workdir: Path
          ) -> Iterator[tuple[dict[str, Any], str]]:
    """Restore arguments for a transport path, and its label."""
    factory = machine_factory(binary, workdir, name="dst", qmp_timeout=600)
    if kind == "unix":
        yield {"transport": "unix", "vm_factory": factory}, "unix"
    elif kind == "netns":
        with netns.veth_pair() as link:
            link.delay(rtt_ms)

            def make(device_args: Sequence[str], *, paused: bool) -> QemuMachine:
                with link.inside(link.ns_b):
                    return factory(device_args, paused=paused)
            yield ({"transport": f"tcp:{link.addr_b}:0", "vm_factory": make,
                    "loader_prefix": link.exec_prefix(link.ns_a)},
                   f"veth+netem {rtt_ms:g} ms" if rtt_ms else "veth")
    else:   # relay on loopback (rtt 0: plain loopback)
        relays: list[DelayRelay] = []

        def via(uri: str) -> str:
            relays.append(DelayRelay(parse_tcp(uri[4:]), rtt_ms))
            return f"tcp:127.0.0.1:{relays[-1].port}"
        try:
            yield ({"transport": "tcp:127.0.0.1:0", "vm_factory": factory,
                    **({"loader_via": via} if rtt_ms else {})},
                   f"tcp relay {rtt_ms:g} ms" if rtt_ms else "tcp loopback")
        finally:
            for r in relays:
                r.close()


def one(snap: Path, device_args: Sequence[str], ranges: list[tuple[int, int]], binary: str,
        workdir: Path, *, kind: str, rtt_ms: float, preempt: bool, probes: int,
        seed: int = 7) -> dict[str, Any]:
    # Random pages of the top quarter of the last filled range: the eager
    # stream reaches them last, so (almost) every read is a page request.
    gpa, length = ranges[-1]
    top = max(probes, length // 4096 // 4)
    addrs = [gpa + length - (i + 1) * 4096 for i in range(min(length // 4096, top))]
    random.Random(seed).shuffle(addrs)
    addrs = addrs[:probes]
    with _path(kind, rtt_ms, binary, workdir) as (args, label):
        factory = args.pop("vm_factory")
        g = restore("loader-bridge", snap, device_args, factory, timeout=600, preempt=preempt,
                    **args)
        try:
            rtts: list[float] = []
            prober = threading.Thread(target=_probe, args=(g, addrs, rtts))
            prober.start()
            g.wait_loaded(timeout=900)
            prober.join()
            base: list[float] = []
            _probe(g, addrs[:len(rtts) or 20], base, until_done=False)
            st = g.loader_stats
            lat = st.get("latency_us", {})
            return {"path": label, "rtt_ms": rtt_ms, "preempt": preempt,
                    "time_to_running_s": g.time_to_running,
                    "time_to_loaded_s": g.time_to_loaded,
                    "requests_served": st.get("requests_served"),
                    "loader_p50_us": lat.get("p50"), "loader_p99_us": lat.get("p99"),
                    "probe_count": len(rtts), "probe_p50_us": _pct(rtts, 0.5),
                    "probe_p99_us": _pct(rtts, 0.99), "probe_base_p50_us": _pct(base, 0.5),
                    "probe_base_p99_us": _pct(base, 0.99),
                    "eager_mib_s": st.get("eager_throughput_mib_s"), "loader": st}
        finally:
            g.close()


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    row = dict(runs[0])
    for key in ("time_to_running_s", "time_to_loaded_s", "loader_p50_us", "loader_p99_us",
                "probe_p50_us", "probe_p99_us", "probe_base_p50_us", "probe_base_p99_us",
                "eager_mib_s",
                "probe_count", "requests_served"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.median(vals) if vals else None
    row.pop("loader", None)
    row["runs"] = len(runs)
    return row


def format_rows(rows: list[dict[str, Any]], base_key: Callable[[dict[str, Any]], Any]) -> str:
    head = ("size", "path", "preempt", "running s", "loaded s", "loaded x", "loader p50/p99 us",
            "probe p50/p99 us", "probe p99/p50", "probe x", "base p50/p99 us", "eager MiB/s")
    out = [head]
    bases: dict[Any, dict[str, Any]] = {}
    for r in rows:
        bases.setdefault(base_key(r), r)
    for r in rows:
        b = bases[base_key(r)]

        def ratio(key: str, r: dict[str, Any] = r, b: dict[str, Any] = b) -> str:
            return f"{r[key] / b[key]:.2f}x" if r.get(key) and b.get(key) else "-"
        out.append((f"{r['size'] >> 20} MiB", r["path"], "on" if r["preempt"] else "off",
                    f"{r['time_to_running_s']:.3f}", f"{r['time_to_loaded_s']:.3f}",
                    ratio("time_to_loaded_s"),
                    f"{r['loader_p50_us'] or 0:.0f} / {r['loader_p99_us'] or 0:.0f}",
                    f"{r['probe_p50_us']:.0f} / {r['probe_p99_us']:.0f}",
                    f"{r['probe_p99_us'] / r['probe_p50_us']:.1f}" if r["probe_p50_us"] else "-",
                    ratio("probe_p50_us"),
                    f"{r['probe_base_p50_us']:.0f} / {r.get('probe_base_p99_us') or 0:.0f}",
                    f"{r['eager_mib_s'] or 0:.0f}"))
    widths = [max(len(str(x[i])) for x in out) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(x, widths, strict=True)) for x in out]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(sizes: Sequence[int] = (256 * MiB,), rtts: Sequence[float] = (0, 1, 10), *,
        repeat: int = 3, probes: int = 100, preempt_size: int = 2 << 30,
        preempt_probes: int = 200, binary: str = "qemu-system-x86_64",
        results_dir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    binary = shutil.which(binary) or binary
    machine = probe(binary).resolve_machine("q35")
    netem_why = netns.netns_missing()
    if netem_why is None:
        with netns.veth_pair() as link:
            netem_why = netns.netem_missing(link)
    delayed = "relay" if netem_why else "netns"
    log(f"QEMU {binary}, machine {machine}; delay: "
        + ("tc netem on a veth pair between two namespaces" if not netem_why else
           f"a delaying TCP relay on loopback ({netem_why})"))
    work = Path(tempfile.mkdtemp(prefix="fsbench-net-", dir="/var/tmp"))
    report: dict[str, Any] = {"binary": binary, "machine": machine, "delay_method": delayed,
                              "netem_unavailable": netem_why, "rtt_rows": [],
                              "preempt_rows": []}
    try:
        for size in sizes:
            snap, dev, ranges = make_snapshot(size, binary, work, machine)
            log(f"{size >> 20} MiB snapshot: {snap.stat().st_size >> 20} MiB file")
            paths = [("unix", 0.0)] + [("relay" if r == 0 or delayed == "relay" else "netns",
                                       float(r)) for r in rtts]
            if 0 in rtts and delayed == "netns":
                paths.append(("netns", 0.0))
            for kind, rtt in paths:
                for preempt in (False, True):
                    runs = []
                    for i in range(repeat):
                        r = one(snap, dev, ranges, binary, work, kind=kind, rtt_ms=rtt,
                                preempt=preempt, probes=probes, seed=i)
                        r["size"] = size
                        runs.append(r)
                        log(f"  {r['path']:>16} preempt {'on ' if preempt else 'off'} "
                            f"[{i + 1}/{repeat}]: loaded {r['time_to_loaded_s']:.3f} s, "
                            f"probe p50 {r['probe_p50_us']:.0f} us p99 "
                            f"{r['probe_p99_us']:.0f} us ({r['probe_count']} reads)")
                    report["rtt_rows"].append(_median_row(runs))
            snap.unlink(missing_ok=True)
        if preempt_size:
            snap, dev, ranges = make_snapshot(preempt_size, binary, work, machine)
            log(f"{preempt_size >> 20} MiB snapshot for the preempt comparison")
            for i in range(repeat):
                for preempt in (False, True):   # interleaved
                    r = one(snap, dev, ranges, binary, work, kind="unix", rtt_ms=0,
                            preempt=preempt, probes=preempt_probes, seed=i)
                    r["size"] = preempt_size
                    log(f"  preempt {'on ' if preempt else 'off'} [{i + 1}/{repeat}]: "
                        f"loaded {r['time_to_loaded_s']:.3f} s, probe p50 "
                        f"{r['probe_p50_us']:.0f} us p99 {r['probe_p99_us']:.0f} us "
                        f"({r['probe_count']} reads), loader p50 {r['loader_p50_us'] or 0:.0f}"
                        f" p99 {r['loader_p99_us'] or 0:.0f} us")
                    report["preempt_rows"].append(r | {"loader": None})
            snap.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tables = []
    if report["rtt_rows"]:
        tables.append(format_rows(report["rtt_rows"], lambda r: (r["size"], r["preempt"])))
    if report["preempt_rows"]:
        tables.append(format_rows(report["preempt_rows"], lambda r: r["size"]))
    report["table"] = "\n\n".join(tables)
    log("\n" + report["table"])
    log("(loaded x / probe x: against the first row of the same size and preempt setting, "
        "or in the preempt table against the first run; probe base: the same reads once "
        "everything is loaded, i.e. the monitor's own round trip)")
    results = Path(results_dir or "fastsnap-bench-results").absolute()
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"bench-transport-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {path}")
    report["json_path"] = str(path)
    return report
