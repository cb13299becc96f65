"""`fastsnap bench`: its help, its plot, and a run without matplotlib."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
                   "--results-dir", "--no-plot"):
        assert option in res.stdout, option


def test_plot_shows_every_bar_and_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """The bridge's time to running (~0.01 s, measured) next to QEMU's seconds:
    every bar's top lies inside its axes, and every label inside the figure."""
    pytest.importorskip("matplotlib", reason="matplotlib (pip install 'pytest-fastsnap[bench]')")
    import matplotlib.pyplot as plt

    from pytest_fastsnap.restore.bench import plot

    figures: list = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure plot() draws

    results = [_result(256, {"qemu-precopy": 0.31, "loader-bridge": 0.009},
                       {"qemu-precopy": 0.31, "loader-bridge": 0.52}),
               _result(4096, {"qemu-precopy": 4.8, "loader-bridge": 0.012},
                       {"qemu-precopy": 4.8, "loader-bridge": 7.9})]
    plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    fig = figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    for ax in fig.axes:
        bottom, top = ax.get_ylim()
        heights = [p.get_height() for p in ax.patches]
        assert heights and all(bottom < h < top for h in heights), (bottom, top, heights)
        labels = [t for t in ax.texts if t.get_text()]
        assert len(labels) == len(heights)
        for text in labels:
            box = text.get_window_extent(renderer)
            assert page.x0 <= box.x0 and box.x1 <= page.x1, text.get_text()
            assert page.y0 <= box.y0 and box.y1 <= page.y1, text.get_text()
            assert box.y1 <= ax.get_window_extent(renderer).y1, f"{text.get_text()} clipped"


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
