"""The local loader's failure paths, driven by the debug knob FASTSNAP_LOADER_INJECT
(real userfaultfd, real kernel errors; no QEMU needed): a fault thread that
dies holding counted faults, failed UFFDIO_WAKEs on both wake paths, and an
event other than a page fault.  Each of these used to hang or pass silently."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from pytest_fastsnap.native.loader import run_loader
from pytest_fastsnap.snapshot.writer import write_snapshot

BUILDS = ["release", "asan"]


def _content(pages: int) -> bytes:
    """Distinct data pages with every fifth page zero (a clear bitmap bit)."""
    return b"".join(i.to_bytes(4, "little") * 1024 if i % 5 else bytes(4096)
                    for i in range(pages))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    content = _content(512)
    path = write_snapshot(tmp_path_factory.mktemp("fp") / "s.img", "pc", [("pc.ram", content)])
    return path, content


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 MiB: the eager thread is still busy when the first fault arrives."""
    return write_snapshot(tmp_path_factory.mktemp("fp") / "l.img", "pc",
                          [("pc.ram", _content(16384))])


def _load(path: Path, build: str, inject: str, *extra: str):
    return run_loader(["load", str(path), *extra], variant=build, timeout=60,
                      env_extra={"FASTSNAP_LOADER_INJECT": inject})


@pytest.mark.parametrize("build", BUILDS)
def test_eager_thread_stops_while_faults_are_pending(large: Path, build: str) -> None:
    """`fault-abandon`: the fault thread reads the first events (counted as
    pending), holds them 100 ms so the eager thread is waiting for them
    ("faults go first"), then fails without resolving them.  The eager
    thread's wait checks the stop flag, so the load ends with the error; it
    used to spin on sched_yield forever (the subprocess timed out)."""
    res = _load(large, build, "fault-abandon", "--mode", "lazy", "--access", "random",
                "--threads", "2")
    assert res.returncode == 1, res.stderr
    assert re.fullmatch(r"fastsnap-loader: E_INTERNAL: load: fault thread: abandoned \d+ "
                        r"events \(injected\)\n", res.stderr), res.stderr


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("path_name,inject,what", [
    ("fault thread", "dup-events", "UFFDIO_WAKE"),
    ("place() EEXIST", "place-twice", "placing it again"),
])
def test_failed_wake_fails_the_load(small: tuple[Path, bytes], build: str, path_name: str,
                                    inject: str, what: str) -> None:
    """Both wake paths: a fault on a page already placed (`dup-events`: each
    fault event handled twice, as when two threads fault on one page) and a
    placement that finds the page present (`place-twice`: EEXIST).  Alone,
    the knob shows the path is taken (wakes > 0) and harmless (digest, each
    page placed once); with `uffd-wake-fail` the wake gets an empty range,
    the kernel answers EINVAL and the load fails naming it.  The wake
    results used to be ignored: exit 0 with the failure unseen."""
    path, content = small
    args = ("--mode", "fault-only", "--access", "all", "--json")
    ok = _load(path, build, inject, *args)
    assert ok.returncode == 0, (path_name, ok.stderr)
    out = json.loads(ok.stdout)
    st = out["stats"]
    assert out["blocks"][0]["sha256"] == hashlib.sha256(content).hexdigest()
    assert st["wakes"] > 0 and st["double_loads"] == 0
    assert st["pages_loaded"] == st["total_pages"] == 512

    res = _load(path, build, f"{inject},uffd-wake-fail", *args)
    assert res.returncode == 1, (path_name, res.stderr)
    err = json.loads(res.stdout)
    assert err["error"] == "E_UFFD" and what in err["message"], err
    assert "Invalid argument" in err["message"], err


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("mode", ["lazy", "fault-only"])
def test_non_pagefault_event_fails_the_load(small: tuple[Path, bytes], build: str,
                                            mode: str) -> None:
    """`event-remove`: the loader asks for UFFD_FEATURE_EVENT_REMOVE and drops
    a placed page with MADV_DONTNEED, so the kernel sends UFFD_EVENT_REMOVE
    (0x15).  The fault thread fails the load naming the event.  It used to
    drop such events silently: the dropped page then faulted forever (the
    page was claimed and loaded, so each fault only got a wake) and the
    load hung, or passed if the page had not been placed yet."""
    path, _ = small
    res = _load(path, build, "event-remove", "--mode", mode, "--access", "all")
    assert res.returncode == 1, res.stderr
    assert "E_INTERNAL" in res.stderr and "unexpected userfaultfd event 0x15" in res.stderr
    assert len(res.stderr.splitlines()) == 1, res.stderr


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("mode", ["lazy", "fault-only"])
@pytest.mark.parametrize("source,spin", [("", "0"), ("", "1000"), ("pread-fault", "20")])
def test_fault_data_sources_and_spin_restore_the_same_memory(
        small: tuple[Path, bytes], build: str, mode: str, source: str, spin: str) -> None:
    """The fault path copies from the file mapping by default and from a pread
    buffer with the `pread-fault` knob; a fault thread may poll for the next
    event (`--fault-spin-us`) or block at once.  Every combination restores
    the same bytes, each page placed once, with 2 touchers and 2 fault threads."""
    path, content = small
    res = _load(path, build, source, "--mode", mode, "--access", "random", "--threads", "2",
                "--fault-threads", "2", "--fault-spin-us", spin, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    st = out["stats"]
    assert out["blocks"][0]["sha256"] == hashlib.sha256(content).hexdigest()
    assert st["pages_loaded"] == st["total_pages"] == 512 and st["double_loads"] == 0
    assert st["fault_source"] == ("pread" if source else "mmap")
    assert st["fault_spin_us"] == int(spin)
    if mode == "fault-only":  # lazy: the eager thread may place 2 MiB before any fault
        assert st["faults"] > 0 and st["fault_stages_us"]["copy"]["count"] > 0
