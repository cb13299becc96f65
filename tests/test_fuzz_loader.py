"""Smoke of `fastsnap fuzz loader` (libFuzzer on the C parser, seconds) and of the
sparse FSX1 input encoding its seeds use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_fastsnap.fuzz import extents
from pytest_fastsnap.fuzz.differential import compare_readers
from pytest_fastsnap.fuzz.libfuzzer import FuzzerBuildError, build_fuzzer, compact_seed, seed_corpus
from pytest_fastsnap.snapshot.writer import write_snapshot

PS = 4096


def _snapshot(tmp_path: Path) -> Path:
    return write_snapshot(tmp_path / "s.img", "pc-q35-10.0",
                          [("pc.ram", 8 * PS, {0: b"\x11" * PS, 5: b"\x22" * PS}),
                           ("pc.bios", b"\x5a" * PS)],
                          vmdesc={"page_size": PS, "devices": []})


def test_sparse_encoding_round_trips_and_is_small(tmp_path: Path) -> None:
    raw = _snapshot(tmp_path).read_bytes()
    blob = extents.encode(raw)
    assert blob.startswith(b"FSX1") and len(blob) < len(raw) // 10
    assert extents.decode(blob) == raw
    decoded = extents.decode_to(blob, tmp_path / "d.img")
    assert decoded.read_bytes() == raw
    assert compare_readers(decoded).python is None  # still a valid snapshot
    assert extents.decode(b"not encoded") == b"not encoded"


def test_compacted_seed_is_a_valid_encoded_snapshot(tmp_path: Path) -> None:
    seed = compact_seed(_snapshot(tmp_path), tmp_path / "seed")
    assert seed is not None
    verdicts = compare_readers(extents.decode_to(seed.read_bytes(), tmp_path / "seed.img"))
    assert verdicts.agree and verdicts.c is None, str(verdicts)
    slim = compact_seed(_snapshot(tmp_path), tmp_path / "slim", slim=True)
    assert slim is not None and seed_corpus(tmp_path / "seeds", []) >= 1


def test_loader_campaign_runs_and_counts(tmp_path: Path) -> None:
    if shutil.which("clang") is None:
        pytest.skip("clang not found on PATH: libFuzzer needs clang")
    try:
        build_fuzzer("asan")
    except FuzzerBuildError as err:
        pytest.skip(f"libFuzzer harness does not build here: {err}")
    res = subprocess.run([sys.executable, "-m", "pytest_fastsnap.cli", "fuzz", "loader",
                          "--duration", "3", "--variant", "asan", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False,
                         env=dict(os.environ))
    assert res.returncode == 0, res.stdout + res.stderr
    (summary,) = json.loads((tmp_path / "loader-summary.json").read_text())
    assert summary["execs"] > 0 and summary["crashes"] == []
    assert summary["readers"]["disagree"] == 0
    assert summary["total_execs"]["format-asan"] >= summary["execs"]


def test_bridge_rp_campaign_covers_recovery_messages(tmp_path: Path) -> None:
    """The return-path harness runs as a resumed bridge, seeded with RECV_BITMAP
    (padding bits set) and RESUME_ACK: seconds of it find nothing.  (Checked
    once by hand: with the bitmap's past-the-block check removed from
    bridge_resume.c, it aborts within its first 100 runs.)"""
    if shutil.which("clang") is None:
        pytest.skip("clang not found on PATH: libFuzzer needs clang")
    try:
        build_fuzzer("asan", "bridge-rp")
    except FuzzerBuildError as err:
        pytest.skip(f"libFuzzer harness does not build here: {err}")
    res = subprocess.run([sys.executable, "-m", "pytest_fastsnap.cli", "fuzz", "loader",
                          "--target", "bridge-rp", "--duration", "3", "--variant", "asan",
                          "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False,
                         env=dict(os.environ))
    assert res.returncode == 0, res.stdout + res.stderr
    (summary,) = json.loads((tmp_path / "loader-summary.json").read_text())
    assert summary["target"] == "bridge-rp" and summary["seeds"] >= 6
    assert summary["execs"] > 0 and summary["crashes"] == []


@pytest.mark.fastsnap
def test_working_set_reader_fuzzes_clean(tmp_path: Path) -> None:
    """libFuzzer on the bridge's --ws reader (src/fuzz_bridge_ws.c) under
    ASan+UBSan, seeded with valid files from the Python writer: every
    accepted file lists existing pages once, every refusal is E_WS."""
    from pytest_fastsnap.restore.wsfile import WorkingSet, encode_ws

    try:
        harness = build_fuzzer("asan", "bridge-ws")
    except FuzzerBuildError as err:
        pytest.skip(f"libFuzzer harness cannot be built: {err}")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    blocks = [("pc.ram", 64 * 4096), ("pc.bios", 4 * 4096)]
    for i, entries in enumerate(([], [(0, 3), (1, 0)], [(0, p) for p in range(64)])):
        (corpus / f"seed{i}").write_bytes(encode_ws(WorkingSet(4096, blocks, entries)))
    res = subprocess.run([str(harness), "-runs=20000", "-max_len=2048", "-seed=1",
                          f"-artifact_prefix={tmp_path}/", str(corpus)], capture_output=True,
                         text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Done 20000 runs" in res.stderr, res.stderr[-2000:]
