"""`fastsnap fuzz`: structure-aware fuzzing of QEMU's snapshot load and of our readers.

    fastsnap fuzz qemu [SNAPSHOT] [--guest tiny|linux|firmware] --duration S --out DIR
    fastsnap fuzz repro DIR/findings/F001-signal
    fastsnap fuzz merge DIR... --out MERGED
    fastsnap fuzz loader --duration S

Exit codes: 0 the campaign ran (QEMU findings are results, see
DIR/findings.md); ``repro`` 0 when the finding reproduces and 1 when it does
not; ``loader`` 1 when the C parser crashed or disagreed with the Python
reader (our own defects); 1 the operation failed; 2 bad input or an unusable
QEMU binary or compiler; 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from pytest_fastsnap.fuzz.target import TargetError
from pytest_fastsnap.qemu.machine import QemuError

PROG = "fastsnap fuzz"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("fuzz", help="fuzz QEMU's snapshot load and our own readers")
    fsub = p.add_subparsers(dest="fuzz_command", required=True)

    q = fsub.add_parser("qemu", help="a campaign against the QEMU under test")
    q.add_argument("snapshot", nargs="?", help="a `fastsnap save` snapshot (with its "
                   "manifest); default: make one of --guest")
    q.add_argument("--guest", choices=("tiny", "linux", "firmware"), default=None)
    q.add_argument("--duration", type=float, default=None, help="seconds (default 60)")
    q.add_argument("--execs", type=int, default=None, help="stop after this many inputs")
    q.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default="fuzz-out", help="campaign directory (new or empty)")
    q.add_argument("--qemu-binary", default="qemu-system-x86_64")
    q.add_argument("--timeout", type=float, default=15.0, help="seconds per load")
    q.add_argument("--max-edits", type=int, default=3)
    q.add_argument("--no-triage", action="store_true", help="skip minimisation and dedup")
    q.add_argument("--no-gdb", action="store_true", help="no gdb backtraces in triage")
    q.set_defaults(func=run_qemu)

    r = fsub.add_parser("repro", help="re-run one finding")
    r.add_argument("finding", help="a finding directory (OUT/findings/<id>)")
    r.add_argument("--qemu-binary", default=None, help="default: the campaign's")
    r.add_argument("--timeout", type=float, default=15.0)
    r.set_defaults(func=run_repro)

    m = fsub.add_parser("merge", help="merge and deduplicate campaign directories")
    m.add_argument("dirs", nargs="+")
    m.add_argument("--out", required=True)
    m.set_defaults(func=run_merge)

    from pytest_fastsnap.fuzz import libfuzzer
    libfuzzer.add_parser(fsub)


def _err(what: str, message: str, code: int) -> int:
    print(f"{PROG} {what}: {message}", file=sys.stderr)
    return code


def _new_out(path: Path, create: bool = True) -> Path | None:
    """*path* as a new or empty directory (created unless *create* is false), or None."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        return None
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def run_qemu(args: argparse.Namespace) -> int:
    from pytest_fastsnap.fuzz.campaign import Campaign
    from pytest_fastsnap.fuzz.locations import find_locations
    from pytest_fastsnap.fuzz.report import write_report
    from pytest_fastsnap.fuzz.target import (
        guest_snapshot,
        reference_target,
        snapshot_from_manifest,
        write_target,
    )
    from pytest_fastsnap.fuzz.triage import triage
    from pytest_fastsnap.qemu.probe import ProbeError, probe
    from pytest_fastsnap.snapshot.format import parse

    if args.snapshot and args.guest:
        return _err("qemu", "give a SNAPSHOT or --guest, not both", 2)
    if args.jobs < 1 or (args.execs is not None and args.execs < 1) or args.max_edits < 1 \
            or args.timeout <= 0 or (args.duration is not None and args.duration <= 0):
        return _err("qemu", "--jobs, --execs, --max-edits, --timeout and --duration must be "
                    "positive", 2)
    duration = args.duration if args.duration is not None or args.execs else 60.0
    given = None
    if args.snapshot:  # checked before anything is created
        try:
            given = snapshot_from_manifest(Path(args.snapshot).resolve())
        except TargetError as err:
            return _err("qemu", str(err), err.exit_code)
    try:
        qemu = probe(args.qemu_binary)
    except ProbeError as err:
        return _err("qemu", str(err), 2)
    if _new_out(Path(args.out).resolve(), create=False) is None:
        return _err("qemu", f"--out {args.out} exists and is not an empty directory", 2)
    out = _new_out(Path(args.out).resolve())
    assert out is not None
    campaign = None
    try:
        if given:
            path, offset, device_args = given
        else:
            path, offset, device_args = guest_snapshot(args.guest or "tiny", qemu.binary, out)
        snap = parse(path, offset, lenient=True)
        if not snap.ok:
            raise TargetError(f"{path} is not a valid mapped-ram snapshot "
                              f"({', '.join(snap.problem_names()) or 'truncated'})", 2)
        target = reference_target(path, offset, qemu.binary, device_args, out)
        write_target(out / "target.json", target)
        locations = find_locations(snap)
        campaign = Campaign(target, locations, out, jobs=args.jobs, seed=args.seed,
                            duration=duration, execs=args.execs, timeout=args.timeout,
                            max_edits=args.max_edits)
        print(f"fuzzing {path} ({len(locations)} locations) with {qemu.binary} "
              f"({qemu.version_str}), {args.jobs} jobs, seed {args.seed}", file=sys.stderr)
        campaign.run()
        findings = []
        if not args.no_triage and not campaign.interrupted:
            findings = triage(campaign.raw, target, campaign.locations, out,
                              timeout=args.timeout, use_gdb=not args.no_gdb,
                              log=lambda m: print(m, file=sys.stderr))
        write_report(out, campaign.summary(qemu.version_str), [f.to_json() for f in findings])
    except TargetError as err:
        shutil.rmtree(out / "work", ignore_errors=True)
        return _err("qemu", str(err), err.exit_code)
    except QemuError as err:  # it loaded the reference, then stopped coming up
        shutil.rmtree(out / "work", ignore_errors=True)
        if campaign is not None:
            write_report(out, campaign.summary(qemu.version_str), [])
        return _err("qemu", f"QEMU stopped coming up: {str(err).splitlines()[0]}", 1)
    except KeyboardInterrupt:
        shutil.rmtree(out / "work", ignore_errors=True)
        if campaign is not None:
            write_report(out, campaign.summary(qemu.version_str), [])
        return _err("qemu", "interrupted", 130)
    if campaign.interrupted:
        return _err("qemu", f"interrupted; partial results in {out}", 130)
    print(f"{campaign.stats.execs} inputs, {len(findings)} distinct finding(s): "
          f"{out / 'findings.md'}")
    return 0


def run_repro(args: argparse.Namespace) -> int:
    from pytest_fastsnap.fuzz.repro import ReproError, repro

    try:
        reproduced = repro(Path(args.finding), args.qemu_binary, args.timeout)
    except ReproError as err:
        return _err("repro", str(err), 2)
    print(reproduced.reason)
    return 0 if reproduced else 1


def run_merge(args: argparse.Namespace) -> int:
    from pytest_fastsnap.fuzz.merge import merge
    from pytest_fastsnap.fuzz.report import read_findings

    try:
        for d in args.dirs:  # all of them readable before anything is created
            read_findings(Path(d))
    except ValueError as err:
        return _err("merge", str(err), 2)
    out = _new_out(Path(args.out).resolve())
    if out is None:
        return _err("merge", f"--out {args.out} exists and is not an empty directory", 2)
    summary, findings = merge([Path(d) for d in args.dirs], out)
    print(f"merged {len(args.dirs)} campaign(s): {summary['execs']} inputs, "
          f"{len(findings)} distinct finding(s): {out / 'findings.md'}")
    return 0
