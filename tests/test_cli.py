"""The `fastsnap` command end to end: save, inspect, verify, restore, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FASTSNAP = [sys.executable, "-m", "pytest_fastsnap.cli"]


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FASTSNAP, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.mark.fastsnap
def test_save_inspect_verify_restore(fastsnap_workdir: Path, fastsnap_accel: str) -> None:
    snap = fastsnap_workdir / "s.img"
    saved = _run("save", str(snap), "--mem", "64M", "--accel", fastsnap_accel,
                 "--offset", "0x10000")
    assert saved.returncode == 0, saved.stderr
    assert Path(f"{snap}.json").exists()
    info = json.loads(_run("inspect", str(snap), "--offset", "0x10000", "--json").stdout)
    assert "microvm.ram" in [b["id"] for b in info["blocks"]]
    assert _run("verify", str(snap), "--offset", "0x10000").returncode == 0
    assert _run("verify", str(snap)).returncode == 2  # wrong offset: not a stream there
    restored = _run("restore", str(snap))
    assert restored.returncode == 0, restored.stderr
    assert "guest running after" in restored.stdout
    assert "fully loaded after" in restored.stdout


@pytest.mark.fastsnap
def test_restore_records_and_replays_a_working_set(fastsnap_workdir: Path,
                                                   fastsnap_accel: str) -> None:
    """`fastsnap restore --record-ws` writes a file the Python reader accepts,
    naming as many pages as it says; `--ws` with it restores again."""
    from pytest_fastsnap.restore.wsfile import read_ws

    snap, ws = fastsnap_workdir / "s.img", fastsnap_workdir / "s.ws"
    saved = _run("save", str(snap), "--mem", "64M", "--accel", fastsnap_accel)
    assert saved.returncode == 0, saved.stderr
    recorded = _run("restore", str(snap), "--record-ws", str(ws))
    assert recorded.returncode == 0, recorded.stderr
    entries = read_ws(ws).entries
    assert f"recorded a working set of {len(entries)} pages to {ws}" in recorded.stdout
    for mode in ("before-run", "after-run"):
        replayed = _run("restore", str(snap), "--ws", str(ws), "--ws-mode", mode)
        assert replayed.returncode == 0, replayed.stderr
        assert "fully loaded after" in replayed.stdout
        if entries:
            assert f"working set of {len(entries)} pages sent {mode}" in replayed.stdout


def test_restore_without_manifest_names_the_problem(tmp_path: Path) -> None:
    snap = tmp_path / "nothing.img"
    snap.write_bytes(b"QEVM")
    result = _run("restore", str(snap))
    assert result.returncode == 2
    assert "nothing.img.json" in result.stderr and "write_manifest" not in result.stderr


def test_restore_of_a_missing_snapshot_names_the_file(tmp_path: Path) -> None:
    result = _run("restore", str(tmp_path / "nope.img"))
    assert result.returncode == 2
    assert result.stderr == f"fastsnap restore: snapshot {tmp_path / 'nope.img'}: no such file\n"


def test_unknown_command_is_a_usage_error() -> None:
    result = _run("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
