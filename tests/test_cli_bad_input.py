"""Every `fastsnap` subcommand fed bad input: the documented exit code, exactly
one error line on stderr (no traceback), and nothing new in /tmp.

Each case runs in a private mount namespace whose /tmp is a directory of this
test (``unshare --mount`` + ``mount --bind``), so a leftover is caught exactly,
whatever else runs on the machine.  The inputs live in ``/tmp/inputs`` there.

A subcommand's cases are one line in CASES: ``*file_cases("CMD {}")`` feeds
a missing path, a directory, an empty file and a random 1 MiB file where a
snapshot goes; ``*binary_cases("CMD --qemu-binary {}")`` feeds those plus
/bin/true and a script without ``#!`` as the QEMU binary.
test_every_subcommand_has_cases fails until a new subcommand has its line.
No case boots a guest.
"""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_fastsnap.cli import build_parser
from pytest_fastsnap.cli.native import LOADER_COMMANDS

USAGE = 2  # bad input / usage / unusable QEMU binary (pytest_fastsnap/cli/__init__.py)
INPUTS = "/tmp/inputs"  # where the inputs are, as the command sees them
FILE_INPUTS = ("missing", "dir", "empty", "random")
BINARY_INPUTS = (*FILE_INPUTS, "true", "noshebang")


def file_cases(command: str, code: int = USAGE) -> list[tuple[str, int]]:
    """*command* with each bad file where its ``{}`` is."""
    return [(command.replace("{}", f"{{{name}}}"), code) for name in FILE_INPUTS]


def binary_cases(command: str, code: int = USAGE) -> list[tuple[str, int]]:
    """*command* with each unusable QEMU binary where its ``{}`` is."""
    return [(command.replace("{}", f"{{{name}}}"), code) for name in BINARY_INPUTS]


CASES: list[tuple[str, int]] = [
    ("", USAGE),
    ("frobnicate", USAGE),
    # probe
    *binary_cases("probe --qemu-binary {}"),
    ("probe --qemu-binary {hang} --timeout 1", USAGE),
    ("probe --timeout 0", USAGE),
    # save: checked before anything is created or booted
    ("save {out} --mem garbage", USAGE),
    ("save {out} --mem 8M", USAGE),
    ("save {out} --guest linux --mem 64M", USAGE),
    ("save {out} --mem 1.5G", USAGE),
    ("save {out} --offset -5", USAGE),
    ("save {out} --offset 12x", USAGE),
    ("save {out} --guest firmware --dirty", USAGE),
    ("save {dir}", USAGE),
    ("save {missing}/x.img", USAGE),
    ("save {out} --machine bogus", USAGE),  # probes the system QEMU (cached), boots nothing
    *binary_cases("save {out} --qemu-binary {}"),
    # restore: the snapshot, its manifest, the snapshot's format, the binary
    *file_cases("restore {}"),
    ("restore {nomanifest}", USAGE),
    ("restore {badformat}", USAGE),
    ("restore {snapshot} --strategy bogus", USAGE),
    ("restore {snapshot} --recover-attempts -1", USAGE),
    ("restore {snapshot} --recover-attempts 3x", USAGE),
    ("restore {snapshot} --recover-attempts 101", USAGE),
    ("restore {snapshot} --strategy qemu-precopy --recover-attempts 2", USAGE),
    ("restore {snapshot} --preempt --recover-attempts 101", USAGE),
    ("restore {snapshot} --preempt --record-ws {out}", USAGE),
    ("restore {snapshot} --to tcp:1.2.3:80", USAGE),
    ("restore {snapshot} --to tcp:[::1]:99999", USAGE),
    ("restore {snapshot} --to fd", USAGE),
    ("restore {snapshot} --strategy qemu-precopy --preempt", USAGE),
    *binary_cases("restore {snapshot} --qemu-binary {}"),
    *file_cases("restore {snapshot} --ws {}"),
    ("restore {snapshot} --ws-mode bogus", USAGE),
    ("restore {snapshot} --record-ws {dir}", USAGE),
    ("restore {snapshot} --strategy qemu-precopy --ws {random}", USAGE),
    ("restore {snapshot} --eager-delay 0", USAGE),
    ("restore {snapshot} --pin 0/0", USAGE),
    ("restore {snapshot} --pin 0", USAGE),
    ("restore {snapshot} --pin 0/4096", USAGE),
    ("restore {snapshot} --pin x/1", USAGE),
    ("restore {snapshot} --strategy qemu-precopy --pin auto", USAGE),
    ("restore {snapshot} --eager-delay nan", USAGE),
    ("restore {snapshot} --eager-delay 1s", USAGE),
    ("restore {snapshot} --strategy qemu-precopy --eager-delay 1", USAGE),
    # bench: all of it before the first guest boots
    *binary_cases("bench --sizes 32M --qemu-binary {}"),
    ("bench --sizes garbage", USAGE),
    ("bench --sizes 8M", USAGE),
    ("bench -- --sizes 8M", USAGE),
    ("bench --repeat 0", USAGE),
    ("bench --strategies bogus", USAGE),
    ("bench --workloads rand:0", USAGE),
    ("bench --workloads bogus:10", USAGE),
    ("bench --workloads rand:10,seq", USAGE),
    ("bench --guest-latency rand:1,seq:1", USAGE),
    ("bench --guest-latency rand", USAGE),
    ("bench --results-dir {empty}", USAGE),
    # the native loader's commands
    *file_cases("inspect {}"),
    *file_cases("verify {}"),
    *file_cases("load {} --mode lazy"),
    *file_cases("serve {} --describe"),
    ("verify {random} --max-length pc.ram=64X", USAGE),
    ("verify {random} --max-length pc.ram=17000000T", USAGE),
    ("verify {random} --offset -5", USAGE),
    ("serve {random}", USAGE),
    ("serve {random} --bogus", USAGE),
    ("serve {random} --resume", USAGE),
    ("serve {random} --to unix:/nonexistent/s --preempt --record-ws {out}", USAGE),
    ("serve {random} --to unix:/nonexistent/s --ws-mode before-run", USAGE),
    ("serve {random} --to fd:3 --resume --preempt", USAGE),
    ("serve {random} --to tcp:::1:80", USAGE),
    ("serve {random} --to fd:3 --preempt", USAGE),
    # build steps
    ("build-native --variant bogus", USAGE),
    ("build-images --cache-dir {empty}", USAGE),
    # other QEMU versions and the defect table
    ("qemu build", USAGE),
    ("qemu bogus", USAGE),
    *file_cases("qemu build mine --source {}"),
    *file_cases("report {}"),
    # fuzz: the snapshot and its manifest, the binary, the campaign dirs, the seeds
    *file_cases("fuzz qemu {} --out {out}"),
    *binary_cases("fuzz qemu --qemu-binary {} --out {out}"),
    ("fuzz qemu {snapshot} --guest tiny --out {out}", USAGE),
    ("fuzz qemu --jobs 0 --out {out}", USAGE),
    *file_cases("fuzz repro {}"),
    *file_cases("fuzz merge {} --out {out}"),
    *file_cases("fuzz loader --duration 1 --seed-file {} --out {out}"),
    ("fuzz loader --duration 0 --out {out}", USAGE),
    ("fuzz loader --target bogus --out {out}", USAGE),
    # A new subcommand adds its line here (test_every_subcommand_has_cases).
]

