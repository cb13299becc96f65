"""``fastsnap fuzz loader``: libFuzzer on the C parser (``src/fuzz_format.c``), on
the postcopy bridge's return-path message parser (``src/fuzz_bridge_rp.c``) and
on the bridge's working-set file reader (``src/fuzz_bridge_ws.c``).

Built by ``native/fuzz/build.sh`` (the OSS-Fuzz convention: ``$CC $CFLAGS ...
$LIB_FUZZING_ENGINE``) into the cache, in two variants: ``asan`` (ASan +
UBSan, every report fatal) and ``release`` (-O2, faster, finds hangs and
logic aborts).  The corpus lives in the cache between runs, seeded with
compacted real snapshots (cached suite base snapshots and any ``--seed-file``,
their page regions shrunk to one page per block) and a synthetic one; the
dictionary names the format's magic numbers and record types.  Executions
are counted per variant across runs (``stats.json`` in the cache).  A crash
is copied to ``--out`` as a reproducer with the command that replays it.
Every corpus file the run added also goes through both readers (C and
Python); disagreements are reported.  The working-set target is seeded with
structure-aware files (:mod:`.wsgen`: valid ones and ones with edits to the
header, block list, counts, entries, length or hash), and those seeds plus
the run's new corpus files (as the harness sees them: hash fixed up) go
through the loader's ``serve --ws --describe`` and ``restore.wsfile``
against a snapshot of the harness's layout (:mod:`.ws_differential`): both
refuse, or both accept with the same entries.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from filelock import FileLock

from pytest_fastsnap.fuzz import extents, wsgen
from pytest_fastsnap.fuzz import ws_differential as ws_differential_mod
from pytest_fastsnap.fuzz.differential import compare_readers
from pytest_fastsnap.native.loader import SOURCE_DIR
from pytest_fastsnap.qemu import process
from pytest_fastsnap.qemu.probe import default_cache_dir
from pytest_fastsnap.snapshot.format import parse
from pytest_fastsnap.snapshot.writer import (
    BlockSpec,
    spec_from_snapshot,
    write_snapshot,
    write_spec,
)

__all__ = ["FuzzerBuildError", "add_parser", "build_fuzzer", "compact_seed", "run_fuzzer"]

FUZZ_DIR = Path(__file__).parents[1] / "native" / "fuzz"
BUILD_SH = FUZZ_DIR / "build.sh"
DICT = FUZZ_DIR / "mapped_ram.dict"
SANITIZERS = {
    "asan": "-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined "
            "-fno-sanitize-recover=all -fsanitize=fuzzer-no-link",
    "release": "-O2 -g -fsanitize=fuzzer-no-link",
}
MAX_LEN = {"format": 256_000, "bridge-rp": 4096, "bridge-ws": 4096}
TARGETS = ("format", "bridge-rp", "bridge-ws")
WS_SEEDS = 200      # structure-aware working-set files per run (seeds, all compared)
HARNESS = {"format": "fuzz_format", "bridge-rp": "fuzz_bridge_rp", "bridge-ws": "fuzz_bridge_ws"}
# Return-path seeds: SHUT 0, PONG 3 (package loaded), REQ_PAGES_ID pc.ram page 1, REQ_PAGES;
# RECV_BITMAP of pc.ram (64 pages: 8 bytes, end mark), of pc.bios with padding bits set,
# and RESUME_ACK 1 (--resume).
RP_SEEDS = {
    "shut": bytes.fromhex("00010004" "00000000"),
    "pong": bytes.fromhex("00020004" "00000003"),
    "req": bytes.fromhex("00030013" "0000000000001000" "00001000" "06") + b"pc.ram"
           + bytes.fromhex("0004000c" "0000000000002000" "00001000"),
    "bitmap": bytes.fromhex("00050007" "06") + b"pc.ram"
              + bytes.fromhex("0000000000000008" "0f000000000000f0" "0123456789abcdef"),
    "bitmap-bios": bytes.fromhex("00050008" "07") + b"pc.bios"     # 16 pages; bits 16-23 are
                   + bytes.fromhex("0000000000000008" "ffffff0000000000"  # padding to ignore
                                   "0123456789abcdef"),
    "ack": bytes.fromhex("00060004" "00000001"),
}
EXECS = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
DONE = re.compile(r"#(\d+)\s+DONE")
STATUS = re.compile(r"^#(\d+)\s", re.MULTILINE)


class FuzzerBuildError(RuntimeError):
    """clang or its libFuzzer runtime is missing, or the harness does not build."""


def cache_dir() -> Path:
    return default_cache_dir() / "fuzz"


def build_fuzzer(variant: str, target: str = "format") -> Path:
    """The *target* harness for *variant*, built with build.sh into the cache if needed."""
    clang = shutil.which("clang")
    if clang is None:
        raise FuzzerBuildError("clang not found: libFuzzer needs clang (apt-get install clang)")
    digest = hashlib.sha256()
    for path in [*sorted(SOURCE_DIR.glob("*.[ch]")), BUILD_SH, DICT]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(SANITIZERS[variant].encode())
    digest.update(subprocess.run([clang, "--version"], capture_output=True, text=True,
                                 check=False).stdout.encode())
    out = cache_dir() / f"{variant}-{digest.hexdigest()[:16]}"
    binary = out / HARNESS[target]
    if binary.exists():
        return binary
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if binary.exists():
            return binary
        tmp = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=out.parent))
        env = dict(os.environ, CC=clang, CFLAGS=SANITIZERS[variant],
                   LIB_FUZZING_ENGINE="-fsanitize=fuzzer", OUT=str(tmp))
        res = subprocess.run(["bash", str(BUILD_SH)], capture_output=True, text=True,
                             env=env, check=False)
        if res.returncode != 0 or not (tmp / HARNESS[target]).exists():
            shutil.rmtree(tmp, ignore_errors=True)
            hint = " (apt-get install libclang-rt-dev for libclang_rt.fuzzer)" \
                if "libclang_rt.fuzzer" in res.stderr else ""
            raise FuzzerBuildError(f"build.sh ({variant}) failed{hint}:\n{res.stderr[-3000:]}")
        shutil.rmtree(out, ignore_errors=True)  # a broken earlier build, under this lock
        os.replace(tmp, out)
    return binary


def compact_seed(snapshot: Path, dst: Path, *, slim: bool = False) -> Path | None:
    """*snapshot* re-laid out with each of its first two blocks shrunk to one data
    page (a real stream of ~2 MiB instead of a sparse file of the guest's size),
    written in the sparse FSX1 encoding (tens of KiB).  *slim*: with a minimal
    VM description too (validating QEMU's ~30 KiB one costs most of an exec)."""
    try:
        snap = parse(snapshot)
    except Exception:
        return None
    spec = spec_from_snapshot(snap)
    blocks = [BlockSpec(b.id, snap.page_size, {0: bytes([i + 1]) * snap.page_size})
              for i, b in enumerate(spec.blocks[:2])]
    raw = dst.with_name(dst.name + ".raw")
    spec = replace(spec, blocks=blocks, total=None)
    if slim:
        spec = replace(spec, vmdesc=b'{"page_size": 4096, "devices": []}')
    write_spec(raw, spec)
    try:
        if not parse(raw, lenient=True).ok:
            return None
        dst.write_bytes(extents.encode(raw.read_bytes()))
    finally:
        raw.unlink(missing_ok=True)
    return dst


def seed_corpus(seeds: Path, extra: list[Path]) -> int:
    """Write the seeds: compacted real snapshots (cached bases + *extra*) and a synthetic one."""
    seeds.mkdir(parents=True, exist_ok=True)
    real = sorted((default_cache_dir() / "bases").glob("*.img")) + extra
    n = 0
    for i, path in enumerate(real):
        n += compact_seed(path, seeds / f"real-{i}") is not None
        n += compact_seed(path, seeds / f"slim-{i}", slim=True) is not None
    ps = 4096
    synthetic = write_snapshot(seeds / "synthetic.raw", "pc-q35-10.0",
                               [("pc.ram", 4 * ps, {0: b"\x11" * ps}),
                                ("pc.bios", b"\x5a" * ps)],
                               vmdesc={"page_size": ps, "devices": []})
    (seeds / "synthetic").write_bytes(extents.encode(synthetic.read_bytes()))
    synthetic.unlink()
    return n + 1


def load_stats() -> dict[str, Any]:
    try:
        data = json.loads((cache_dir() / "stats.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def add_execs(variant: str, execs: int, crashes: int) -> dict[str, Any]:
    path = cache_dir() / "stats.json"
    with FileLock(str(path) + ".lock"):
        stats = load_stats()
        entry = stats.setdefault(variant, {"execs": 0, "runs": 0, "crashes": 0})
        entry["execs"] += execs
        entry["runs"] += 1
        entry["crashes"] += crashes
        path.write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def ws_seeds(seeds: Path, rng_seed: int, count: int = WS_SEEDS) -> int:
    """Write *count* structure-aware working-set files (:mod:`.wsgen`) named
    for what was done to them."""
    seeds.mkdir(parents=True, exist_ok=True)
    rng = random.Random(rng_seed)
    for i in range(count):
        kind, data = wsgen.generate(wsgen.HARNESS_LAYOUT, rng)
        (seeds / f"{i:04d}-{kind}").write_bytes(data)
    return count


def ws_differential(files: list[Path], tmp: Path, keep: Path) -> tuple[int, list[str]]:
    """Each file as the harness reads it, through both working-set readers
    against a snapshot of the harness's layout.  Returns how many agreed and
    a line per disagreement; each disagreeing input is copied to *keep*."""
    snap = ws_differential_mod.harness_snapshot(tmp / "ws-layout.img", wsgen.HARNESS_LAYOUT)
    ws_file = tmp / "input.ws"
    agree, lines = 0, []
    for path in files:
        ws_file.write_bytes(wsgen.harness_fixup(path.read_bytes()))
        verdicts = ws_differential_mod.compare_ws_readers(ws_file, snap, wsgen.HARNESS_LAYOUT)
        if verdicts:
            agree += 1
            continue
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(ws_file, keep / path.name)
        lines.append(f"{path.name}: {verdicts}")
    return agree, lines


def run_fuzzer(variant: str, duration: float, out: Path, *, seed_files: list[Path],
               target: str = "format", differential_limit: int = 2000,
               rng_seed: int = 0) -> dict[str, Any]:
    """Run the *target* harness for *duration* seconds; return what happened."""
    binary = build_fuzzer(variant, target)
    corpus = cache_dir() / f"corpus-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in corpus.iterdir()}
    crashes_dir = out / f"crashes-{target}-{variant}"
    crashes_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".seeds-", dir=out) as tmp:
        seeds = Path(tmp) / "seeds"
        if target == "format":
            nseeds = seed_corpus(seeds, seed_files)
            dictionary = [f"-dict={binary.parent}/fuzz_format.dict"]
        elif target == "bridge-ws":
            nseeds, dictionary = ws_seeds(seeds, rng_seed), []
        else:
            seeds.mkdir()
            for name, blob in RP_SEEDS.items():
                (seeds / name).write_bytes(blob)
            nseeds, dictionary = len(RP_SEEDS), []
        cmd = [str(binary), str(corpus), str(seeds), *dictionary,
               f"-max_total_time={max(1, int(duration))}", "-timeout=10",
               "-rss_limit_mb=2048", f"-max_len={MAX_LEN[target]}", "-print_final_stats=1",
               f"-artifact_prefix={crashes_dir}/"]
        log_path = out / f"libfuzzer-{target}-{variant}.log"
        with open(log_path, "wb") as log:
            proc = process.spawn(cmd, stdout=log.fileno(), stderr=subprocess.STDOUT,
                                 env=dict(os.environ, ASAN_OPTIONS="detect_leaks=1",
                                          UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"))
            started = time.monotonic()
            try:
                code = proc.wait(duration + 120)
            except subprocess.TimeoutExpired:
                code = process.kill(proc)
            finally:
                process.kill(proc)
                seconds = time.monotonic() - started
        new = sorted(p for p in corpus.iterdir() if p.name not in before)
        agree = disagree = 0
        disagreements: list[str] = []
        if target == "bridge-ws":   # the seeds too: they are the structure-aware inputs
            agree, disagreements = ws_differential(
                sorted(seeds.iterdir()) + new[:differential_limit], Path(tmp),
                out / f"ws-disagreements-{variant}")
            disagree = len(disagreements)
    text = log_path.read_text(errors="replace")
    m = EXECS.search(text) or DONE.search(text)
    status = STATUS.findall(text)  # killed runs print no final stats: the last status line
    execs = int(m[1]) if m else int(status[-1]) if status else 0
    crashes = sorted(p for p in crashes_dir.iterdir() if p.is_file())
    stats = add_execs(f"{target}-{variant}", execs, len(crashes))
    decoded = out / "decoded.img"
    for path in new[:differential_limit] if target == "format" else ():
        verdicts = compare_readers(extents.decode_to(path.read_bytes(), decoded))
        if verdicts.agree:
            agree += 1
        else:
            disagree += 1
            disagreements.append(f"{path.name}: {verdicts}")
    decoded.unlink(missing_ok=True)
    if not crashes:
        shutil.rmtree(crashes_dir, ignore_errors=True)
    return {"target": target, "variant": variant, "binary": str(binary), "exit": code,
            "execs": execs,
            "seconds": round(seconds, 1), "execs_per_second": round(execs / max(seconds, 1e-9)),
            "seeds": nseeds, "corpus": len(list(corpus.iterdir())), "new_inputs": len(new),
            "crashes": [{"file": str(c), "reproduce": f"{binary} {c}"} for c in crashes],
            "readers": {"agree": agree, "disagree": disagree,
                        "disagreements": disagreements[:50]},
            "total_execs": {k: v["execs"] for k, v in stats.items()}, "log": str(log_path)}


def add_parser(fsub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = fsub.add_parser("loader", help="libFuzzer on the C parser (release + ASan/UBSan)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per variant")
    p.add_argument("--variant", choices=("asan", "release", "both"), default="asan")
    p.add_argument("--target", choices=(*TARGETS, "all"), default="format",
                   help="the mapped-ram parser, the bridge's return-path parser, its "
                   "working-set file reader, or all three")
    p.add_argument("--seed-file", action="append", default=[], type=Path,
                   help="a snapshot to compact into a seed (repeatable)")
    p.add_argument("--out", default="fuzz-loader-out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.duration <= 0:
        print("fastsnap fuzz loader: --duration must be positive", file=sys.stderr)
        return 2
    for path in args.seed_file:
        if not path.is_file() or not parse(path, lenient=True).ok:
            print(f"fastsnap fuzz loader: --seed-file {path}: not a valid mapped-ram snapshot",
                  file=sys.stderr)
            return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    variants = ("release", "asan") if args.variant == "both" else (args.variant,)
    targets = TARGETS if args.target == "all" else (args.target,)
    results = []
    try:
        for target in targets:
            for variant in variants:
                results.append(run_fuzzer(variant, args.duration, out, target=target,
                                          seed_files=args.seed_file))
    except FuzzerBuildError as err:
        print(f"fastsnap fuzz loader: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastsnap fuzz loader: interrupted", file=sys.stderr)
        return 130
    (out / "loader-summary.json").write_text(json.dumps(results, indent=1) + "\n")
    bad = False
    for r in results:
        print(f"{r['target']} {r['variant']}: {r['execs']} execs "
              f"({r['execs_per_second']}/s), corpus "
              f"{r['corpus']}, crashes {len(r['crashes'])}, readers agree "
              f"{r['readers']['agree']} disagree {r['readers']['disagree']}; total execs so "
              f"far {r['total_execs']}")
        for c in r["crashes"]:
            print(f"  crash: {c['reproduce']}")
        bad = bad or bool(r["crashes"]) or r["readers"]["disagree"] > 0
    return 1 if bad else 0
