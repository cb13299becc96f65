"""`fastsnap qemu build` and `fastsnap qemu list`: argument checks, Debian's
source index, the cache's fast path, and the lock that makes concurrent
callers share one build.

The real build (about 5 minutes on 2 cores) is not run here; `.ci/run` runs it
once and the cross-version suites use its binary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from pytest_fastsnap.qemu.build import BINARY, INFO, resolve_debian_version, upstream_of

FASTSNAP = [sys.executable, "-m", "pytest_fastsnap.cli"]


def _run(*args: str, cache: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FASTSNAP_CACHE_DIR=str(cache))
    return subprocess.run([*FASTSNAP, "qemu", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env=env)


def _fake_build(cache: Path, version: str) -> Path:
    """A cache entry as a finished build leaves it (the binary only reports its version)."""
    entry = cache / "qemu" / version
    (entry / "bin").mkdir(parents=True)
    binary = entry / "bin" / BINARY
    binary.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version}'\n")
    binary.chmod(0o755)
    (entry / INFO).write_text(json.dumps({"version": version, "source": "fake",
                                          "built_at": "2026-11-30T00:00:00Z",
                                          "build_seconds": 1.0}))
    return binary


@pytest.fixture(scope="module")
def index_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One private copy of Debian's source index for this module's tests."""
    return tmp_path_factory.mktemp("qemu-cache")


@pytest.mark.parametrize(("args", "says"), [
    (["build", "10.2"], "VERSION must look like 10.2.2"),
    (["build", "latest"], "VERSION must look like 10.2.2"),
    (["build", "../x", "--source", "."], "letters, digits and ._+~:- only, not '../x'"),
    (["build", "master", "--source", "/nonexistent/qemu"], "not a QEMU source tree"),
])
def test_bad_arguments_are_one_line_usage_errors(tmp_path: Path, args: list[str],
                                                 says: str) -> None:
    result = _run(*args, cache=tmp_path)
    assert result.returncode == 2
    assert says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "qemu").exists(), "bad input left files in the cache"


def test_missing_subcommand_is_a_usage_error(tmp_path: Path) -> None:
    result = _run(cache=tmp_path)
    assert result.returncode == 2
    assert "required: qemu_command" in result.stderr


def test_unavailable_version_lists_what_is(index_cache: Path) -> None:
    result = _run("build", "9.9.9", cache=index_cache)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert line.startswith("fastsnap qemu build: QEMU 9.9.9 is not in Debian's source index")
    available = line.split("available: ", 1)[1]
    # Whatever the index holds today, each entry is "X.Y.Z (debian version)".
    entries = available.split("; ", 1)[0].split(", ")
    assert entries and all(" (" in e and e.endswith(")") for e in entries), line
    assert not (index_cache / "qemu" / "9.9.9").exists()
    assert not list((index_cache / "qemu").glob("9.9.9.work"))


def test_version_maps_to_debian_version_from_the_index(index_cache: Path) -> None:
    root = index_cache / "qemu"
    _run("build", "9.9.9", cache=index_cache)  # makes sure the index is there
    text = (root / "apt" / "index.log").read_text()
    listed = [line.split()[1] for line in text.splitlines() if line.startswith("Version: ")]
    assert listed, "apt-cache showsrc qemu listed no versions"
    for deb in listed:
        assert upstream_of(deb) != deb
        assert resolve_debian_version(upstream_of(deb), root) in listed
    assert resolve_debian_version(listed[0], root) == listed[0]


@pytest.mark.parametrize(("debian", "upstream"), [
    ("1:10.2.2+ds-1", "10.2.2"), ("1:11.0.0~rc1+ds-1", "11.0.0-rc1"),
    ("10.0.2+dfsg-2+deb13u1~bpo12+1", "10.0.2"),
])
def test_upstream_of_debian_versions(debian: str, upstream: str) -> None:
    assert upstream_of(debian) == upstream


def test_second_call_returns_the_cached_build(tmp_path: Path) -> None:
    binary = _fake_build(tmp_path, "10.2.2")
    result = _run("build", "10.2.2", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{binary}\n"
    # Nothing was fetched, configured or locked: the cache answered.
    assert sorted(p.name for p in (tmp_path / "qemu").iterdir()) == ["10.2.2"]


def test_a_waiting_caller_takes_the_build_another_finished(tmp_path: Path) -> None:
    """A second caller blocks on the version's lock while the first builds, then
    returns the first one's result without building again."""
    root = tmp_path / "qemu"
    root.mkdir()
    lock = FileLock(str(root / "10.2.2.lock"))
    lock.acquire()
    env = dict(os.environ, FASTSNAP_CACHE_DIR=str(tmp_path))
    proc = subprocess.Popen([*FASTSNAP, "qemu", "build", "10.2.2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "waiting for another build of QEMU 10.2.2" in line, line
        assert proc.poll() is None, "did not wait for the lock"
        binary = _fake_build(tmp_path, "10.2.2")  # what the first caller's build leaves
    finally:
        lock.release()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == f"{binary}\n"
    assert not (root / "apt").exists(), "the waiting caller built again"


def test_list_shows_builds_and_where(tmp_path: Path) -> None:
    empty = _run("list", cache=tmp_path)
    assert empty.returncode == 0
    assert empty.stdout.startswith(f"no QEMU built in {tmp_path / 'qemu'}")
    first, second = _fake_build(tmp_path, "10.2.2"), _fake_build(tmp_path, "master")
    (tmp_path / "qemu" / "broken").mkdir()  # an interrupted build: no BUILD-INFO.json
    listed = _run("list", cache=tmp_path).stdout.splitlines()
    assert [line.split("\t")[:2] for line in listed] == [["10.2.2", str(first)],
                                                        ["master", str(second)]]