HANG = """#!/bin/sh
sleep 600 &
echo $! > "$0.child"
wait
"""


def _make_inputs(inputs: Path) -> None:
    from pytest_fastsnap.snapshot.writer import write_snapshot

    (inputs / "dir").mkdir(parents=True)
    (inputs / "empty").touch()
    (inputs / "random").write_bytes(os.urandom(1 << 20))
    (inputs / "random").chmod(0o755)  # as a QEMU binary: runs, but is no program
    (inputs / "nomanifest").write_bytes(os.urandom(4096))
    (inputs / "badformat").write_bytes(os.urandom(4096))
    (inputs / "badformat.json").write_text('{"qemu_args": ["-m", "64M"]}')
    write_snapshot(inputs / "snapshot", "pc-q35-10.0", [("pc.ram", bytes(4096) * 4)])
    (inputs / "snapshot.json").write_text('{"qemu_args": ["-m", "64M"]}')
    for name, text in (("noshebang", "echo QEMU emulator version 10.0.2\n"), ("hang", HANG)):
        (inputs / name).write_text(text)
        (inputs / name).chmod(0o755)


@functools.cache
def _private_tmp_prefix() -> tuple[str, ...] | None:
    """The unshare command line that gives a child its own /tmp, or None."""
    script = 'mount --bind "$1" /tmp && shift && exec "$@"'
    for flags in (["--mount"], ["--user", "--map-root-user", "--mount"]):
        cmd = ("unshare", *flags, "--propagation", "private", "sh", "-c", script, "sh")
        try:
            ok = subprocess.run([*cmd, "/", "true"], capture_output=True, timeout=30,
                                check=False).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return cmd
    return None


@pytest.fixture
def private_tmp(tmp_path: Path) -> Path:
    """A directory that is /tmp for the command, with the inputs in it."""
    if _private_tmp_prefix() is None:
        pytest.skip("needs `unshare --mount` (root, or unprivileged user namespaces) to give "
                    "fastsnap a private /tmp to check for leftovers")
    root = tmp_path / "tmp"
    _make_inputs(root / "inputs")
    return root


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.parametrize("command,code", CASES, ids=[c for c, _ in CASES])
def test_bad_input(private_tmp: Path, command: str, code: int) -> None:
    names = {name: f"{INPUTS}/{name}" for name in (*BINARY_INPUTS, "hang", "nomanifest",
                                                   "badformat", "snapshot")}
    names |= {"true": "/bin/true", "out": f"{INPUTS}/out.img"}
    args = [a.format(**names) for a in shlex.split(command)]
    before = _listing(private_tmp)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("FASTSNAP_TRACEBACK", None)
    result = subprocess.run([*_private_tmp_prefix(), str(private_tmp), sys.executable, "-m",
                             "pytest_fastsnap.cli", *args], capture_output=True, text=True,
                            timeout=120, env=env, check=False)
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("fastsnap"), result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    child = private_tmp / "inputs" / "hang.child"
    if child.exists():  # the hanging "QEMU" and what it started were killed
        pid = int(child.read_text())
        child.unlink()
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid), f"the hanging binary's child {pid} was left running"
    assert _listing(private_tmp) == before, "left behind in /tmp"


def test_every_subcommand_has_cases() -> None:
    """A new subcommand needs its bad-input line in CASES."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = {*sub.choices, *LOADER_COMMANDS}  # type: ignore[union-attr]
    covered = {command.split()[0] for command, _ in CASES if command}
    assert commands <= covered, f"no bad-input cases for {sorted(commands - covered)}"
