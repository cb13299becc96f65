"""`fastsnap bench`: the restore benchmark (pytest_fastsnap.restore.bench)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from pytest_fastsnap.restore.bench import bench_cli

    return bench_cli(args.rest)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="restore benchmarks (see `fastsnap bench -- --help`)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)
