"""`fastsnap bench`: the restore benchmark (pytest_fastsnap.restore.bench)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pytest_fastsnap.cli.common import (
    CliError,
    int_arg,
    one_line,
    output_dir,
    parse_size,
    validate_qemu_binary,
)

MiB = 1 << 20
DEFAULT_WORKLOADS = "seq:1,seq:10,seq:100,rand:1,rand:10,rand:100"


def _sizes(text: str) -> list[int]:
    from pytest_fastsnap.guests.fill import data_ranges

    sizes = []
    for item in text.split(","):
        try:
            size = parse_size(item, default_unit="M")
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if size % MiB or not data_ranges("q35", size):
            raise argparse.ArgumentTypeError(
                f"{item!r}: need whole MiB and more than 18M (the fill skips the firmware's "
                "2 MiB and the top 16 MiB of low memory)")
        sizes.append(size)
    return sizes


def _strategies(text: str) -> list[str]:
    from pytest_fastsnap.restore.bench import BENCH_STRATEGIES

    names = [s for s in text.split(",") if s]
    bad = [s for s in names if s not in BENCH_STRATEGIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(BENCH_STRATEGIES)}")
    from pytest_fastsnap.restore.pinning import parse_pin

    if any(n.endswith("+pin") for n in names):
        try:
            parse_pin("auto")
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return names


def _workloads(text: str) -> list[Any]:
    from pytest_fastsnap.restore.workload import parse_workloads

    if text == "none":
        return []
    try:
        return parse_workloads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _one_workload(text: str) -> Any:
    from pytest_fastsnap.restore.workload import parse_one_workload

    try:
        return parse_one_workload(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    from pytest_fastsnap.qemu.machine import QemuError
    from pytest_fastsnap.qemu.migration import MigrationFailed
    from pytest_fastsnap.restore.bench import (
        DEFAULT_RESULTS,
        DEFAULT_STRATEGIES,
        matplotlib_missing,
        run_bench,
    )
    from pytest_fastsnap.restore.strategies import RestoreFailed

    results_dir = output_dir(args.results_dir or DEFAULT_RESULTS, "--results-dir")
    binary = validate_qemu_binary(args.qemu_binary)
    no_plot = matplotlib_missing()
    if no_plot and not args.no_plot:
        print(f"fastsnap bench: {no_plot}", file=sys.stderr, flush=True)
    try:
        run_bench(args.sizes, binary=binary, repeat=args.repeat,
                  strategies=args.strategies or DEFAULT_STRATEGIES,
                  probes=args.probes, results_dir=results_dir,
                  draw=not (args.no_plot or no_plot), workloads=args.workloads,
                  ceiling=not args.no_ceiling, ws=not args.no_ws,
                  guest_latency=args.guest_latency)
    except (OSError, QemuError, RestoreFailed, MigrationFailed) as err:
        raise CliError(one_line(err)) from None
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=_sizes, default=[256 * MiB, 1 << 30, 4 << 30],
                   help="guest RAM sizes, comma-separated (default 256M,1G,4G; > 18M each)")
    p.add_argument("--repeat", type=int_arg(minimum=1), default=3,
                   help="restores per strategy and size; medians are reported (default 3)")
    p.add_argument("--strategies", type=_strategies, default=None,
                   help="comma-separated: qemu-precopy, qemu-fast, loader-bridge, "
                   "loader-bridge+preempt (the bridge with the postcopy-preempt channel), "
                   "loader-bridge+preempt+pin (and the request path on other CPUs than the "
                   "eager stream; needs 2 CPUs) (default qemu-precopy,loader-bridge,"
                   "loader-bridge+preempt and, with 2 or more CPUs, loader-bridge+preempt+pin)")
    p.add_argument("--probes", type=int_arg(minimum=0), default=200,
                   help="demand reads in the latency run (0: no latency run; default 200)")
    p.add_argument("--qemu-binary", default=os.environ.get("QEMU_BINARY", "qemu-system-x86_64"),
                   help="name on PATH or path (default: $QEMU_BINARY or qemu-system-x86_64)")
    p.add_argument("--results-dir", type=Path, default=None,
                   help="where the JSON and PNG go (default ./fastsnap-bench-results)")
    p.add_argument("--no-plot", action="store_true",
                   help="no PNG (also the case, with a note, without matplotlib)")
    p.add_argument("--workloads", type=_workloads, default=DEFAULT_WORKLOADS,
                   help="after-restore workloads, ORDER:PERCENT comma-separated (ORDER seq or "
                   "rand), or none; one restore each per strategy "
                   "(default seq:1,seq:10,seq:100,rand:1,rand:10,rand:100)")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip the QEMU-to-QEMU postcopy migration (the ceiling)")
    p.add_argument("--no-ws", action="store_true",
                   help="skip the working-set prefetch comparison (loader-bridge)")
    p.add_argument("--guest-latency", type=_one_workload, default=None, metavar="ORDER:PERCENT",
                   help="also measure request latency as the guest sees it: loader-bridge "
                   "without preempt, with it, and with it and --pin auto (2+ CPUs), this "
                   "workload (e.g. rand:1) started right after RUN while the eager stream "
                   "runs, --repeat times each")


DESCRIPTION = """\
For each size: boot a q35 firmware guest (TCG), fill its RAM with unique data
pages, save it with mapped-ram, restore it --repeat times with each strategy
(interleaved) and report the medians of time to running and time to fully
loaded, the bridge's eager throughput against a sequential read of the same
pages, and page-request latency p50/p99 from an extra bridge run with demand
reads.  Then, per workload, one more restore per strategy in which the
tiny guest reads and checks a share of its memory as soon as it runs (time
from migrate-incoming to its TOUCH OK, and QEMU's postcopy blocktime); a
QEMU-to-QEMU postcopy migration of the same guest (the ceiling any postcopy
source can reach on this destination); and the bridge's working-set
prefetch (--record-ws, then --ws before/after RUN) on rand:10.  Every
workload row also gives latency as the guest sees it (the tiny guest times
each touched page's first read: faulted reads, p50/p99, p99/p50);
--guest-latency rand:1 adds the issue #11 goal run: loader-bridge with and
without postcopy-preempt, the workload started right after RUN while the
eager stream runs at full speed.
Writes bench-restore-STAMP.json and .png (the PNG needs matplotlib:
pip install 'pytest-fastsnap[bench]'; without it, table and JSON only).
Columns: benchmarks/README.md.

  fastsnap bench --sizes 256M,1G,4G --repeat 3
  fastsnap bench --sizes 1G,4G --strategies loader-bridge --workloads none \
      --no-ceiling --no-ws --probes 0 --guest-latency rand:1
"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="restore benchmark: QEMU full load vs the loader bridge",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def strip_separator(argv: list[str]) -> list[str]:
    """``fastsnap bench -- --sizes ...`` (the old spelling) as ``fastsnap bench --sizes ...``."""
    return argv[:1] + argv[2:] if argv[:2] == ["bench", "--"] else argv
