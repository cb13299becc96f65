"""A fuzzing campaign against the QEMU under test: mutate, load, classify, keep findings.

Input *i* of a campaign with seed *K* is drawn from ``Random(f"{K}:{i}")``,
so a campaign is reproducible input by input whatever ``--jobs`` is.  Each
worker thread owns one scratch file and one QEMU at a time; a finding's file
is moved under ``OUT/raw/`` (at most :data:`KEEP_PER_SIGNATURE` per
preliminary signature), everything else is overwritten by the next input and
``OUT/work`` is removed at the end.  Every input also goes through both
readers (the C parser and the Python reader); a disagreement is a finding too.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pytest_fastsnap.fuzz.differential import compare_readers
from pytest_fastsnap.fuzz.locations import Location
from pytest_fastsnap.fuzz.mutators import Edit, Mutator, apply_edits, dump_edits
from pytest_fastsnap.fuzz.outcomes import OUTCOMES, LoadResult, load_once
from pytest_fastsnap.fuzz.signature import preliminary_signature
from pytest_fastsnap.fuzz.target import Target
from pytest_fastsnap.qemu import process
from pytest_fastsnap.qemu.machine import QemuError
from pytest_fastsnap.snapshot.sparse import sparse_copy

__all__ = ["Campaign", "RawFinding"]

KEEP_PER_SIGNATURE = 3


@dataclass(frozen=True)
class RawFinding:
    index: int
    cls: str
    signal: str | None
    signature: str
    edits: tuple[Edit, ...]
    reason: str
    dir: Path | None  # kept input, edits and log (None: over the per-signature limit)


@dataclass
class Stats:
    execs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    readers_agree: int = 0
    readers_disagree: int = 0
    signatures: Counter[str] = field(default_factory=Counter)


class Campaign:
    def __init__(self, target: Target, locations: list[Location], out: Path, *, jobs: int,
                 seed: int, duration: float | None, execs: int | None, timeout: float,
                 max_edits: int = 3, differential: bool = True,
                 progress: TextIO | None = sys.stderr) -> None:
        self.target = target
        self.locations = {loc.name: loc for loc in locations}
        self.mutator = Mutator(target.path, locations, max_edits)
        self.out = out
        self.jobs = max(1, jobs)
        self.seed = seed
        self.duration = duration
        self.max_execs = execs
        self.timeout = timeout
        self.differential = differential
        self.progress = progress
        self.stats = Stats()
        self.raw: list[RawFinding] = []
        self._lock = threading.Lock()
        self._next = 0
        self._stop = threading.Event()
        self.started = 0.0
        self.seconds = 0.0
        self.interrupted = False

    # -- one input -------------------------------------------------------------------

    def _claim(self) -> int | None:
        with self._lock:
            if self._stop.is_set():
                return None
            if self.max_execs is not None and self._next >= self.max_execs:
                return None
            if self.duration is not None and time.monotonic() - self.started >= self.duration:
                return None
            index = self._next
            self._next += 1
            return index

    def edits_for(self, index: int) -> list[Edit]:
        return self.mutator.draw(random.Random(f"{self.seed}:{index}"))

    def run_one(self, index: int, workdir: Path) -> None:
        edits = self.edits_for(index)
        path = apply_edits(self.target.path, workdir / "input.img", edits, self.locations)
        disagreement = None
        if self.differential:
            verdicts = compare_readers(path, self.target.offset)
            if not verdicts.agree:
                disagreement = str(verdicts)
        result = load_once(self.target.binary, self.target.device_args, path, workdir,
                           name="fuzz", offset=self.target.offset, timeout=self.timeout,
                           digests=self.target.digests, ranges=self.target.ranges,
                           memory_safe=all(e.memory_safe for e in edits))
        if self.interrupted:
            return  # its QEMU was killed by the interrupt, not by the input
        with self._lock:
            self.stats.execs += 1
            self.stats.outcomes[result.outcome] += 1
            if self.differential:
                if disagreement:
                    self.stats.readers_disagree += 1
                else:
                    self.stats.readers_agree += 1
        if disagreement:
            self._keep(index, "reader_disagreement", None, f"readers: {disagreement}",
                       disagreement, edits, path, result, copy=True)
        if result.finding:
            self._keep(index, result.outcome, result.signal,
                       preliminary_signature(result, edits), result.reason, edits, path,
                       result)

    def _keep(self, index: int, cls: str, sig: str | None, signature: str, reason: str,
              edits: list[Edit], path: Path, result: LoadResult, copy: bool = False) -> None:
        with self._lock:
            self.stats.signatures[signature] += 1
            keep = self.stats.signatures[signature] <= KEEP_PER_SIGNATURE
        where = None
        if keep:
            where = self.out / "raw" / f"{index:07d}-{cls}"
            where.mkdir(parents=True, exist_ok=True)
            if copy:
                sparse_copy(path, where / "input.img")
            else:
                os.replace(path, where / "input.img")
            dump_edits(where / "edits.json", edits)
            (where / "qemu.log").write_text(result.log)
            (where / "result.json").write_text(json.dumps(
                {"index": index, "class": cls, "signal": sig, "signature": signature,
                 "reason": reason, "outcome": result.outcome}, indent=1) + "\n")
        with self._lock:
            self.raw.append(RawFinding(index, cls, sig, signature, tuple(edits), reason, where))

    # -- the loop ----------------------------------------------------------------------

    def _worker(self, number: int, errors: list[BaseException]) -> None:
        workdir = self.out / "work" / f"j{number}"
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            while (index := self._claim()) is not None:
                try:
                    self.run_one(index, workdir)
                except QemuError:  # once may be the host (memory, fds); twice is not
                    if self._stop.is_set():
                        break  # killed by an interrupt while it came up
                    time.sleep(1.0)
                    self.run_one(index, workdir)
        except BaseException as err:  # reported by run(), which re-raises the first
            errors.append(err)
            self._stop.set()

    def progress_line(self) -> str:
        s = self.stats
        rate = s.execs / max(time.monotonic() - self.started, 1e-9)
        counts = " ".join(f"{k} {s.outcomes[k]}" for k in OUTCOMES if s.outcomes[k])
        return (f"execs {s.execs} ({rate:.2f}/s) | {counts or '-'} | findings "
                f"{len(self.raw)} distinct {len(s.signatures)} | readers agree "
                f"{s.readers_agree} disagree {s.readers_disagree}")

    def run(self, on_tick: Callable[[], None] | None = None) -> Stats:
        """Run until --duration/--execs; Ctrl-C stops it (every QEMU is killed)."""
        self.started = time.monotonic()
        errors: list[BaseException] = []
        threads = [threading.Thread(target=self._worker, args=(n, errors), daemon=True,
                                    name=f"fuzz-j{n}") for n in range(self.jobs)]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(1.0)
                self._tick()
                if on_tick:
                    on_tick()
        except KeyboardInterrupt:
            self.interrupted = True  # before the kill: workers then drop their result
            self._stop.set()
            process.kill_all()
            for t in threads:
                t.join(30)
        finally:
            self._stop.set()
            process.kill_all()
            self.seconds = time.monotonic() - self.started
            shutil.rmtree(self.out / "work", ignore_errors=True)
            if self.progress:
                self.progress.write("\r" + self.progress_line() + "\n")
                self.progress.flush()
        if errors and not self.interrupted:
            raise errors[0]
        return self.stats

    def _tick(self) -> None:
        if self.progress:
            self.progress.write("\r" + self.progress_line())
            self.progress.flush()

    def summary(self, qemu_version: str) -> dict[str, Any]:
        s = self.stats
        return {"execs": s.execs, "seconds": round(self.seconds, 1),
                "execs_per_second": round(s.execs / max(self.seconds, 1e-9), 3),
                "outcomes": {k: s.outcomes[k] for k in OUTCOMES},
                "raw_findings": len(self.raw), "preliminary_signatures": len(s.signatures),
                "readers": {"agree": s.readers_agree, "disagree": s.readers_disagree},
                "qemu_binary": self.target.binary, "qemu_version": qemu_version,
                "seed": self.seed, "jobs": self.jobs, "timeout": self.timeout,
                "interrupted": self.interrupted, "target": str(self.target.path)}
