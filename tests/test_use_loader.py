"""use_loader: a benchmark resolves the loader once; restores inside it never
look at the sources again (no rebuild midway, one binary per report)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pytest_fastsnap.native import loader as native_loader
from pytest_fastsnap.restore.strategies import loader_binary, use_loader


def test_restores_in_the_block_use_the_fixed_binary(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    calls: list[str] = []

    def fake_loader_path(variant: str = "release") -> Path:
        calls.append(variant)
        return tmp_path / f"built-{len(calls)}"

    monkeypatch.setattr(native_loader, "loader_path", fake_loader_path)
    assert loader_binary() == tmp_path / "built-1"      # outside: the cached build
    fixed = tmp_path / "fixed"
    with use_loader(fixed) as got:
        assert got == fixed
        assert [loader_binary() for _ in range(3)] == [fixed] * 3
        inner = tmp_path / "inner"
        with use_loader(inner):
            assert loader_binary() == inner
        assert loader_binary() == fixed                 # the outer one again
        # another thread has its own context: the cached build, not this block's
        seen: list[Path] = []
        t = threading.Thread(target=lambda: seen.append(loader_binary()))
        t.start()
        t.join()
        assert seen == [tmp_path / "built-2"]
    assert calls == ["release", "release"], calls       # never from inside the block
    assert loader_binary() == tmp_path / "built-3"      # and back after it


def test_the_block_ends_cleanly_when_a_restore_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="restore failed"), use_loader(tmp_path / "x"):
        raise RuntimeError("restore failed")
    assert loader_binary() != tmp_path / "x"
