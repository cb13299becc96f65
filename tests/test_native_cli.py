"""fastsnap-loader command line without QEMU: usage errors, help, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_fastsnap.native.loader import run_loader
from pytest_fastsnap.snapshot.writer import write_snapshot


@pytest.mark.parametrize("args", [
    [], ["frobnicate"], ["verify"], ["verify", "x", "--offset", "abc"],
    ["load", "x"], ["load", "x", "--mode", "bogus"], ["load", "x", "--mode", "lazy",
                                                    "--access", "sideways"],
    ["load", "x", "--mode", "lazy", "--threads", "0"], ["verify", "x", "--max-length", "pc.ram"],
    ["inspect", "x", "--what"], ["uffd-bench", "x", "--pages", "0"],
    ["load", "x", "--mode", "lazy", "--fault-spin-us", "abc"],
    ["load", "x", "--mode", "lazy", "--fault-spin-us", "1001"],
])
def test_bad_usage_exits_2(args: list[str]) -> None:
    res = run_loader(args, timeout=10)
    assert res.returncode == 2, (args, res.stderr)
    assert res.stderr.startswith("fastsnap-loader: ")


def test_help() -> None:
    res = run_loader(["--help"], timeout=10)
    assert res.returncode == 0 and "verify FILE" in res.stdout and "serve" in res.stdout


@pytest.mark.parametrize("what,name", [("missing", "E_OPEN"), ("directory", "E_NOT_FILE")])
@pytest.mark.parametrize("command", [["inspect"], ["verify"], ["load", "--mode", "lazy"],
                                     ["serve", "--describe"]])
def test_unreadable_input_is_bad_input(tmp_path: Path, what: str, name: str,
                                       command: list[str]) -> None:
    """A missing file or a directory is bad input (exit 2) with the same name
    as the Python reader's, not an internal error."""
    from pytest_fastsnap.snapshot.errors import FormatError
    from pytest_fastsnap.snapshot.format import parse

    path = tmp_path / "nope" if what == "missing" else tmp_path
    res = run_loader([command[0], str(path), *command[1:]], timeout=10)
    assert res.returncode == 2, res.stderr
    assert f": {name}: {path}" in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    with pytest.raises(FormatError) as err:
        parse(path)
    assert f"E_{err.value.name}" == name


def test_max_length_takes_size_suffixes(tmp_path: Path) -> None:
    """`--max-length pc.ram=64M` (the README's example) means 64 MiB: a block
    of 16 KiB passes it and fails `pc.ram=8K`; sizes that overflow are refused."""
    from pytest_fastsnap.snapshot.writer import write_snapshot

    path = write_snapshot(tmp_path / "s.img", "pc-q35-10.0", [("pc.ram", bytes(4096) * 4)])
    for limit, code in (("64M", 0), ("16K", 0), ("0x4000", 0), ("8K", 2), ("8k", 2)):
        res = run_loader(["verify", str(path), "--max-length", f"pc.ram={limit}"], timeout=10)
        assert res.returncode == code, (limit, res.stderr)
        assert code == 0 or "E_MAX_LENGTH" in res.stderr
    for bad in ("64X", "64MB", "16777216T", "18446744073709551616", "-1", " 1"):
        res = run_loader(["verify", str(path), "--max-length", f"pc.ram={bad}"], timeout=10)
        assert res.returncode == 2 and "needs ID=SIZE" in res.stderr, (bad, res.stderr)


