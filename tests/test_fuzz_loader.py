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


@pytest.fixture(scope="module")
def ws_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of the working-set harness's layout (pc.ram 64 pages, pc.bios 4)."""
    from pytest_fastsnap.fuzz.ws_differential import harness_snapshot
    from pytest_fastsnap.fuzz.wsgen import HARNESS_LAYOUT

    return harness_snapshot(tmp_path_factory.mktemp("ws") / "layout.img", HARNESS_LAYOUT)


@pytest.mark.parametrize("variant", ["release", "asan"])
def test_generated_working_sets_get_one_verdict_from_both_readers(
        tmp_path: Path, ws_snapshot: Path, variant: str) -> None:
    """The structure-aware generator (fuzz/wsgen.py) makes valid files and each
    kind of edit; on every file the loader (`serve --ws --describe`, which
    lists the entries it read; release and ASan+UBSan) and the Python reader
    agree: both refuse, or both accept with the same entries in order."""
    import random

    from pytest_fastsnap.fuzz.ws_differential import compare_ws_readers
    from pytest_fastsnap.fuzz.wsgen import HARNESS_LAYOUT, MUTATIONS, generate

    rng = random.Random(11)
    kinds: set[str] = set()
    accepted = refused = 0
    for i in range(150 if variant == "release" else 60):
        kind, data = generate(HARNESS_LAYOUT, rng)
        path = tmp_path / f"{i}.ws"
        path.write_bytes(data)
        verdicts = compare_ws_readers(path, ws_snapshot, HARNESS_LAYOUT, variant=variant)
        assert verdicts, f"{kind}: {verdicts} ({data.hex()})"
        kinds.update(kind.split("+"))
        if kind == "valid":
            assert verdicts.c is None, f"a valid file refused: {verdicts}"
        if verdicts.c is None:
            accepted += 1
        else:
            refused += 1
            assert verdicts.c == "E_WS", verdicts
    if variant == "release":
        assert kinds >= {*MUTATIONS, "valid", "hash"}, sorted(kinds)
    assert accepted and refused


def test_ws_differential_catches_a_reader_that_ignores_block_lengths(
        tmp_path: Path, ws_snapshot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison can fail: with the Python side's layout check reduced to
    the block ids, a file recorded on a longer pc.ram is accepted by Python
    and refused by the loader, and the verdicts say so."""
    from pytest_fastsnap.fuzz import ws_differential
    from pytest_fastsnap.fuzz.wsgen import HARNESS_LAYOUT
    from pytest_fastsnap.restore.wsfile import Layout, WorkingSet, encode_ws
    from pytest_fastsnap.verdict import Verdict

    longer = [("pc.ram", 65 * 4096), ("pc.bios", 4 * 4096)]
    path = tmp_path / "longer.ws"
    path.write_bytes(encode_ws(WorkingSet(4096, longer, [(0, 1)])))
    assert ws_differential.compare_ws_readers(path, ws_snapshot, HARNESS_LAYOUT)

    def ids_only(ws: WorkingSet, layout: Layout, **_: object) -> Verdict:
        ok = [n for n, _ in ws.blocks] == [n for n, _ in layout.blocks]
        return Verdict(ok, "ids only")
    monkeypatch.setattr(ws_differential, "check_layout", ids_only)
    verdicts = ws_differential.compare_ws_readers(path, ws_snapshot, HARNESS_LAYOUT)
    assert not verdicts
    assert str(verdicts).startswith("C E_WS (exit 2) vs Python ok"), str(verdicts)


def test_working_set_campaign_runs_both_readers(tmp_path: Path) -> None:
    """`fastsnap fuzz loader --target bridge-ws`: libFuzzer on the --ws reader
    (ASan+UBSan) seeded with 200 structure-aware files, then those and the
    new corpus inputs through both readers: no crash, no disagreement."""
    if shutil.which("clang") is None:
        pytest.skip("clang not found on PATH: libFuzzer needs clang")
    try:
        build_fuzzer("asan", "bridge-ws")
    except FuzzerBuildError as err:
        pytest.skip(f"libFuzzer harness does not build here: {err}")
    res = subprocess.run([sys.executable, "-m", "pytest_fastsnap.cli", "fuzz", "loader",
                          "--target", "bridge-ws", "--duration", "3", "--variant", "asan",
                          "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False,
                         env=dict(os.environ))
    assert res.returncode == 0, res.stdout + res.stderr
    (summary,) = json.loads((tmp_path / "loader-summary.json").read_text())
    assert summary["target"] == "bridge-ws" and summary["seeds"] == 200
    assert summary["execs"] > 0 and summary["crashes"] == []
    assert summary["readers"]["disagree"] == 0
    assert summary["readers"]["agree"] >= 200, summary["readers"]
    assert "bridge-ws asan:" in res.stdout and "disagree 0" in res.stdout
