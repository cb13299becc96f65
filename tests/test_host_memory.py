"""The bench report's host-memory line: THP and free page reporting, read
from sysfs (fake trees here, the real one last)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_fastsnap.restore.host_memory import (
    describe,
    memory_state,
    memory_state_delta,
)


def _tree(root: Path, order: str | None, reported: str = "1000") -> tuple[Path, Path]:
    rep, thp = root / "page_reporting", root / "thp"
    thp.mkdir(parents=True)
    (thp / "enabled").write_text("always [madvise] never\n")
    (thp / "defrag").write_text("always defer defer+madvise [madvise] never\n")
    if order is not None:
        rep.mkdir()
        (rep / "page_reporting_order").write_text(order + "\n")
        (rep / "reported_kib").write_text(reported + "\n")
    return rep, thp


@pytest.mark.parametrize(("order", "on", "words"), [
    ("9", True, "free page reporting on (order 9)"),
    ("11", False, "free page reporting off (order 11)"),
    (None, False, "no free page reporting"),
    ("garbage", False, "no free page reporting"),
])
def test_reporting_state_is_read_from_the_order(tmp_path: Path, order: str | None, on: bool,
                                                words: str) -> None:
    state = memory_state(*_tree(tmp_path, order))
    assert state["page_reporting"] is on, state
    assert state["thp"] == "madvise" and state["thp_defrag"] == "madvise", state
    line = describe(state)
    assert line.startswith("host memory: THP madvise; ") and words in line, line


def test_delta_counts_what_went_back_in_mib(tmp_path: Path) -> None:
    rep, thp = _tree(tmp_path, "9", "1000")
    before = memory_state(rep, thp)
    (rep / "reported_kib").write_text(str(1000 + 3 * 1024) + "\n")
    after = memory_state_delta(before, memory_state(rep, thp))
    assert after["reported_mib"] == 3, after
    assert "3 MiB reported during this run" in describe(after)
    # nothing counted: no figure, and the line does not invent one
    gone = memory_state_delta(memory_state(tmp_path / "x", thp), memory_state(tmp_path / "x", thp))
    assert gone["reported_mib"] is None and "reported during" not in describe(gone)


def test_this_host_reads_its_real_thp_mode() -> None:
    state = memory_state()
    if not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
        pytest.skip("this kernel has no /sys/kernel/mm/transparent_hugepage")
    assert state["thp"] in {"always", "madvise", "never"}, state
