"""fastsnap-loader command line without QEMU: usage errors, help, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_fastsnap.native.loader import run_loader


@pytest.mark.parametrize("args", [
    [], ["frobnicate"], ["verify"], ["verify", "x", "--offset", "abc"],
    ["load", "x"], ["load", "x", "--mode", "bogus"], ["load", "x", "--mode", "lazy",
                                                    "--access", "sideways"],
    ["load", "x", "--mode", "lazy", "--threads", "0"], ["verify", "x", "--max-length", "pc.ram"],
    ["inspect", "x", "--what"], ["uffd-bench", "x", "--pages", "0"],
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
