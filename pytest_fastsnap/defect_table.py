"""The defect table: each known QEMU defect (``qemu_defect`` marker) against
each QEMU version run: reproduced, fixed, or not applicable.

A run records, for every test carrying a ``qemu_defect`` marker, whether the
marker applied to the binary under test and how the test ended; the table
folds those records per defect (its ``reason``):

* ``reproduced`` - a test of the defect failed as expected (strict xfail);
* ``fixed`` - a test of it passed: the version is outside the affected range
  (or has the ``unless_feature``) and behaves, or the marker applied and the
  test passed anyway (XPASS(strict): the marker needs updating);
* ``not applicable`` - no test of it ran to a verdict (skipped, not collected);
* ``FAILED`` - a test of it failed in some other way.

``--fastsnap-report-json=FILE`` writes a run's records; ``fastsnap report
FILE...`` prints the table over several runs (one column per run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_fastsnap.markers import defect_applies
from pytest_fastsnap.qemu.probe import QemuProbe

REPORT_FORMAT = 1
REPRODUCED, FIXED, NOT_APPLICABLE, FAILED = "reproduced", "fixed", "not applicable", "FAILED"


class ReportFileError(Exception):
    """A --fastsnap-report-json file that is missing or not one of ours."""


def defect_records(item: pytest.Item, report: pytest.TestReport, probe: QemuProbe
                   ) -> list[dict[str, Any]]:
    """One record per ``qemu_defect`` marker of *item*, from its final report:
    the call phase, or the setup phase when the test was skipped or errored there."""
    if (report.when == "setup" and report.passed) or report.when == "teardown":
        return []
    if hasattr(report, "wasxfail") and report.skipped:
        outcome = "xfailed"
    elif report.failed and "[XPASS(strict)]" in str(report.longrepr):
        outcome = "xpassed"
    else:
        outcome = report.outcome
    return [{"test": item.nodeid, "reason": mark.kwargs.get("reason", ""),
             "fixed_in": mark.kwargs.get("fixed_in", "?"),
             "affected": mark.kwargs.get("affected", "?"),
             "applied": defect_applies(mark, probe), "outcome": outcome}
            for mark in item.iter_markers("qemu_defect")]


def verdict(records: list[dict[str, Any]]) -> str:
    """The table cell for one defect's records in one run."""
    outcomes = {r["outcome"] for r in records}
    if "xfailed" in outcomes:
        return REPRODUCED
    if "failed" in outcomes:
        return FAILED
    if outcomes & {"passed", "xpassed"}:
        return FIXED
    return NOT_APPLICABLE


@dataclass(frozen=True)
class RunResult:
    """What one run contributes to the table: its column and its records."""

    column: str
    records: list[dict[str, Any]]

    def cells(self) -> dict[str, str]:
        by_reason: dict[str, list[dict[str, Any]]] = {}
        for record in self.records:
            by_reason.setdefault(record["reason"], []).append(record)
        return {reason: verdict(recs) for reason, recs in by_reason.items()}


def column_name(version: str, dst_version: str | None) -> str:
    """``QEMU 10.0.2``, or ``QEMU 10.0.2 -> 10.2.2`` for a cross-version run."""
    if dst_version and dst_version != version:
        return f"QEMU {version} -> {dst_version}"
    return f"QEMU {version}"


def write_report(path: Path, run: RunResult, header: dict[str, Any]) -> None:
    data = {"format": REPORT_FORMAT, **header, "column": run.column, "defects": run.records}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def read_report(path: Path) -> RunResult:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ReportFileError(f"{path}: {err.strerror}") from None
    except ValueError as err:
        raise ReportFileError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT \
            or not isinstance(data.get("defects"), list) or "column" not in data:
        raise ReportFileError(f"{path}: not a --fastsnap-report-json file "
                              f"(format {REPORT_FORMAT})")
    return RunResult(str(data["column"]), data["defects"])


def format_table(runs: list[RunResult]) -> list[str]:
    """One row per defect (its reason and fix), one column per run."""
    columns = [run.column for run in runs]
    cells = [run.cells() for run in runs]
    fixes = {r["reason"]: r["fixed_in"] for run in runs for r in run.records}
    if not fixes:
        return ["no test with a qemu_defect marker ran"]
    widths = [max(len(c), len(NOT_APPLICABLE)) for c in columns]
    head = " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    lines = [f"{head} | defect (fix)", "-" * (len(head) + 16)]
    for reason in sorted(fixes):
        row = " | ".join(cell.get(reason, NOT_APPLICABLE).ljust(w)
                         for cell, w in zip(cells, widths, strict=True))
        lines.append(f"{row} | {reason} (fix: {fixes[reason]})")
    return lines