@pytest.mark.parametrize("data,name", [
    (b"", "E_TRUNCATED"), (b"QEVN\0\0\0\3", "E_MAGIC"), (b"QEVM\0\0\0\2\7", "E_VERSION"),
    (b"QEVM\0\0\0\3\1", "E_CONFIG"), (b"QEVM\0\0\0\3\7\0\0\0\0", "E_CONFIG"),
    (b"QEVM\0\0\0\3\7\0\0\0\2pc\0", "E_CONFIG"),
    (b"QEVM\0\0\0\3\7\0\0\0\2pc\5\x1aconfiguration/capabilities\0\0\0\1\0\0\0\1\x0amapped-ram"
     b"\0" * 20, "E_RAM_SECTION"),
])
@pytest.mark.parametrize("build", ["release", "asan"])
def test_tiny_hostile_files(tmp_path: Path, data: bytes, name: str, build: str) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(data)
    res = run_loader(["verify", str(path), "--json"], variant=build, timeout=10)
    assert res.returncode == 2, res.stderr
    assert json.loads(res.stdout)["error"] == name
    assert res.stderr.startswith(f"fastsnap-loader: {name}: ")


@pytest.mark.parametrize("build", ["release", "asan"])
@pytest.mark.parametrize("command", ["uffd-bench", "load-baseline"])
def test_failed_uffd_copy_does_not_hang_the_toucher(tmp_path: Path, build: str,
                                                     command: str) -> None:
    """A UFFDIO_COPY that fails in the round-trip measurement (forced with the
    debug knob FASTSNAP_LOADER_INJECT=uffd-copy-fail: the copy's source is a
    null pointer, so the kernel answers EFAULT) used to leave the faulting
    thread blocked forever; now the handler unregisters the range, the
    toucher stops and the command fails with the error."""
    snap = write_snapshot(tmp_path / "s.img", "pc", [("pc.ram", bytes(range(256)) * 64)])
    args = (["uffd-bench", str(snap), "--pages", "64"] if command == "uffd-bench"
            else ["load", str(snap), "--mode", "lazy", "--access", "all", "--baseline"])
    res = run_loader(args, variant=build, timeout=30,
                     env_extra={"FASTSNAP_LOADER_INJECT": "uffd-copy-fail"})
    assert res.returncode == 1, res.stderr
    assert "Bad address" in res.stderr and "UFFDIO_COPY" in res.stderr, res.stderr
    # Without the knob the same command succeeds: the failure above is the injected one.
    assert run_loader(args, variant=build, timeout=30).returncode == 0


@pytest.mark.parametrize("build", ["release", "asan"])
@pytest.mark.parametrize("mode", ["lazy", "fault-only"])
def test_several_fault_threads_stage_stamps_and_baseline_touchers(tmp_path: Path, build: str,
                                                                 mode: str) -> None:
    """--fault-threads 3 serves the same faults correctly (digest, each page
    placed once); the stage breakdown counts what was measured; the raw
    baseline uses as many touching threads as the load."""
    import hashlib

    content = b"".join(i.to_bytes(4, "little") * 1024 if i % 7 else bytes(4096)
                       for i in range(512))
    snap = write_snapshot(tmp_path / "s.img", "pc", [("pc.ram", content)])
    res = run_loader(["load", str(snap), "--mode", mode, "--access", "random", "--threads", "3",
                      "--fault-threads", "3", "--baseline", "--json"], variant=build, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    st = out["stats"]
    assert out["blocks"][0]["sha256"] == hashlib.sha256(content).hexdigest()
    assert st["pages_loaded"] == st["total_pages"] == 512 and st["double_loads"] == 0
    assert st["fault_threads"] == 3
    stages = st["fault_stages_us"]
    assert set(stages) == {"event_read", "claim", "pread", "copy", "resume"}
    # Every fault a fault thread resolved has its three handler stages...
    assert stages["claim"]["count"] == stages["pread"]["count"] == stages["copy"]["count"]
    assert stages["claim"]["count"] <= st["faults"]
    # ...and a toucher only attributes the faults it timed.
    assert stages["resume"]["count"] == stages["event_read"]["count"]
    assert stages["resume"]["count"] <= st["touch_latency_us"]["count"]
    if mode == "fault-only":
        assert stages["claim"]["count"] > 0
    assert out["baseline"]["uffd_round_trip_us"]["touchers"] == 3
