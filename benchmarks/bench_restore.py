"""Restore benchmark: QEMU full load vs the loader bridge (time to running,
time to fully loaded, request latency, eager throughput vs sequential read).

    python benchmarks/bench_restore.py --sizes 256M,1G,4G --repeat 3

Same as `fastsnap bench -- ...`; results (JSON + PNG) go to benchmarks/results/.
"""

from __future__ import annotations

import sys

from pytest_fastsnap.restore.bench import bench_cli, run_bench

__all__ = ["run_bench"]

if __name__ == "__main__":
    sys.exit(bench_cli(sys.argv[1:]))
