"""Smoke of the QEMU campaign machinery (seconds): classification, campaign loop,
triage, reproducer, merge and the CLI's bad-input handling, on real QEMU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_fastsnap.fuzz.campaign import Campaign, RawFinding
from pytest_fastsnap.fuzz.locations import Location, find_locations
from pytest_fastsnap.fuzz.merge import merge
from pytest_fastsnap.fuzz.mutators import Edit, apply_edits
from pytest_fastsnap.fuzz.outcomes import LoadResult, internal_error_line, load_once
from pytest_fastsnap.fuzz.report import write_report
from pytest_fastsnap.fuzz.repro import repro
from pytest_fastsnap.fuzz.target import Target, guest_snapshot, reference_target
from pytest_fastsnap.fuzz.triage import triage
from pytest_fastsnap.plugin_state import PROBE_DST_KEY
from pytest_fastsnap.qemu import process
from pytest_fastsnap.qemu.probe import QemuProbe
from pytest_fastsnap.snapshot.format import parse

pytestmark = pytest.mark.fastsnap

PAGE_SIZE_0 = Edit("pc.ram.header.page_size", "set", 0, "00" * 8, "page_size 0", True)
NO_OP = Edit("pc.ram.header.version", "set", 0, "00000001", "version 1 -> 1", True)
# A change QEMU ignores for this guest (a timer field), so minimisation can drop it.
HARMLESS = Edit("dev:timer/0.cpu_clock_offset", "set", 0, "00" * 8, "timer offset", False)


@pytest.fixture(scope="module")
def target(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Target:
    """A tiny-guest snapshot made like `fastsnap fuzz qemu --guest tiny` makes it."""
    binary = pytestconfig.stash[PROBE_DST_KEY].binary
    work = tmp_path_factory.mktemp("fuzz-target")
    path, offset, device_args = guest_snapshot("tiny", binary, work)
    return reference_target(path, offset, binary, device_args, work)


@pytest.fixture
def locations(target: Target) -> dict[str, Location]:
    return {loc.name: loc for loc in find_locations(parse(target.path))}


@pytest.fixture
def crash_edit(qemu_probe_dst: QemuProbe) -> Edit:
    if qemu_probe_dst.has_feature("fast-snapshot-load"):
        pytest.skip(f"{qemu_probe_dst.binary} checks the header page_size (fast snapshot load "
                    "came with that check): no known-crashing edit for it")
    return PAGE_SIZE_0


def _load(target: Target, locations: dict[str, Location], edits: list[Edit],
          tmp: Path) -> LoadResult:
    path = apply_edits(target.path, tmp / "in.img", edits, locations)
    return load_once(target.binary, target.device_args, path, tmp, digests=target.digests,
                     ranges=target.ranges)


def test_classification(target: Target, locations: dict[str, Location], crash_edit: Edit,
                        tmp_path: Path) -> None:
    crash = _load(target, locations, [crash_edit], tmp_path)
    assert (crash.outcome, crash.signal) == ("signal", "SIGFPE"), crash
    same = _load(target, locations, [NO_OP], tmp_path)
    assert same.outcome == "same_memory", same
    refused = _load(target, locations, [Edit("stream.magic", "set", 0, "51455600", "", True)],
                    tmp_path)
    assert refused.outcome == "refused" and refused.exit_code == 1, refused
    # A completed load whose memory differs is wrong only after memory-safe edits.
    digests = {k: "0" * 64 for k in target.digests}
    wrong = load_once(target.binary, target.device_args, target.path, tmp_path,
                      digests=digests, ranges=target.ranges, memory_safe=True)
    changed = load_once(target.binary, target.device_args, target.path, tmp_path,
                        digests=digests, ranges=target.ranges, memory_safe=False)
    assert (wrong.outcome, changed.outcome) == ("wrong_memory", "changed_memory")
    # A load still going at the time limit is a hang (64 MiB take longer than 1 ms).
    hang = load_once(target.binary, target.device_args, target.path, tmp_path,
                     digests=target.digests, ranges=target.ranges, timeout=0.001)
    assert hang.outcome == "hang", hang


def test_internal_error_text_is_recognised() -> None:
    log = "# qemu-system-x86_64 -incoming defer\nqemu: warning: x\n" \
          "qemu-system-x86_64: ../migration/ram.c:42: f: Assertion `n > 0' failed.\n"
    assert internal_error_line(log) is not None and "Assertion" in internal_error_line(log)
    assert internal_error_line("# cmd\nqemu-system-x86_64: load of migration failed\n") is None


def test_campaign_loop_counts_every_input_and_leaves_nothing(
        target: Target, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    locs = find_locations(parse(target.path))
    campaign = Campaign(target, locs, out, jobs=2, seed=3, duration=None, execs=6,
                        timeout=15, progress=None)
    stats = campaign.run()
    assert stats.execs == 6 == sum(stats.outcomes.values())
    assert stats.readers_agree + stats.readers_disagree == 6
    assert not (out / "work").exists()
    assert process.kill_all() == 0
    # Inputs are a function of (seed, index) alone, whatever the job count.
    again = Campaign(target, locs, out, jobs=1, seed=3, duration=None, execs=1,
                     timeout=15, progress=None)
    assert again.edits_for(4) == campaign.edits_for(4)
    assert campaign.summary("x")["outcomes"]["refused"] == stats.outcomes["refused"]


def test_triage_minimises_signs_and_reproduces(target: Target, locations: dict[str, Location],
                                                crash_edit: Edit, tmp_path: Path) -> None:
    out = tmp_path / "out"
    raw = [RawFinding(0, "signal", "SIGFPE", "signal:SIGFPE:x", (HARMLESS, crash_edit), "",
                      None),
           RawFinding(1, "signal", "SIGFPE", "signal:SIGFPE:x", (crash_edit,), "", None)]
    found = triage(raw, target, locations, out, timeout=15, use_gdb=False, log=lambda m: None)
    assert len(found) == 1 and not (out / "work").exists()
    f = found[0]
    assert f.edits == [crash_edit] and f.hits == 2
    assert f.signature.startswith("signal:SIGFPE:")
    assert (f.verify_exit, f.verify_error) == (2, "E_PAGE_SIZE") and f.invariant_ok
    assert {p.name for p in f.dir.iterdir()} >= {"input.img", "edits.json", "qemu.log",
                                                 "finding.json", "reproduce.sh"}
    reproduced = repro(f.dir, None, 15)
    assert reproduced, reproduced
    # Without its input the reproducer rebuilds it from the base snapshot and the edits.
    (f.dir / "input.img").unlink()
    assert repro(f.dir, None, 15)


def test_merge_deduplicates_by_signature(tmp_path: Path) -> None:
    def campaign(name: str, edits: int, seed: int) -> Path:
        d = tmp_path / name
        fdir = d / "findings" / "F001-signal"
        fdir.mkdir(parents=True)
        (fdir / "finding.json").write_text("{}")
        with open(fdir / "input.img", "wb") as f:  # 8 MiB, one data page
            f.truncate(8 << 20)
            f.seek(4 << 20)
            f.write(b"\x01" * 4096)
        finding = {"id": "F001", "signature": "signal:SIGFPE:x", "class": "signal",
                   "signal": "SIGFPE", "edits": [{"target": "t", "note": "n"}] * edits,
                   "effect": "e", "hits": 1, "file": str(fdir / "input.img"),
                   "verify": {"exit": 2, "error": "E_X"}, "invariant_ok": True,
                   "reproduce": "r"}
        write_report(d, {"execs": 10, "seconds": 5, "outcomes": {"refused": 9, "signal": 1},
                         "readers": {"agree": 10, "disagree": 0}, "seed": seed,
                         "qemu_version": "10.0.2"}, [finding])
        return d

    out = tmp_path / "merged"
    summary, findings = merge([campaign("a", 2, 1), campaign("b", 1, 2)], out)
    assert summary["execs"] == 20 and summary["outcomes"] == {"refused": 18, "signal": 2}
    assert len(findings) == 1 and findings[0]["hits"] == 2 and len(findings[0]["edits"]) == 1
    assert (out / "findings" / "F001-signal" / "finding.json").is_file()
    copied = (out / "findings" / "F001-signal" / "input.img").stat()
    assert copied.st_size == 8 << 20 and copied.st_blocks * 512 < 1 << 20  # still sparse
    assert json.loads((out / "summary.json").read_text())["distinct_findings"] == 1


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_fastsnap.cli", "fuzz", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd, check=False,
                          env=dict(os.environ))


@pytest.mark.parametrize("args, message", [
    (("qemu", "--jobs", "0"), "must be positive"),
    (("qemu", "--guest", "tiny", "snap.img"), "not both"),
    (("qemu", "missing.img", "--out", "o"), "no such snapshot"),
    (("qemu", "--qemu-binary", "/nonexistent/qemu"), "/nonexistent/qemu"),
    (("repro", "nowhere"), "not a finding directory"),
    (("merge", ".", "--out", "m"), "not a campaign directory"),
    (("loader", "--duration", "0"), "must be positive"),
])
def test_cli_bad_input(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    res = _cli(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "m").exists()


def test_cli_refuses_a_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("x")
    res = _cli("qemu", "--execs", "1", "--out", "o", cwd=tmp_path)
    assert res.returncode == 2 and "not an empty directory" in res.stderr
    assert (tmp_path / "o" / "keep").read_text() == "x"
