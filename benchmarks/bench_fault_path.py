"""Fault-path benchmark of `fastsnap-loader load`: the toucher-seen fault
latency against the raw userfaultfd round trip with the same number of
touching threads, measured in the same process (`load --baseline`), with the
per-stage breakdown (`fault_stages_us`).

    python benchmarks/bench_fault_path.py --touchers 1,2,4 --rounds 5 \\
        --loader main=/path/to/old/fastsnap-loader --loader this

Each `--loader LABEL[=PATH][:EXTRA ARGS]` is one column of variants (PATH
`this` or absent: this tree's release build; EXTRA ARGS are appended to
`load`, e.g. `spin0=this:--fault-spin-us 0`).  Every (mode, touchers,
variant) configuration runs once per round, rounds interleaved, so a busy
machine hurts all variants alike; the table prints medians over the rounds
and the load average before and after.  No QEMU: the snapshot is synthetic
(`--mib`, default 256: one block, every fourth page zero), written once to
--workdir.  Nothing here is a pass/fail verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

STAGES = ("event_read", "claim", "pread", "copy", "resume")


def _content(pages: int) -> bytes:
    """About 3 in 4 pages with distinct data, the rest zero (clear bits)."""
    return b"".join(i.to_bytes(4, "little") * 1024 if i % 4 else bytes(4096)
                    for i in range(pages))


def _snapshot(workdir: Path, mib: int) -> Path:
    from pytest_fastsnap.snapshot.writer import write_snapshot

    path = workdir / f"fault-path-{mib}M.img"
    if not path.exists():
        write_snapshot(path, "pc", [("pc.ram", _content(mib * 256))])
    return path


def _variants(specs: list[str]) -> list[tuple[str, str, list[str]]]:
    from pytest_fastsnap.native.loader import loader_path

    out = []
    for spec in specs or ["this"]:
        head, _, extra = spec.partition(":")
        label, _, path = head.partition("=")
        binary = str(loader_path("release")) if path in ("", "this") else path
        out.append((label, binary, shlex.split(extra)))
    return out


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _run(binary: str, snap: Path, mode: str, touchers: int, seed: int,
         extra: list[str]) -> dict:
    args = [binary, "load", str(snap), "--mode", mode, "--access", "random", "--threads",
            str(touchers), "--seed", str(seed), "--baseline", "--json", *extra]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{shlex.join(args)}: exit {res.returncode}: {res.stderr.strip()}")
    return json.loads(res.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--touchers", default="1,2,4")
    ap.add_argument("--modes", default="lazy,fault-only")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--loader", action="append", default=[])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args(argv)
    touchers = [int(t) for t in a.touchers.split(",")]
    modes = a.modes.split(",")
    variants = _variants(a.loader)
    snap = _snapshot(a.workdir, a.mib)
    load_before = _loadavg()
    runs: dict[tuple[str, int, str], list[dict]] = {}
    for rnd in range(a.rounds):
        for mode in modes:
            for t in touchers:
                for label, binary, extra in variants:
                    out = _run(binary, snap, mode, t, rnd + 1, extra)
                    runs.setdefault((mode, t, label), []).append(out)
        print(f"round {rnd + 1}/{a.rounds} done, load {_loadavg()}", file=sys.stderr)
    load_after = _loadavg()
    print(f"# {snap.name}, --access random, medians of {a.rounds} interleaved rounds; "
          f"load average before {load_before}, after {load_after}; nproc {os.cpu_count()}")
    print("| mode | touchers | variant | touch p50 / p99 us | raw p50 us | touch/raw "
          "(median; per run) | p99/p50 | stages p50 us: " + " / ".join(STAGES) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for (mode, t, label), outs in runs.items():
        def med(f: Callable[[dict], float], outs: list[dict] = outs) -> float:
            return statistics.median(f(o) for o in outs)
        p50 = med(lambda o: o["stats"]["touch_latency_us"]["p50"])
        p99 = med(lambda o: o["stats"]["touch_latency_us"]["p99"])
        raw = med(lambda o: o["baseline"]["uffd_round_trip_us"]["p50"])
        ratios = [o["stats"]["touch_latency_us"]["p50"] / o["baseline"]["uffd_round_trip_us"]["p50"]
                  for o in outs]
        stages = " / ".join(f"{med(lambda o, s=s: o['stats']['fault_stages_us'][s]['p50']):.1f}"
                            for s in STAGES)
        print(f"| {mode} | {t} | {label} | {p50:.1f} / {p99:.1f} | {raw:.1f} | "
              f"{statistics.median(ratios):.2f}; {', '.join(f'{r:.2f}' for r in ratios)} | "
              f"{p99 / p50 if p50 else 0:.1f} | {stages} |")
    if a.json_out:
        a.json_out.write_text(json.dumps(
            {"load_before": load_before, "load_after": load_after,
             "runs": [{"mode": m, "touchers": t, "variant": v, "outputs": o}
                      for (m, t, v), o in runs.items()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
