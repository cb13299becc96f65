"""``summary.json``, ``findings.json`` and ``findings.md`` of a campaign directory."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["read_findings", "write_report"]


def write_report(out: Path, summary: dict[str, Any], findings: Sequence[dict[str, Any]]) -> None:
    summary = dict(summary)
    summary["distinct_findings"] = len(findings)
    summary["invariant_violations"] = [f["id"] for f in findings if not f["invariant_ok"]]
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "findings.json").write_text(json.dumps(list(findings), indent=1) + "\n")
    (out / "findings.md").write_text(markdown(summary, findings))


def read_findings(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The summary and findings of a campaign directory; ValueError if it is not one."""
    if not out.is_dir():
        raise ValueError(f"{out}: not a campaign directory (not a directory)")
    try:
        summary = json.loads((out / "summary.json").read_text())
        findings = json.loads((out / "findings.json").read_text())
    except FileNotFoundError as err:
        raise ValueError(f"{out}: not a campaign directory (no {Path(err.filename).name})") \
            from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{out}: broken campaign files: {err}") from None
    if not isinstance(summary, dict) or not isinstance(findings, list):
        raise ValueError(f"{out}: summary.json/findings.json have the wrong shape")
    return summary, findings


def markdown(summary: dict[str, Any], findings: Sequence[dict[str, Any]]) -> str:
    outcomes = ", ".join(f"{k} {v}" for k, v in summary.get("outcomes", {}).items() if v)
    readers = summary.get("readers", {})
    lines = [
        "# Fuzzing campaign", "",
        f"- QEMU: {summary.get('qemu_version', '?')} ({summary.get('qemu_binary', '?')})",
        f"- {summary.get('execs', 0)} inputs in {summary.get('seconds', 0)} s "
        f"({summary.get('execs_per_second', 0)}/s), "
        + (f"seed {summary['seed']}, {summary.get('jobs', '?')} jobs" if "seed" in summary
           else f"merged from seeds {summary.get('seeds', '?')}"),
        f"- outcomes: {outcomes or 'none'}",
        f"- C and Python readers: agree on {readers.get('agree', 0)}, disagree on "
        f"{readers.get('disagree', 0)}",
        f"- distinct findings: {len(findings)}", "",
    ]
    for f in findings:
        edits = "; ".join(e.get("note", e["target"]) for e in f["edits"])
        verify = f["verify"]
        lines += [f"## {f['id']}: {f['class']}" + (f" ({f['signal']})" if f["signal"] else ""),
                  "", f"- signature: `{f['signature']}`",
                  f"- minimal edits ({len(f['edits'])}): {edits}",
                  f"- effect: {f['effect']}", f"- seen {f['hits']} time(s)",
                  f"- fastsnap verify: exit {verify['exit']} {verify['error'] or ''}"
                  + ("" if f["invariant_ok"] else "  **INVARIANT VIOLATED: verify accepts it**"),
                  f"- reproduce: `{f['reproduce']}`", ""]
    return "\n".join(lines)
