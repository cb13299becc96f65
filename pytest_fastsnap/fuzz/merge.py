"""``fastsnap fuzz merge DIR... --out OUT``: campaigns run apart, reported together.

Counts add up; findings are deduplicated by signature (the one with the
fewest edits is kept, hits add up) and their directories copied under
``OUT/findings/`` with new ids.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_fastsnap.fuzz.report import read_findings, write_report
from pytest_fastsnap.snapshot.sparse import sparse_copy

__all__ = ["merge"]


def merge(dirs: Sequence[Path], out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    runs = [read_findings(d) for d in dirs]
    summary: dict[str, Any] = {"merged_from": [str(d.resolve()) for d in dirs], "execs": 0,
                               "seconds": 0.0, "outcomes": {}, "readers": {"agree": 0,
                                                                           "disagree": 0},
                               "seeds": [], "qemu_version": None, "qemu_binary": None}
    best: dict[str, dict[str, Any]] = {}
    for s, findings in runs:
        summary["execs"] += int(s.get("execs", 0))
        summary["seconds"] += float(s.get("seconds", 0))
        for k, v in s.get("outcomes", {}).items():
            summary["outcomes"][k] = summary["outcomes"].get(k, 0) + int(v)
        for k in ("agree", "disagree"):
            summary["readers"][k] += int(s.get("readers", {}).get(k, 0))
        summary["seeds"].append(s.get("seed"))
        versions = {summary["qemu_version"], s.get("qemu_version")} - {None}
        summary["qemu_version"] = " + ".join(sorted(str(v) for v in versions))
        summary["qemu_binary"] = summary["qemu_binary"] or s.get("qemu_binary")
        for f in findings:
            old = best.get(f["signature"])
            if old is None or len(f["edits"]) < len(old["edits"]):
                hits = f["hits"] + (old["hits"] if old else 0)
                best[f["signature"]] = dict(f, hits=hits)
            else:
                old["hits"] += f["hits"]
    summary["seconds"] = round(summary["seconds"], 1)
    summary["execs_per_second"] = round(summary["execs"] / max(summary["seconds"], 1e-9), 3)
    merged = []
    for n, f in enumerate(best.values(), 1):
        fid = f"F{n:03d}"
        src = Path(f["file"]).parent
        dst = out / "findings" / f"{fid}-{f['class']}"
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=sparse_copy)  # inputs stay sparse
        else:
            dst.mkdir(parents=True)
        f = dict(f, id=fid, file=str(dst / "input.img"), reproduce=f"fastsnap fuzz repro {dst}")
        meta = dst / "finding.json"
        if meta.is_file():
            data = json.loads(meta.read_text())
            data.update({k: v for k, v in f.items() if k != "target"})
            meta.write_text(json.dumps(data, indent=1) + "\n")
        merged.append(f)
    write_report(out, summary, merged)
    return summary, merged
