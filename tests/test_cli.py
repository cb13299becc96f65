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


DIRTY_STRIDE = 8   # the tiny guest in dirty mode rewrites every 8th page of its range


@pytest.mark.fastsnap
def test_restore_records_and_replays_a_working_set(fastsnap_workdir: Path,
                                                   fastsnap_accel: str) -> None:
    """`fastsnap save --dirty` saves a tiny guest that goes on rewriting pages
    once restored; `fastsnap restore --record-ws --eager-delay 1` holds the
    eager stream back for a second, so those writes are page requests.  The
    file must be of the snapshot's layout (page size, block ids and lengths),
    list pages the guest's workload wrote (its range, every 8th page), as
    many as the command says; `--ws` with it restores again, both modes, and
    says it sent them all."""
    from pytest_fastsnap.restore.wsfile import check_layout, read_ws, snapshot_layout
    from pytest_fastsnap.snapshot.format import parse

    snap, ws = fastsnap_workdir / "s.img", fastsnap_workdir / "s.ws"
    saved = _run("save", str(snap), "--mem", "64M", "--accel", fastsnap_accel, "--dirty")
    assert saved.returncode == 0, saved.stderr
    recorded = _run("restore", str(snap), "--record-ws", str(ws), "--eager-delay", "1")
    assert recorded.returncode == 0, recorded.stderr
    assert "only page requests served until" in recorded.stdout, recorded.stdout
    layout = snapshot_layout(parse(snap))
    working_set = read_ws(ws)
    verdict = check_layout(working_set, layout, nonempty=True)
    assert verdict, verdict
    entries = working_set.entries
    assert f"recorded a working set of {len(entries)} pages to {ws}" in recorded.stdout
    ram = [name for name, _ in layout.blocks].index("microvm.ram")
    start = 0x400000 // 4096    # TinyParams' default range start (pfn; the block starts at 0)
    written = [p for b, p in entries if b == ram and p >= start and p % DIRTY_STRIDE == 0]
    assert written, f"none of the {len(entries)} recorded pages is one the workload writes"
    for mode in ("before-run", "after-run"):
        replayed = _run("restore", str(snap), "--ws", str(ws), "--ws-mode", mode)
        assert replayed.returncode == 0, replayed.stderr
        assert "fully loaded after" in replayed.stdout
        assert f"working set of {len(entries)} pages sent {mode}" in replayed.stdout, \
            replayed.stdout


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
