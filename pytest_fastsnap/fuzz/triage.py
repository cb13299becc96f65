"""From raw findings to distinct, minimised, reproducible ones.

One representative per preliminary signature is re-run, minimised to the
fewest edits that still give the same class (and signal), re-signed (gdb
backtrace frames for crashes when gdb is installed; the minimised fields for
wrong memory and hangs), and deduplicated again.  Each distinct finding gets
``OUT/findings/<id>/`` with the minimised input (sparse), its edits, QEMU's
log, ``finding.json`` and the reproducer command, and is checked against the
invariant: ``fastsnap verify`` must refuse it (exit 2).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_fastsnap.fuzz.campaign import RawFinding
from pytest_fastsnap.fuzz.differential import c_verdict, compare_readers
from pytest_fastsnap.fuzz.locations import Location
from pytest_fastsnap.fuzz.mutators import Edit, apply_edits, dump_edits, edits_to_json
from pytest_fastsnap.fuzz.outcomes import LoadResult, load_once
from pytest_fastsnap.fuzz.signature import field_signature, frames_signature, stderr_signature
from pytest_fastsnap.fuzz.target import Target
from pytest_fastsnap.qemu import process
from pytest_fastsnap.qemu.machine import QemuError, QemuMachine
from pytest_fastsnap.qemu.migration import MigrationFailed, _start_incoming
from pytest_fastsnap.qemu.qmp import QMPConnectionError

__all__ = ["Finding", "gdb_frames", "minimise", "reproduce", "triage"]

FRAME = re.compile(r"^#\d+\s+(?:0x[0-9a-f]+ in )?([A-Za-z_][\w:.~<>]*|\?\?)")


@dataclass
class Finding:
    id: str
    cls: str
    signal: str | None
    signature: str
    edits: list[Edit]
    effect: str
    hits: int
    dir: Path
    frames: list[str] = field(default_factory=list)
    verify_exit: int | None = None
    verify_error: str | None = None

    @property
    def invariant_ok(self) -> bool:
        return self.cls == "reader_disagreement" or self.verify_exit == 2

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "signature": self.signature, "class": self.cls,
                "signal": self.signal, "edits": edits_to_json(self.edits),
                "effect": self.effect, "hits": self.hits,
                "file": str(self.dir / "input.img"), "frames": self.frames,
                "verify": {"exit": self.verify_exit, "error": self.verify_error},
                "invariant_ok": self.invariant_ok,
                "reproduce": f"fastsnap fuzz repro {self.dir}"}


def reproduce(target: Target, edits: Sequence[Edit], locations: dict[str, Location],
              workdir: Path, timeout: float) -> LoadResult:
    path = apply_edits(target.path, workdir / "input.img", edits, locations)
    return load_once(target.binary, target.device_args, path, workdir, name="triage",
                     offset=target.offset, timeout=timeout, digests=target.digests,
                     ranges=target.ranges, memory_safe=all(e.memory_safe for e in edits))


def minimise(edits: Sequence[Edit], still_fails: Callable[[list[Edit]], bool]) -> list[Edit]:
    """Greedy one-at-a-time removal until no single edit can go."""
    current = list(edits)
    shrunk = True
    while shrunk and len(current) > 1:
        shrunk = False
        for i in range(len(current)):
            candidate = current[:i] + current[i + 1:]
            if still_fails(candidate):
                current, shrunk = candidate, True
                break
    return current


def gdb_frames(target: Target, path: Path, workdir: Path, timeout: float) -> list[str]:
    """Function names of the crashing thread's backtrace ([] without gdb or a crash)."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return []
    vm = QemuMachine(target.binary, workdir, name="gdb", incoming="defer", paused=True,
                     device_args=target.device_args, qmp_timeout=5.0)
    proc = None
    try:
        vm.launch()
        proc = process.spawn(
            [gdb, "-q", "-nx", "-batch", "-p", str(vm.pid),
             "-ex", "handle SIGUSR1 SIGUSR2 SIGPIPE SIGALRM SIGCHLD SIGIO SIGPROF SIGWINCH "
                    "nostop noprint pass",
             "-ex", "continue", "-ex", "bt 30"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if not _wait_traced(vm.pid, 20.0):
            return []
        with contextlib.suppress(MigrationFailed, QMPConnectionError, TimeoutError, OSError):
            _start_incoming(vm, "gdb load", path, target.offset, {"mapped-ram": True}, {})
        try:
            out, _ = proc.communicate(timeout=timeout + 20)
        except subprocess.TimeoutExpired:
            return []
        text = out.decode(errors="replace")
        if "received signal" not in text:
            return []
        after = text.split("received signal", 1)[1]
        return [m[1] for line in after.splitlines() if (m := FRAME.match(line.strip()))]
    except QemuError:
        return []
    finally:
        vm.kill()
        if proc is not None:
            process.kill(proc)


def _wait_traced(pid: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        if re.search(r"^TracerPid:\s*[1-9]", status, re.MULTILINE):
            return True
        time.sleep(0.05)
    return False


def _effect(result: LoadResult) -> str:
    if result.outcome == "signal":
        return f"QEMU killed by {result.signal}; last output: {stderr_signature(result)}"
    if result.outcome == "internal_error":
        return f"QEMU internal error: {stderr_signature(result)}"
    if result.outcome == "wrong_memory":
        return "load completed with memory different from the unmutated load"
    if result.outcome == "hang":
        return f"load neither completed nor failed: {result.reason}"
    return result.reason


def _same(result: LoadResult, cls: str, sig: str | None) -> bool:
    return result.outcome == cls and result.signal == sig


def triage(raw: Sequence[RawFinding], target: Target, locations: dict[str, Location],
           out: Path, *, timeout: float, use_gdb: bool = True,
           log: Callable[[str], None] = print) -> list[Finding]:
    """Minimise, re-sign and deduplicate *raw*; write ``OUT/findings/<id>/``."""
    work = out / "work" / "triage"
    work.mkdir(parents=True, exist_ok=True)
    hits: dict[str, int] = {}
    firsts: dict[str, RawFinding] = {}
    for r in raw:
        hits[r.signature] = hits.get(r.signature, 0) + 1
        firsts.setdefault(r.signature, r)
    distinct: dict[str, Finding] = {}
    try:
        for prelim, rep in firsts.items():
            found = _triage_one(rep, target, locations, work, timeout, use_gdb)
            if found is None:
                log(f"triage: {prelim} did not reproduce; kept under raw/ only")
                continue
            edits, signature, result, frames = found
            old = distinct.get(signature)
            if old is not None:
                old.hits += hits[prelim]
                if len(edits) >= len(old.edits):
                    continue
            fid = old.id if old else f"F{len(distinct) + 1:03d}"
            distinct[signature] = _write(fid, rep.cls, rep.signal, signature, edits, result,
                                         frames, hits[prelim] + (old.hits if old else 0),
                                         target, locations, out, work)
            log(f"triage: {fid} {signature} ({len(edits)} edit(s))")
    finally:
        shutil.rmtree(out / "work", ignore_errors=True)
    for finding in distinct.values():  # hits may have grown since each was written
        save_finding_json(finding, target)
    for r in raw:  # the minimised inputs are kept; raw ones can be rebuilt from their edits
        if r.dir is not None:
            (r.dir / "input.img").unlink(missing_ok=True)
    return list(distinct.values())


def save_finding_json(finding: Finding, target: Target) -> None:
    data = finding.to_json()
    data["target"] = target.to_json()
    (finding.dir / "finding.json").write_text(json.dumps(data, indent=1) + "\n")


def _triage_one(rep: RawFinding, target: Target, locations: dict[str, Location], work: Path,
                timeout: float, use_gdb: bool
                ) -> tuple[list[Edit], str, LoadResult | None, list[str]] | None:
    if rep.cls == "reader_disagreement":
        def disagree(edits: list[Edit]) -> bool:
            path = apply_edits(target.path, work / "input.img", edits, locations)
            return not compare_readers(path, target.offset).agree
        if not disagree(list(rep.edits)):
            return None
        edits = minimise(rep.edits, disagree)
        path = apply_edits(target.path, work / "input.img", edits, locations)
        verdicts = compare_readers(path, target.offset)
        return edits, f"reader_disagreement:C {verdicts.c} vs Python {verdicts.python}", \
            None, []
    results: dict[int, LoadResult] = {}

    def fails(edits: list[Edit]) -> bool:
        result = reproduce(target, edits, locations, work, timeout)
        results[len(edits)] = result
        return _same(result, rep.cls, rep.signal)

    if not fails(list(rep.edits)):
        return None
    edits = minimise(rep.edits, fails)
    result = results[len(edits)]
    if not _same(result, rep.cls, rep.signal):  # the last run was a failed candidate
        result = reproduce(target, edits, locations, work, timeout)
    frames: list[str] = []
    if rep.cls == "signal":
        if use_gdb:
            path = apply_edits(target.path, work / "input.img", edits, locations)
            frames = gdb_frames(target, path, work, timeout)
        # Frames of a stripped binary can be coarse: the message keeps apart what
        # they would merge (the numbers in it are masked).
        top = frames_signature(frames)
        signature = f"signal:{rep.signal}:" + (f"{top}|" if top else "") \
            + stderr_signature(result)
    elif rep.cls == "internal_error":
        signature = f"internal_error:{stderr_signature(result)}"
    else:
        signature = field_signature(rep.cls, edits)
    return edits, signature, result, frames


def _write(fid: str, cls: str, sig: str | None, signature: str, edits: list[Edit],
           result: LoadResult | None, frames: list[str], hits: int, target: Target,
           locations: dict[str, Location], out: Path, work: Path) -> Finding:
    where = out / "findings" / f"{fid}-{cls}"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    path = apply_edits(target.path, where / "input.img", edits, locations)
    dump_edits(where / "edits.json", edits)
    effect = _effect(result) if result else signature.split(":", 1)[1]
    (where / "qemu.log").write_text(result.log if result else "")
    verify, code = c_verdict(path, target.offset)
    finding = Finding(fid, cls, sig, signature, edits, effect, hits, where, frames, code,
                      verify)
    save_finding_json(finding, target)
    (where / "reproduce.sh").write_text(f"#!/bin/sh\nexec fastsnap fuzz repro {where}\n")
    (where / "reproduce.sh").chmod(0o755)
    return finding
