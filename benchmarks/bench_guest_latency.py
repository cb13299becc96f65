"""Guest-visible request latency A/B: loader-bridge restores of one tiny-guest
snapshot with different loader options, each with and without preempt, the
guest touching random pages right after RUN while the eager stream runs.

    python benchmarks/bench_guest_latency.py --size 4G --repeat 3 \\
        --variant base= --variant holdoff200='--eager-holdoff-us 200'

A variant with ``--eager-delay S`` holds the eager stream back until the
workload is done (the request path without eager load, for reference).
Runs are interleaved (repeat -> variant -> preempt off/on), so drift hits
every variant alike; medians per variant and channel: the guest's p50/p99
of faulted first reads, p99/p50, the loader's own request p99, and the
eager throughput with its ratio to the first variant's.  Figures are
printed and written as JSON, never asserted.  Bad options: one error line,
exit 2.  See benchmarks/README.md ("Guest-visible latency").
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pytest_fastsnap.cli.common import OneLineArgumentParser, int_arg, size_arg
from pytest_fastsnap.qemu.probe import probe
from pytest_fastsnap.restore.bench import _one, make_snapshot
from pytest_fastsnap.restore.guest_latency import MODES, summarize
from pytest_fastsnap.restore.workload import Workload, parse_one_workload


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, args = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: want NAME=LOADER-ARGS (args may be empty)")
    try:
        return name.strip(), shlex.split(args)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def _workload(text: str) -> Workload:
    try:
        return parse_one_workload(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _split_hold(args: list[str]) -> tuple[list[str], float]:
    """``--eager-delay S`` in a variant: the eager stream waits until the
    workload is done (SIGUSR1), the no-load reference."""
    if "--eager-delay" not in args:
        return args, 0.0
    i = args.index("--eager-delay")
    return args[:i] + args[i + 2:], float(args[i + 1])


def _f(v: float | None, spec: str) -> str:
    return format(v, spec) if v is not None else "-"


def run(size: int, variants: list[tuple[str, list[str]]], workload: Workload, repeat: int,
        binary: str, results_dir: Path) -> dict[str, Any]:
    binary = shutil.which(binary) or binary
    machine = probe(binary).resolve_machine("q35")
    work = Path(tempfile.mkdtemp(prefix="fsglat-", dir="/var/tmp"))
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    loads: list[tuple[float, float, float]] = [os.getloadavg()]
    try:
        snap, device_args, _ranges, _save = make_snapshot(size, binary=binary, workdir=work,
                                                          machine=machine, log=print)
        for r in range(repeat):
            for name, args in variants:
                loader_args, hold = _split_hold(args)
                for mode, mode_kw in MODES:
                    res = _one("loader-bridge", snap, device_args, binary, work,
                               workload=workload, loader_args=loader_args,
                               eager_hold=hold, **mode_kw)
                    runs.setdefault((name, mode), []).append(res)
                    lat = res["workload"].get("latency") or {}
                    eager = (res.get("loader") or {}).get("eager_throughput_mib_s")
                    print(f"[{r + 1}/{repeat}] {name} {mode}: {lat.get('faulted')} faulted, "
                          f"p50 {lat.get('p50_us')}us p99 {lat.get('p99_us')}us, eager "
                          f"{_f(eager, '.0f')} MiB/s, load {os.getloadavg()[0]:.2f}",
                          flush=True)
            loads.append(os.getloadavg())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {f"{name} {mode}": summarize(these) for (name, mode), these in runs.items()}
    base_eager = {mode: summary[f"{variants[0][0]} {mode}"]["eager_mib_s"] for mode, _ in MODES}
    rows = [("variant", "channel", "faulted", "guest p50 us", "guest p99 us", "p99/p50",
             "loader p99 us", "read p99", "send p99", "eager MiB/s", "eager vs first",
             "loaded s", "held off s")]
    for name, _ in variants:
        for mode, _ in MODES:
            st = summary[f"{name} {mode}"]
            b = base_eager[mode]
            rows.append((name, mode, _f(st["faulted"], ".0f"), _f(st["p50_us"], ".0f"),
                         _f(st["p99_us"], ".0f"), _f(st["p99_over_p50"], ".2f"),
                         _f(st["loader_p99_us"], ".0f"), _f(st["loader_read_p99_us"], ".0f"),
                         _f(st["loader_send_p99_us"], ".0f"), _f(st["eager_mib_s"], ".0f"),
                         f"{st['eager_mib_s'] / b:.2f}x" if st["eager_mib_s"] and b else "-",
                         _f(st["loaded_s"], ".3f"), _f(st["holdoff_s"], ".3f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
                      for r in rows)
    print(f"\n{size >> 20} MiB, workload {workload.name}, repeat {repeat} (medians); "
          f"load averages {loads[0][0]:.2f} .. {max(x[0] for x in loads):.2f}\n{table}")
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"bench-guest-latency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = {"size_bytes": size, "workload": workload.key, "repeat": repeat,
              "variants": {n: a for n, a in variants}, "load_averages": loads,
              "binary": binary, "machine": machine, "summary": summary, "table": table}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def main(argv: list[str]) -> int:
    p = OneLineArgumentParser(prog="bench_guest_latency.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=size_arg(default_unit="M"), default=1 << 30,
                   help="guest RAM (default 1G; q35, the tiny guest touches low memory)")
    p.add_argument("--variant", type=_variant, action="append", default=None,
                   metavar="NAME=LOADER-ARGS", help="repeatable; default base= (no extra args)")
    p.add_argument("--workload", type=_workload, default=Workload("rand", 10),
                   help="ORDER:PERCENT (default rand:1)")
    p.add_argument("--repeat", type=int_arg(minimum=1, maximum=100), default=3)
    p.add_argument("--qemu-binary", default="qemu-system-x86_64")
    p.add_argument("--results-dir", type=Path, default=Path("fastsnap-bench-results"))
    args = p.parse_args(argv)
    if args.size < 64 << 20 or args.size % (1 << 20):
        print("bench_guest_latency.py: --size: whole MiB, at least 64M", file=sys.stderr)
        return 2
    run(args.size, args.variant or [("base", [])], args.workload, args.repeat,
        args.qemu_binary, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
