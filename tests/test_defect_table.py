"""The defect table: per known defect and QEMU version run, reproduced / fixed /
not applicable, in the terminal summary and from `fastsnap report`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_fastsnap.defect_table import (
    FAILED,
    FIXED,
    NOT_APPLICABLE,
    REPRODUCED,
    RunResult,
    format_table,
    verdict,
)

FASTSNAP = [sys.executable, "-m", "pytest_fastsnap.cli"]

DEMO = """
import pytest
broken = pytest.mark.qemu_defect(affected=">=1.0", fixed_in="never", reason="still broken")
@broken
def test_still_broken(qemu_probe):
    assert False
@pytest.mark.qemu_defect(affected="<1.0", fixed_in="1.0", reason="fixed long ago")
def test_not_affected(qemu_probe):
    pass
@pytest.mark.qemu_defect(affected=">=1.0", fixed_in="2.0", reason="needs a feature")
@pytest.mark.qemu_feature("no-such-capability")
def test_skipped(qemu_probe):
    pass
"""


def _record(outcome: str) -> dict[str, object]:
    return {"test": "t", "reason": "r", "fixed_in": "?", "affected": ">=1.0",
            "applied": True, "outcome": outcome}


@pytest.mark.parametrize(("outcomes", "cell"), [
    (["xfailed", "passed"], REPRODUCED),
    (["passed"], FIXED),
    (["xpassed"], FIXED),
    (["skipped"], NOT_APPLICABLE),
    (["failed", "passed"], FAILED),
    (["skipped", "failed"], FAILED),
])
def test_verdict(outcomes: list[str], cell: str) -> None:
    assert verdict([_record(o) for o in outcomes]) == cell


def test_a_defect_missing_from_a_run_is_not_applicable_there() -> None:
    first = RunResult("QEMU 10.0.2", [_record("xfailed")])
    second = RunResult("QEMU 10.2.2", [])
    table = format_table([first, second])
    assert table[2].split(" | ")[:2] == [REPRODUCED.ljust(14), NOT_APPLICABLE]


@pytest.mark.fastsnap
def test_run_writes_records_and_report_prints_the_table(pytester: pytest.Pytester,
                                                        tmp_path: Path) -> None:
    pytester.makepyfile(DEMO)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    result = pytester.runpytest_subprocess("--fastsnap", "-p", "no:randomly",
                                           f"--fastsnap-report-json={first}")
    result.assert_outcomes(xfailed=1, passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*fastsnap: known QEMU defects by version*",
                                 "QEMU *.*.* * | defect (fix)",
                                 "fixed * | fixed long ago (fix: 1.0)",
                                 "not applicable*| needs a feature (fix: 2.0)",
                                 "reproduced * | still broken (fix: never)"])
    data = json.loads(first.read_text())
    assert data["qemu"]["version"] and data["column"] == f"QEMU {data['qemu']['version']}"
    # A second run, as if on another version: one column each.
    data["column"] = "QEMU 99.0.0"
    second.write_text(json.dumps(data))
    out = subprocess.run([*FASTSNAP, "report", str(first), str(second)], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0].split(" | ")[1].strip() == "QEMU 99.0.0"
    assert [line.split(" | ")[-1] for line in out[2:]] == [
        "fixed long ago (fix: 1.0)", "needs a feature (fix: 2.0)",
        "still broken (fix: never)"]


@pytest.mark.parametrize(("content", "says"), [
    (None, "No such file or directory"),
    ("{", "not JSON"),
    ('{"format": 99}', "not a --fastsnap-report-json file"),
])
def test_report_rejects_bad_files(tmp_path: Path, content: str | None, says: str) -> None:
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    result = subprocess.run([*FASTSNAP, "report", str(path)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 2
    assert says in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
