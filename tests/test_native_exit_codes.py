"""One exit-code convention for every fastsnap-loader subcommand (no QEMU):
0 ok, 2 unusable input (missing file, directory, corrupt snapshot, bad
option), 1 run-time failure; the error line names an E_* from mr_errors.h."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_fastsnap.native.loader import SOURCE_DIR, run_loader
from pytest_fastsnap.snapshot.errors import ERROR_NAMES
from pytest_fastsnap.snapshot.writer import write_snapshot

COMMANDS: dict[str, list[str]] = {
    "inspect": ["inspect", "{}"],
    "verify": ["verify", "{}"],
    "load": ["load", "{}", "--mode", "lazy", "--access", "all"],
    "uffd-bench": ["uffd-bench", "{}", "--pages", "16"],
    "serve": ["serve", "{}", "--describe"],
}


def _inputs(tmp_path: Path) -> dict[str, Path]:
    valid = write_snapshot(tmp_path / "valid.img", "pc", [("pc.ram", bytes(range(256)) * 32)])
    corrupt = tmp_path / "corrupt.img"
    corrupt.write_bytes(b"QEVN" + valid.read_bytes()[4:])   # wrong magic
    (tmp_path / "dir").mkdir()
    return {"missing": tmp_path / "nope.img", "directory": tmp_path / "dir",
            "corrupt": corrupt, "valid": valid}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind,code", [("missing", 2), ("directory", 2), ("corrupt", 2),
                                       ("valid", 0)])
@pytest.mark.parametrize("build", ["release", "asan"])
def test_exit_code(tmp_path: Path, command: str, kind: str, code: int, build: str) -> None:
    if command == "uffd-bench" and kind == "corrupt":
        code = 0    # uffd-bench only reads FILE sequentially: any regular file will do
    path = _inputs(tmp_path)[kind]
    args = [a.format(path) for a in COMMANDS[command]]
    res = run_loader(args, variant=build, timeout=60)
    assert res.returncode == code, (args, res.stderr)
    if code == 2:
        line = res.stderr.splitlines()[0]
        assert re.match(r"fastsnap-loader( serve)?: ", line), line
        name = re.search(r"\bE_[A-Z_]+\b", line)
        assert name, line
        want = {"corrupt": "E_MAGIC", "missing": "E_OPEN", "directory": "E_NOT_FILE"}[kind]
        assert name.group() == want, line
        assert "Traceback" not in res.stderr


@pytest.mark.parametrize("option,value", [
    ("--max-bandwidth", "abc"), ("--max-bandwidth", "-1"), ("--io-timeout", "0"),
    ("--io-timeout", "nan"), ("--shut-timeout", "1s"), ("--connect-timeout", ""),
    ("--sndbuf", "12x"), ("--sndbuf", "-4"), ("--offset", "-1"), ("--offset", ""),
    ("--zero-pages", "some"), ("--ready-fd", "2"), ("--ready-fd", "x"), ("--ready-fd", ""),
    ("--eager-holdoff-us", "100001"), ("--eager-holdoff-us", "5us"), ("--eager-holdoff-us", "-1"),
])
def test_serve_numbers_are_strict(tmp_path: Path, option: str, value: str) -> None:
    """``--max-bandwidth abc`` used to mean unlimited (unchecked strtod)."""
    snap = _inputs(tmp_path)["valid"]
    res = run_loader(["serve", str(snap), "--describe", option, value], timeout=30)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"fastsnap-loader serve: E_USAGE: bad value for {option}: ")
    assert res.stdout == ""
    good = {"--zero-pages": "all", "--offset": "0", "--ready-fd": "3"}.get(option, "1")
    ok = run_loader(["serve", str(snap), "--describe", option, good], timeout=30)
    assert ok.returncode == 0, ok.stderr


def test_error_names_one_list() -> None:
    """mr_errors.h is the one list of names: its format names are the Python
    reader's (plus the loader's own E_MAX_LENGTH), and every E_ name any C
    source raises is declared there."""
    header = (SOURCE_DIR / "mr_errors.h").read_text()
    declared = set(re.findall(r'#define (E_[A-Z_]+) "\1"', header))
    fmt = re.search(r"#define MR_FORMAT_ERROR_NAMES(.*?)\n\n", header, re.S)
    assert fmt
    assert set(re.findall(r"E_([A-Z_]+)", fmt.group(1))) == set(ERROR_NAMES) | {"MAX_LENGTH"}
    used: set[str] = set()
    for src in SOURCE_DIR.glob("*.[ch]"):
        used |= set(re.findall(r'"(E_[A-Z_]+)"', src.read_text()))
    assert used <= declared, used - declared
