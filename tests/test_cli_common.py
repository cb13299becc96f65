"""The shared CLI helpers (pytest_fastsnap.cli.common) other subcommands build on."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pytest_fastsnap.cli.common import (
    UsageError,
    one_line,
    output_dir,
    parse_size,
    size_arg,
    temp_workdir,
)


@pytest.mark.parametrize("text,default_unit,value", [
    ("64M", "", 64 << 20), ("64m", "", 64 << 20), ("64MiB", "", 64 << 20), ("1G", "", 1 << 30),
    ("2T", "", 2 << 40), ("4096", "", 4096), ("4096B", "M", 4096), ("256", "M", 256 << 20),
    ("16K", "M", 16 << 10),
])
def test_parse_size(text: str, default_unit: str, value: int) -> None:
    assert parse_size(text, default_unit=default_unit) == value


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-1", "64X", "64 M", "0x10", "64MM",
                                  "99999999T", str(1 << 64)])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|too large"):
        parse_size(text)


def test_size_arg_minimum() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="less than"):
        size_arg(default_unit="M", minimum=9 << 20)("8")


def test_temp_workdir_is_removed_on_error() -> None:
    with pytest.raises(RuntimeError), temp_workdir("fastsnap-test-") as path:
        (path / "f").write_text("x")
        raise RuntimeError("boom")
    assert not path.exists()


def test_output_dir_creates_nothing(tmp_path: Path) -> None:
    assert output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    (tmp_path / "f").touch()
    with pytest.raises(UsageError, match="not a directory"):
        output_dir(tmp_path / "f")


def test_one_line_keeps_first_and_last() -> None:
    assert one_line("QEMU did not come up\ncommand: x\nlog:\nqemu: bad -machine") == \
        "QEMU did not come up ... qemu: bad -machine"
    assert one_line(ValueError("")) == "ValueError"
