"""Restore benchmark: QEMU full load vs the loader bridge (time to running,
time to fully loaded, request latency, eager throughput vs sequential read).

    python benchmarks/bench_restore.py --sizes 256M,1G,4G --repeat 3

Same as `fastsnap bench ...` (same options, `--help`); results (JSON + PNG)
go to ./fastsnap-bench-results/ unless --results-dir says otherwise.
"""

from __future__ import annotations

import sys

from pytest_fastsnap.cli import main
from pytest_fastsnap.restore.bench import run_bench

__all__ = ["run_bench"]

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
