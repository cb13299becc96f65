"""``fastsnap fuzz repro FINDING``: load a finding's input again and compare the outcome."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pytest_fastsnap.fuzz.locations import find_locations
from pytest_fastsnap.fuzz.mutators import apply_edits, edits_from_json
from pytest_fastsnap.fuzz.outcomes import load_once, stderr_lines
from pytest_fastsnap.fuzz.target import Target
from pytest_fastsnap.qemu.machine import QemuError
from pytest_fastsnap.snapshot.format import parse
from pytest_fastsnap.verdict import Verdict

__all__ = ["ReproError", "repro"]


class ReproError(Exception):
    """The finding directory is unusable (bad input, exit 2)."""


def repro(finding_dir: Path, binary: str | None, timeout: float) -> Verdict:
    """Re-run *finding_dir*: a :class:`Verdict`, truthy when the finding
    reproduced, whose reason is one line saying what happened."""
    meta_path = finding_dir / "finding.json"
    if not finding_dir.is_dir():
        raise ReproError(f"{finding_dir}: not a finding directory (not a directory)")
    try:
        meta = json.loads(meta_path.read_text())
        target = Target.from_json(meta["target"])
        edits = edits_from_json(meta["edits"])
        cls, sig = str(meta["class"]), meta.get("signal")
    except FileNotFoundError:
        raise ReproError(f"{finding_dir}: not a finding directory (no finding.json)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ReproError(f"{meta_path}: malformed ({err!r})") from None
    if binary:
        target = Target(target.path, target.offset, binary, target.device_args,
                        target.ranges, target.digests)
    with tempfile.TemporaryDirectory(prefix=".repro-", dir=finding_dir) as tmp:
        path = finding_dir / "input.img"
        if not path.is_file():  # rebuild it from the base snapshot and the edits
            if not target.path.is_file():
                raise ReproError(f"{finding_dir}: no input.img and the base snapshot "
                                 f"{target.path} is gone")
            locations = {loc.name: loc for loc in
                         find_locations(parse(target.path, target.offset))}
            path = apply_edits(target.path, Path(tmp) / "input.img", edits, locations)
        if cls == "reader_disagreement":
            from pytest_fastsnap.fuzz.differential import compare_readers
            verdicts = compare_readers(path, target.offset)
            return Verdict(not verdicts.agree,
                           f"{meta['id']}: readers "
                           f"{'disagree' if not verdicts.agree else 'agree'}: {verdicts}")
        try:
            result = load_once(target.binary, target.device_args, path, Path(tmp),
                               name="repro", offset=target.offset, timeout=timeout,
                               digests=target.digests, ranges=target.ranges,
                               memory_safe=all(e.memory_safe for e in edits))
        except QemuError as err:
            raise ReproError(f"QEMU binary not usable: {str(err).splitlines()[0]}") from None
    got = result.outcome + (f" ({result.signal})" if result.signal else "")
    want = cls + (f" ({sig})" if sig else "")
    same = result.outcome == cls and result.signal == sig
    said = stderr_lines(result.log)
    return Verdict(same, f"{meta['id']}: {'reproduced' if same else 'did NOT reproduce'}: "
                         f"{got} (recorded: {want}) with {target.binary}; QEMU's last words: "
                         f"{said[-1] if said else '(none)'}")
