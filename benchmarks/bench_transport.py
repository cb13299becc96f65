"""Transport benchmark of the loader bridge: request latency and time to
loaded against the round trip (0, 1, 10 ms), and request latency with and
without the postcopy-preempt channel under full eager load.

    python benchmarks/bench_transport.py --sizes 256M --rtts 0,1,10 --repeat 3 \\
        --preempt-size 2G

See benchmarks/README.md ("Transports").  Figures and ratios are printed,
never asserted.  Bad options: one error line, exit 2.
"""

from __future__ import annotations

import argparse
import sys

from pytest_fastsnap.cli.common import OneLineArgumentParser, int_arg, parse_size, size_arg
from pytest_fastsnap.restore.bench_transport import run


def _sizes(text: str) -> list[int]:
    try:
        sizes = [parse_size(s, default_unit="M") for s in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if any(s < 64 << 20 for s in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: each size at least 64M")
    return sizes


def _rtts(text: str) -> list[float]:
    try:
        rtts = [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of milliseconds") from None
    if any(not 0 <= r <= 1000 for r in rtts):
        raise argparse.ArgumentTypeError(f"{text!r}: each round trip within 0..1000 ms")
    return rtts


def main(argv: list[str]) -> int:
    p = OneLineArgumentParser(prog="bench_transport.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_sizes, default=[256 << 20], help="default 256M")
    p.add_argument("--rtts", type=_rtts, default=[0.0, 1.0, 10.0], help="ms, default 0,1,10")
    p.add_argument("--repeat", type=int_arg(minimum=1, maximum=100), default=3)
    p.add_argument("--probes", type=int_arg(minimum=1, maximum=10000), default=100)
    p.add_argument("--preempt-size", type=size_arg(default_unit="M"), default=2 << 30,
                   help="guest size of the preempt comparison (0 skips it; default 2G: the "
                   "tiny 32-bit guest cannot be used above 2.75 GiB on q35, and 2G keeps "
                   "a run to minutes under TCG)")
    p.add_argument("--preempt-probes", type=int_arg(minimum=1, maximum=10000), default=200)
    p.add_argument("--qemu-binary", default="qemu-system-x86_64")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    if args.preempt_size and args.preempt_size < 64 << 20:
        print("bench_transport.py: --preempt-size: 0 or at least 64M", file=sys.stderr)
        return 2
    run(args.sizes, args.rtts, repeat=args.repeat, probes=args.probes,
        preempt_size=args.preempt_size, preempt_probes=args.preempt_probes,
        binary=args.qemu_binary, results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
