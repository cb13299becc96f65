"""`fastsnap report RUN.json...`: the known-defect table over runs written with
``pytest --fastsnap --fastsnap-report-json=RUN.json`` (one column per run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from pytest_fastsnap.defect_table import ReportFileError, format_table, read_report

    try:
        runs = [read_report(Path(p)) for p in args.reports]
    except ReportFileError as err:
        print(f"fastsnap report: {err}", file=sys.stderr)
        return 2
    for line in format_table(runs):
        print(line)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("report", help="known QEMU defects x QEMU versions, from runs' "
                       "--fastsnap-report-json files")
    p.add_argument("reports", nargs="+", metavar="RUN.json")
    p.set_defaults(func=run)
