"""pytest-fastsnap plugin: options, markers, report header and summary, log sections.

Inert without --fastsnap: no probe runs, no QEMU starts, and tests that need
QEMU are skipped with a reason that says to pass --fastsnap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from typing import Any

import pytest

from pytest_fastsnap import fixtures, workdirs
from pytest_fastsnap.config import add_options, get_config
from pytest_fastsnap.markers import MARKERS, apply_markers, marker_problems
from pytest_fastsnap.plugin_state import (
    ACCEL_KEY,
    ARTIFACTS_PROPERTY,
    CONFIG_KEY,
    DEFECT_PROPERTY,
    MACHINES_KEY,
    MATRIX_PROPERTY,
    PHASE_REPORTS_KEY,
    PROBE_DST_KEY,
    PROBE_KEY,
    SESSION_DIR_KEY,
)
from pytest_fastsnap.qemu import process
from pytest_fastsnap.qemu.probe import ProbeError, probe

SKIP_REASON = "boots QEMU: pass --fastsnap (or set FASTSNAP=1) to run it"


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    fs_config = get_config(config)
    config.stash[CONFIG_KEY] = fs_config
    config.pluginmanager.register(fixtures, "fastsnap-fixtures")
    config.pluginmanager.import_plugin("pytest_fastsnap.libvirt_fixtures")
    config.pluginmanager.register(_Summary(), "fastsnap-summary")
    if not fs_config.enabled:
        return
    option = "--qemu-binary"
    try:
        src = probe(fs_config.qemu_binary)
        option = "--qemu-binary-dst"
        dst = probe(fs_config.qemu_binary_dst) if fs_config.qemu_binary_dst else src
        option = "--fastsnap-accel"
        config.stash[ACCEL_KEY] = src.choose_accel(fs_config.accel)
    except ProbeError as err:
        raise pytest.UsageError(f"fastsnap: {option}: {err}") from None
    if not src.mapped_ram:
        raise pytest.UsageError(f"fastsnap: {src.binary} is QEMU {src.version_str}, which has "
                                "no mapped-ram capability; QEMU >= 9.0 is needed")
    config.stash[PROBE_KEY] = src
    config.stash[PROBE_DST_KEY] = dst
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    config.stash[SESSION_DIR_KEY] = workdirs.session_dir(worker)


def pytest_unconfigure(config: pytest.Config) -> None:
    # Whatever a test left running (a crash in a fixture, Ctrl-C) dies here.
    process.kill_all()
    base = config.stash.get(SESSION_DIR_KEY, None)
    if base is not None:
        workdirs.remove(base)


def pytest_report_header(config: pytest.Config) -> list[str]:
    fs_config = config.stash[CONFIG_KEY]
    if not fs_config.enabled:
        return []  # inert: a project that merely has the plugin installed sees no change
    src, dst = config.stash[PROBE_KEY], config.stash[PROBE_DST_KEY]
    accel, why = config.stash[ACCEL_KEY]
    lines = [
        f"fastsnap: QEMU {src.binary} ({src.version_text})",
        f"fastsnap: accelerator {accel}: {why}",
        f"fastsnap: userfaultfd {'usable via ' + src.uffd_reason if src.uffd_usable else 'NOT usable: ' + src.uffd_reason}",  # noqa: E501
        f"fastsnap: mapped-ram {'supported' if src.mapped_ram else 'NOT supported'}",
        f"fastsnap: fast snapshot load (postcopy-ram + mapped-ram) "
        f"{'supported' if src.fast_load else 'not supported'}: {src.fast_load_reason}",
    ]
    if dst is not src:
        lines.append(f"fastsnap: destination QEMU {dst.binary} ({dst.version_text})")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Decide skips and xfails here, at collection, so each skip is reported at
    its test's location (not the plugin's)."""
    if config.stash[CONFIG_KEY].enabled:
        probe_ = config.stash[PROBE_KEY]
        for item in items:
            apply_markers(item, probe_)
        return
    for item in items:
        if item.get_closest_marker("fastsnap") or "fastsnap_config" in getattr(
                item, "fixturenames", ()):
            item.add_marker(pytest.mark.skipif(True, reason=f"{item.name} {SKIP_REASON}"))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector
                               ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """A misused marker is a collection error of its module, naming the marker
    and the test (so the run stops before any test, with or without xdist)."""
    report = yield
    if report.passed:
        problems = [line for node in report.result if isinstance(node, pytest.Item)
                    for line in marker_problems(node)]
        if problems:
            report.outcome = "failed"
            report.longrepr = "fastsnap: bad marker arguments:\n" + "\n".join(problems)
            report.result = []
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report (fixtures read it) and attach QEMU logs on failure."""
    if call.excinfo is not None and not call.excinfo.errisinstance(pytest.skip.Exception):
        for vm in item.stash.get(MACHINES_KEY, []):
            for key, text in vm.report().items():
                if text:
                    item.add_report_section(call.when, key, text)
    report = yield
    item.stash.setdefault(PHASE_REPORTS_KEY, {})[report.when] = report
    if report.when == "call":
        probe_ = item.config.stash.get(PROBE_KEY, None)
        for mark in item.iter_markers("qemu_defect"):
            if probe_ is not None and hasattr(report, "wasxfail"):
                report.user_properties.append((DEFECT_PROPERTY, json.dumps({
                    "test": item.nodeid, "version": probe_.version_str,
                    "reason": mark.kwargs.get("reason", ""),
                    "fixed_in": mark.kwargs.get("fixed_in", "?")})))
    return report


def record_matrix(request: pytest.FixtureRequest, row: str, column: str, outcome: str) -> None:
    """Add one cell of the capability matrix printed in the terminal summary."""
    request.node.user_properties.append(
        (MATRIX_PROPERTY, json.dumps({"row": row, "column": column, "outcome": outcome})))


class _Summary:
    """Collects matrix cells and defects from reports (works across xdist)."""

    def __init__(self) -> None:
        self.matrix: dict[tuple[str, str], str] = {}
        self.defects: list[dict[str, Any]] = []
        self.kept: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, value in report.user_properties:
            if name == MATRIX_PROPERTY:
                cell = json.loads(value)
                self.matrix[(cell["row"], cell["column"])] = cell["outcome"]
            elif name == DEFECT_PROPERTY and report.when == "call":
                self.defects.append(json.loads(value))
            elif name == ARTIFACTS_PROPERTY:
                self.kept[report.nodeid] = value

    def pytest_terminal_summary(self, terminalreporter: Any, config: pytest.Config) -> None:
        if not config.stash[CONFIG_KEY].enabled:
            return
        tr = terminalreporter
        if self.matrix:
            src = config.stash[PROBE_KEY]
            tr.section(f"fastsnap capability matrix: {src.binary} {src.version_str}")
            for line in format_matrix(self.matrix):
                tr.line(line)
        if self.kept:
            tr.section("fastsnap: artifacts of failed tests (snapshots, QEMU logs)")
            for nodeid, path in sorted(self.kept.items()):
                tr.line(f"{nodeid}: {path}")
        if self.defects:
            tr.section("fastsnap: known QEMU defects reproduced")
            for d in sorted(self.defects, key=lambda d: d["test"]):
                tr.line(f"QEMU {d['version']}: {d['reason']} (fix: {d['fixed_in']}) "
                        f"[{d['test']}]")


def format_matrix(matrix: dict[tuple[str, str], str]) -> list[str]:
    rows = sorted({r for r, _ in matrix})
    cols = sorted({c for _, c in matrix})
    width = max(len(r) for r in rows)
    head = " " * width + " | " + " | ".join(cols)
    out = [head, "-" * len(head)]
    for r in rows:
        cells = [matrix.get((r, c), "-").ljust(len(c)) for c in cols]
        out.append(r.ljust(width) + " | " + " | ".join(cells))
    return out
