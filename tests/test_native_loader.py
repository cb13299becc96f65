"""The native loader (fastsnap-loader inspect/verify/load/uffd-bench) against
files QEMU wrote (needs --fastsnap), compared with the Python reader.

Every mutation of pytest_fastsnap.snapshot.mutate.all_header_mutations must be
rejected by `verify` with exit 2 and the expected E_ name, within 10 s, never
by a signal, in both the release and the ASan/UBSan builds; the C and Python
parsers must agree on each mutated file.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_fastsnap.fixtures import GuestFactory, SnapshotFactory, VmFactory
from pytest_fastsnap.native.loader import run_loader
from pytest_fastsnap.qemu.migration import SavedSnapshot
from pytest_fastsnap.snapshot.digest import block_digest
from pytest_fastsnap.snapshot.errors import FormatError
from pytest_fastsnap.snapshot.format import parse
from pytest_fastsnap.snapshot.libvirt import build_header
from pytest_fastsnap.snapshot.mutate import all_header_mutations, set_block_id

pytestmark = pytest.mark.fastsnap

VARIANTS: dict[str, dict[str, Any]] = {
    "q35": {"machine": "q35"},
    "pc": {"machine": "pc"},
    "q35-offset": {"machine": "q35", "offset": 0x10000, "prefix_bytes": b"PREFIX" * 100},
    "q35-multifd": {"machine": "q35", "capabilities": {"multifd": True},
                    "parameters": {"multifd-channels": 2}},
    "q35-zero-page-none": {"machine": "q35", "parameters": {"zero-page-detection": "none"}},
    "q35-live": {"machine": "q35", "live": True},
}
MODES = ("lazy", "fault-only", "eager", "sync")
ACCESS = ("none", "seq", "random", "all")


def _save(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
          variant: str) -> SavedSnapshot:
    opts = dict(VARIANTS[variant])
    vm = vm_factory(machine=opts.pop("machine"), mem="128M")
    vm.wait_status("running", timeout=10)
    saved = snapshot_factory(vm, **opts)
    vm.shutdown()
    return saved


def _verify(path: Path | str, offset: int, variant: str = "release",
            extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return run_loader(["verify", str(path), "--offset", str(offset), "--json", *extra],
                      variant=variant, timeout=10)


def _check_digests(saved: SavedSnapshot, out: str) -> dict[str, Any]:
    snap = parse(saved.path, saved.offset)
    result = json.loads(out)
    got = {b["id"]: b["sha256"] for b in result["blocks"]}
    want = {b.name: block_digest(snap, b) for b in snap.blocks}
    assert got == want
    stats = result["stats"]
    assert stats["double_loads"] == 0
    assert stats["pages_loaded"] == stats["total_pages"] == \
        sum(b.used_length.value // 4096 for b in snap.blocks)
    return stats


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_verify_and_inspect_qemu_files(vm_factory: VmFactory,
                                       snapshot_factory: SnapshotFactory, variant: str) -> None:
    saved = _save(vm_factory, snapshot_factory, variant)
    res = _verify(saved.path, saved.offset)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["valid"] is True
    res = run_loader(["inspect", str(saved.path), "--offset", str(saved.offset), "--json"])
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    snap = parse(saved.path, saved.offset)
    assert info["machine"] == snap.machine
    assert info["stream_offset"] == saved.offset
    assert [b["id"] for b in info["blocks"]] == [b.name for b in snap.blocks]
    for mine, ref in zip(info["blocks"], snap.blocks, strict=True):
        assert mine["length"] == ref.used_length.value
        assert mine["bitmap_offset"] == ref.header.bitmap_offset.value
        assert mine["pages_offset"] == ref.header.pages_offset.value
        bits = ref.read_bitmap(saved.path)
        assert mine["pages_set"] == sum(
            1 for i in range(ref.num_pages) if bits[i // 8] >> (i % 8) & 1)
    assert snap.device_state is not None
    assert info["device_state"] == {"start": snap.device_state.start,
                                    "end": snap.device_state.end}
    # a fast load of each kind agrees with the Python digest too
    res = run_loader(["load", str(saved.path), "--offset", str(saved.offset), "--mode", "lazy",
                      "--access", "random", "--threads", "2", "--json"], timeout=60)
    assert res.returncode == 0, res.stderr
    _check_digests(saved, res.stdout)


def test_load_all_modes_and_access_patterns(guest_factory: GuestFactory,
                                            snapshot_factory: SnapshotFactory) -> None:
    guest = guest_factory("tiny", mem="128M")
    saved = snapshot_factory(guest.vm)
    guest.vm.shutdown()
    for mode in MODES:
        for access in ACCESS:
            res = run_loader(["load", str(saved.path), "--mode", mode, "--access", access,
                              "--threads", "2", "--json"], timeout=60)
            assert res.returncode == 0, (mode, access, res.stderr)
            stats = _check_digests(saved, res.stdout)
            if mode == "sync":
                assert stats["faults"] == 0
            if mode == "fault-only":
                assert stats["eager_pages"] == 0 and stats["faults"] > 0


@pytest.mark.parametrize("build", ["release", "asan"])
def test_every_mutation_rejected_and_parsers_agree(vm_factory: VmFactory,
                                                   snapshot_factory: SnapshotFactory,
                                                   tmp_path: Path, build: str) -> None:
    saved = _save(vm_factory, snapshot_factory, "q35")
    snap = parse(saved.path, saved.offset)
    failures = []
    count = 0
    for mutation in all_header_mutations(snap):
        dst = tmp_path / "m.img"
        dst.unlink(missing_ok=True)
        applied = mutation.apply(dst)
        count += 1
        res = _verify(dst, saved.offset, build)
        try:
            parse(dst, saved.offset)
            py_error = None
        except FormatError as err:
            py_error = err.name
        expected = applied.expected_error
        problems = []
        if res.returncode < 0 or res.returncode not in (0, 2):
            problems.append(f"exit {res.returncode}: {res.stderr[-500:]}")
        elif expected is None:
            if res.returncode != 0:
                problems.append(f"rejected a valid file: {res.stderr.strip()}")
        else:
            out = json.loads(res.stdout) if res.stdout.strip() else {}
            if res.returncode != 2 or out.get("error") != f"E_{expected}":
                problems.append(f"want E_{expected}, got exit {res.returncode} "
                                f"{out.get('error')}: {out.get('message')}")
            elif not res.stderr.startswith(f"fastsnap-loader: E_{expected}: "):
                problems.append(f"stderr {res.stderr!r}")
        c_error = None
        if res.returncode == 2:
            c_error = json.loads(res.stdout)["error"]
        if (c_error is None) != (py_error is None) or (
                c_error and c_error != f"E_{py_error}"):
            problems.append(f"C {c_error} vs Python {py_error}")
        if problems:
            failures.append(f"{mutation}: {'; '.join(problems)}")
    assert count > 50
    assert not failures, "\n".join(failures)


def test_stress_lazy_random_threads(guest_factory: GuestFactory,
                                    snapshot_factory: SnapshotFactory) -> None:
    guest = guest_factory("tiny", mem="256M", size=200 << 20, zero_ratio=0.05)
    saved = snapshot_factory(guest.vm)
    guest.vm.shutdown()
    for seed in (1, 2, 3):
        res = run_loader(["load", str(saved.path), "--mode", "lazy", "--access", "random",
                          "--threads", "4", "--seed", str(seed), "--json"], timeout=120)
        assert res.returncode == 0, res.stderr
        stats = _check_digests(saved, res.stdout) if seed == 1 else \
            json.loads(res.stdout)["stats"]
        assert stats["double_loads"] == 0
        assert stats["pages_loaded"] == stats["total_pages"]
        assert stats["faults"] > 0 and stats["pages_copied"] > 40000


def test_uffd_bench(vm_factory: VmFactory, snapshot_factory: SnapshotFactory) -> None:
    saved = _save(vm_factory, snapshot_factory, "q35")
    res = run_loader(["uffd-bench", str(saved.path), "--pages", "2048", "--json"], timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert 0 < out["uffd_round_trip_us"]["p50"] <= out["uffd_round_trip_us"]["p99"]
    assert out["pread_mib_s"] > 0


FUZZ_SRC = Path(__file__).parents[1] / "pytest_fastsnap/native/src"


def test_fuzz_parser(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                     tmp_path: Path) -> None:
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang not found on PATH: libFuzzer (clang -fsanitize=fuzzer) is needed "
                    "to build src/fuzz_format.c")
    binary = tmp_path / "fuzz_format"
    cmd = [clang, "-std=c11", "-g", "-O1", "-fsanitize=fuzzer,address,undefined",
           "-fno-sanitize-recover=all", "-o", str(binary), str(FUZZ_SRC / "fuzz_format.c"),
           str(FUZZ_SRC / "mr_format.c"), str(FUZZ_SRC / "mr_libvirt.c"),
           str(FUZZ_SRC / "mr_errors.c")]
    build = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if build.returncode != 0 and "libclang_rt.fuzzer" in build.stderr:
        pytest.skip("clang is installed but its libFuzzer runtime (libclang_rt.fuzzer) is "
                    "missing: apt-get install libclang-rt-$(clang -dumpversion | cut -d. -f1)-dev")
    assert build.returncode == 0, build.stderr
    saved = _save(vm_factory, snapshot_factory, "q35")
    # The seed: the real snapshot with its page regions cut out (holes of a
    # sparse file are too large for libFuzzer's -max_len), re-laid out small.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    from pytest_fastsnap.snapshot.sparse import sparse_copy
    seed = tmp_path / "seed.img"
    sparse_copy(saved.path, seed)
    (corpus / "real").write_bytes(_compact_seed(seed))
    # libvirt's save-image header in front (the stream behind it is misplaced).
    (corpus / "libvirt").write_bytes(build_header(b"<domain><name>f</name></domain>")
                                     + (corpus / "real").read_bytes())
    # FASTSNAP_LIBFUZZER_SECONDS lengthens the run for a soak (default 20 s).
    seconds = int(os.environ.get("FASTSNAP_LIBFUZZER_SECONDS", "20"))
    run = subprocess.run([str(binary), str(corpus), f"-max_total_time={seconds}", "-timeout=10",
                          "-rss_limit_mb=2048", "-max_len=4000000"],
                         capture_output=True, text=True, timeout=seconds + 100, check=False,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Done" in run.stderr or "DONE" in run.stderr
    # Differential check: on what the fuzzer kept, C and Python agree on the verdict.
    disagreements = []
    for path in sorted(corpus.iterdir())[:2000]:
        res = run_loader(["verify", str(path), "--json"], timeout=10)  # offset: auto
        assert res.returncode in (0, 2), (path.name, res.stderr)
        c_error = json.loads(res.stdout)["error"] if res.returncode == 2 else None
        try:
            parse(path)
            py_error = None
        except FormatError as err:
            py_error = f"E_{err.name}"
        if c_error != py_error:
            # The corpus dies with tmp_path: keep the input in the report, small
            # enough to paste (zlib + base64) into a regression test.
            packed = base64.b64encode(zlib.compress(path.read_bytes(), 9)).decode()
            disagreements.append(f"{path.name}: C {c_error} vs Python {py_error}; input "
                                 f"zlib+base64: {packed[:20000]}")
    assert not disagreements, "\n".join(disagreements)


def _compact_seed(path: Path) -> bytes:
    """The real q35 stream (machine, configuration, RAM framing, device state,
    vmdesc) re-laid out with its first two blocks shrunk to one data page
    each, so the seed is ~2 MiB instead of a 128 MiB sparse file."""
    from dataclasses import replace

    from pytest_fastsnap.snapshot.writer import BlockSpec, spec_from_snapshot, write_spec
    snap = parse(path)
    spec = spec_from_snapshot(snap)
    blocks = [BlockSpec(b.id, 4096, {0: bytes([i + 1]) * 4096})
              for i, b in enumerate(spec.blocks[:2])]
    out = path.with_suffix(".small")
    write_spec(out, replace(spec, blocks=blocks, total=None))
    assert parse(out).ok
    return out.read_bytes()


def test_max_length_and_asan_load(vm_factory: VmFactory,
                                  snapshot_factory: SnapshotFactory) -> None:
    saved = _save(vm_factory, snapshot_factory, "q35")
    ram = parse(saved.path).block("pc.ram").used_length.value
    ok = _verify(saved.path, 0, extra=("--max-length", f"pc.ram={ram}"))
    assert ok.returncode == 0, ok.stderr
    for build in ("release", "asan"):
        bad = _verify(saved.path, 0, build, ("--max-length", f"pc.ram={ram - 4096}"))
        assert bad.returncode == 2
        out = json.loads(bad.stdout)
        assert out["error"] == "E_MAX_LENGTH" and "pc.ram" in out["message"]
    for mode in MODES:  # the sanitizer build restores correctly too
        res = run_loader(["load", str(saved.path), "--mode", mode, "--access", "random",
                          "--threads", "3", "--json"], variant="asan", timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        _check_digests(saved, res.stdout)


@pytest.mark.parametrize("make_id", [
    pytest.param(lambda blk, first: "\0" + blk[1:], id="leading-nul"),
    pytest.param(lambda blk, first: first + "\0x", id="earlier-id-then-nul"),
])
def test_block_id_ends_at_nul_in_both_readers(
        vm_factory: VmFactory, snapshot_factory: SnapshotFactory, tmp_path: Path,
        make_id: Callable[[str, str], str]) -> None:
    """QEMU reads a block id into a C string and finds the RAMBlock with strcmp,
    so the id ends at its first NUL: "\\0c.rom" is empty and "pc.ram\\0x" is a
    second pc.ram.  Both readers must say E_BLOCK_ID (libFuzzer found the Python
    reader reading on past the NUL and reporting E_BLOCK_LENGTH instead)."""
    saved = _save(vm_factory, snapshot_factory, "q35")
    snap = parse(saved.path, saved.offset)
    blk = snap.blocks[2]
    dst = tmp_path / "nul.img"
    set_block_id(saved.path, dst, blk.name, make_id(blk.name, snap.blocks[0].name),
                 stream_offset=saved.offset)
    res = _verify(dst, saved.offset)
    with pytest.raises(FormatError) as py:
        parse(dst, saved.offset)
    assert res.returncode == 2, res.stderr
    assert (json.loads(res.stdout)["error"], f"E_{py.value.name}") == ("E_BLOCK_ID", "E_BLOCK_ID")
