"""`fastsnap bench`: its help, its plot, and a run without matplotlib."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_fastsnap.restore.ceiling import CEILING_WORKLOAD
from pytest_fastsnap.restore.host_memory import describe as describe_memory
from pytest_fastsnap.restore.pinning import pinnable

FASTSNAP = [sys.executable, "-m", "pytest_fastsnap.cli"]


def _result(size_mib: int, running: dict[str, float], loaded: dict[str, float]) -> dict:
    return {"size_bytes": size_mib << 20, "strategies": {
        name: {"time_to_running_s": running[name], "time_to_loaded_s": loaded[name]}
        for name in running}}


@pytest.mark.parametrize("spelling", [["bench", "--help"], ["bench", "--", "--help"]])
def test_help_shows_the_options(spelling: list[str]) -> None:
    res = subprocess.run([*FASTSNAP, *spelling], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr
    for option in ("--sizes", "--repeat", "--strategies", "--probes", "--qemu-binary",
                   "--results-dir", "--no-plot", "--workloads", "--no-ceiling", "--no-ws"):
        assert option in res.stdout, option


def _with_workloads(res: dict, done: dict[str, dict[str, float]],
                    blocktime: dict[str, dict[str, float]]) -> dict:
    res["workloads"] = {w: {name: {"done_s": t, "blocktime_ms": blocktime[w].get(name)}
                            for name, t in per.items()} for w, per in done.items()}
    return res


def test_plot_shows_every_bar_and_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """The bridge's time to running (~0.01 s, measured) next to QEMU's seconds,
    workload times from 0.004 s to 9 s, blocktimes of 0 ms and 3000 ms: four
    panels, every bar's top inside its axes' limits (a log axis above its
    floor, blocktime's linear axis from 0), one label per bar, every label
    inside the figure and below its axes' top."""
    pytest.importorskip("matplotlib", reason="matplotlib (pip install 'pytest-fastsnap[bench]')")
    import matplotlib.pyplot as plt

    from pytest_fastsnap.restore.bench import plot

    figures: list = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure plot() draws

    results = [
        _with_workloads(_result(256, {"qemu-precopy": 0.31, "loader-bridge": 0.009},
                                {"qemu-precopy": 0.31, "loader-bridge": 0.52}),
                        {"rand:10": {"qemu-precopy": 0.4, "loader-bridge": 0.004},
                         "seq:100": {"qemu-precopy": 0.9, "loader-bridge": 1.7}},
                        {"rand:10": {"loader-bridge": 0}, "seq:100": {"loader-bridge": 12}}),
        _with_workloads(_result(4096, {"qemu-precopy": 4.8, "loader-bridge": 0.012},
                                {"qemu-precopy": 4.8, "loader-bridge": 7.9}),
                        {"rand:10": {"qemu-precopy": 5.1, "loader-bridge": 0.6},
                         "seq:100": {"qemu-precopy": 9.0, "loader-bridge": 8.2}},
                        {"rand:10": {"loader-bridge": 3000}, "seq:100": {"loader-bridge": 0}}),
    ]
    plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    fig = figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == [
        "time to running", "time to fully loaded", "workload done (from migrate-incoming)",
        "vCPU blocktime during the workload"]
    counts = []
    for ax in shown:
        bottom, top = ax.get_ylim()
        heights = [p.get_height() for p in ax.patches]
        counts.append(len(heights))
        if ax.get_yscale() == "log":
            assert heights and all(bottom < h < top for h in heights), (bottom, top, heights)
        else:
            assert heights and all(bottom <= h < top for h in heights), (bottom, top, heights)
        labels = [t for t in ax.texts if t.get_text()]
        assert len(labels) == len(heights)
        for text in labels:
            box = text.get_window_extent(renderer)
            assert page.x0 <= box.x0 and box.x1 <= page.x1, text.get_text()
            assert page.y0 <= box.y0 and box.y1 <= page.y1, text.get_text()
            assert box.y1 <= ax.get_window_extent(renderer).y1, f"{text.get_text()} clipped"
    assert counts == [4, 4, 8, 4], counts      # every value has its bar


@pytest.mark.fastsnap
def test_bench_without_matplotlib_writes_table_and_json(tmp_path: Path) -> None:
    """matplotlib missing: one note up front, then the run, the table and the
    JSON in ./fastsnap-bench-results, no PNG, exit 0."""
    block = tmp_path / "no-matplotlib" / "matplotlib"
    block.mkdir(parents=True)
    (block / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    env_path = f"{block.parent}:{Path(__file__).resolve().parents[1]}"
    res = subprocess.run([*FASTSNAP, "bench", "--sizes", "24M", "--repeat", "1", "--probes",
                          "0", "--strategies", "loader-bridge"], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=env_path),
                         check=False)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines()[0].startswith("fastsnap bench: matplotlib is not installed")
    out = tmp_path / "fastsnap-bench-results"
    reports = list(out.glob("bench-restore-*.json"))
    assert len(reports) == 1 and not list(out.glob("*.png")), list(out.iterdir())
    report = json.loads(reports[0].read_text())
    assert report["results"][0]["strategies"]["loader-bridge"]["time_to_loaded_s"] > 0
    assert "loader-bridge" in res.stdout and str(reports[0]) in res.stdout


@pytest.mark.fastsnap
def test_bench_reports_what_the_guest_feels(tmp_path: Path) -> None:
    """A real run at 64 MiB: workload times for every strategy with the
    guest's own TOUCH OK, QEMU's blocktime for the bridge, the QEMU-to-QEMU
    postcopy ceiling with the eager/ceiling ratio, the working-set
    comparison, and qemu-fast skipped with QEMU's reason (10.0 has no fast
    load).  Latency as the guest sees it: a fully loaded guest (precopy)
    reports ~0 faulted reads, the bridge's random touch reports faulted reads
    above the guest's threshold; --guest-latency gives both channels.
    Figures present and sane; no timing is asserted."""
    res = subprocess.run([*FASTSNAP, "bench", "--sizes", "64M", "--repeat", "1", "--probes",
                          "0", "--workloads", "rand:10,seq:1", "--no-plot",
                          "--guest-latency", "rand:10", "--strategies",
                          "qemu-precopy,loader-bridge,loader-bridge+preempt,qemu-fast"],
                         capture_output=True,
                         text=True, timeout=600, cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stderr
    report = json.loads(next((tmp_path / "fastsnap-bench-results").glob("*.json")).read_text())
    result = report["results"][0]
    assert len(report["load_average"]) == 3
    # the host-memory settings that change restore figures, in the header and JSON
    assert report["host_memory"]["thp"] in {"always", "madvise", "never", None}, report
    assert describe_memory(report["host_memory"]) in res.stdout, res.stdout[-2000:]
    # one loader for the whole run, named in the header and the JSON
    assert f"loader: {report['loader']}; QEMU: " in res.stdout, res.stdout[:500]
    bridge = result["strategies"]["loader-bridge"]
    assert bridge["blocktime_ms"] is not None and bridge["blocktime_ms"] >= 0
    assert bridge["runs"][0]["blocktime"]["vcpu_ms"], bridge["runs"][0]["blocktime"]
    assert result["strategies"]["qemu-precopy"]["blocktime_ms"] is None   # no postcopy
    # the preempt variant really ran with a preempt channel, the plain one without
    assert result["strategies"]["loader-bridge+preempt"]["runs"][0]["loader"]["preempt"], result
    assert not bridge["runs"][0]["loader"]["preempt"], bridge["runs"][0]["loader"]
    if "qemu-fast" not in result["strategies"]:
        assert result["skipped"]["qemu-fast"], result["skipped"]
        assert "qemu-fast: skipped: " in res.stdout
        assert f"64 MiB: qemu-fast skipped: {result['skipped']['qemu-fast']}" in res.stdout
    for key in ("rand:10", "seq:1"):
        per = result["workloads"][key]
        # the ceiling ran each workload too, QEMU as the postcopy source
        assert per[CEILING_WORKLOAD]["runs"][0]["preempt"] is True, per[CEILING_WORKLOAD]
        assert f"workload {key}%: {CEILING_WORKLOAD} " in res.stdout
        # each bridge workload is set against QEMU as the postcopy source
        q = per[CEILING_WORKLOAD]["done_s"]
        a = per["loader-bridge"]["done_s"]
        assert (f"workload {key}%: loader-bridge {a:.3f}s vs qemu-precopy "
                in res.stdout), res.stdout[-3000:]
        assert f"; vs QEMU as the postcopy source {q:.3f}s = {a / q:.2f}x" in res.stdout
        for strategy in ("qemu-precopy", "loader-bridge", "loader-bridge+preempt",
                         CEILING_WORKLOAD):
            run = per[strategy]["runs"][0]
            assert per[strategy]["done_s"] > 0, (key, strategy)
            assert run["workload"]["line"].startswith("TOUCH OK"), run["workload"]
            assert run["workload"]["pages"] > 0
        assert per["loader-bridge"]["blocktime_ms"] is not None
        assert f"workload {key}%: loader-bridge " in res.stdout
        assert f"workload {key}%: loader-bridge+preempt " in res.stdout
        pages = per["qemu-precopy"]["runs"][0]["workload"]["pages"]
        assert per["qemu-precopy"]["guest_faulted"] <= max(2, pages // 50), per["qemu-precopy"]
    rand = result["workloads"]["rand:10"]["loader-bridge"]
    # Whether the touch races the eager stream at 64 MiB depends on the host's
    # load (the eager stream can finish first), so only what must hold either
    # way is asserted here; test_guest_latency.py holds the stream to make
    # faults certain.  10: the guest's threshold.
    assert rand["guest_faulted"] == 0 or rand["guest_p50_us"] > 10, rand
    assert rand["guest_p99_us"] >= rand["guest_p50_us"], rand
    glat = result["guest_latency"]
    assert glat["workload"] == "rand:10"
    pinned = pinnable()
    assert glat["modes"] == ["no-preempt", "preempt", *(["preempt+pin"] if pinned else []),
                             CEILING_WORKLOAD]
    if pinned:      # every thread of the request path and the eager stream was found
        pin = glat["preempt+pin"]["runs"][0]["pin"]
        assert pin["missing"] == [] and not pin["errors"], pin
    for mode in glat["modes"]:
        st = glat[mode]
        assert st["eager_mib_s"] > 0, st
        if st["faulted"]:
            assert st["p99_us"] >= st["p50_us"] > 10, (mode, st)
            assert st["p99_over_p50"] == pytest.approx(st["p99_us"] / st["p50_us"]), st
        assert st["done_s"] > 0, (mode, st)
        if mode == CEILING_WORKLOAD:    # no loader: QEMU was the source
            assert st["loader_p99_us"] is None and st["runs"][0]["preempt"], st
            continue
        # the preempt modes split the loader's serving time into pread and send
        served = [(r["loader"]["preempt"] or {}).get("requests_served", 0) for r in st["runs"]]
        if mode != "no-preempt" and all(served):
            assert st["loader_read_p99_us"] > 0 and st["loader_send_p99_us"] > 0, st
            assert f", {mode}: " in res.stdout and "loader read/send p99 " in res.stdout
        if mode == "no-preempt":
            assert st["loader_read_p99_us"] is None, st
    assert "guest-visible request latency" in res.stdout and " preempt " in res.stdout
    assert f"guest latency rand 10%, {CEILING_WORKLOAD}: " in res.stdout
    ceiling = result["ceiling"]
    assert ceiling["postcopy_bytes"] > 0 and ceiling["postcopy_mib_s"] > 0, ceiling
    assert len(ceiling["runs"]) == 1 and ceiling["runs"][0]["blocktime"]["vcpu_ms"], ceiling
    assert "of the ceiling" in res.stdout
    # the ceiling ran in the round of the strategies it is compared with
    eager = result["strategies"]["loader-bridge"]["runs"][0]["loader"]["eager_throughput_mib_s"]
    per_round = f"{eager / ceiling['runs'][0]['postcopy_mib_s']:.2f}x"
    assert f"of the ceiling (round by round: {per_round})" in res.stdout, res.stdout[-3000:]
    ws = result["working_set"]
    assert ws["ws_pages"] > 0
    for mode in ("none", "before-run", "after-run"):
        assert ws[mode]["done_s"] > 0 and ws[mode]["blocktime_ms"] is not None, (mode, ws)
    assert ws["before-run"]["runs"][0]["loader"]["pages_ws"] == ws["ws_pages"]
