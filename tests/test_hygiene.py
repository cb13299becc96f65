"""Nothing leaks and teardown goes on after a failure: the child registry holds
children their caller dropped, spawning calls nothing unsafe after fork, the
factory owns the loader and socket directory a restore made, the stale sweep
knows every directory pattern we create, and no teardown step stops the rest."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from pytest_fastsnap.fixtures import TeardownError, VmFactory
from pytest_fastsnap.qemu import process
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.workdirs import NAMESPACE_MARKER, kill_namespace, mount_namespace, sweep_stale


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _python(script: str, timeout: float = 60) -> str:
    """Run *script* in a fresh interpreter (its own child registry); its stdout."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                         text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_registry_keeps_children_whose_popen_was_dropped() -> None:
    """kill_all finds a child its caller dropped.  (With the old WeakSet this
    held only because CPython's Popen.__del__ parks a still-running child in
    subprocess._active, keeping the weak reference alive; the registry no
    longer depends on that.)"""
    out = _python("""
        import gc
        from pytest_fastsnap.qemu import process
        pid = process.spawn(["sleep", "60"]).pid   # the Popen is dropped at once
        gc.collect()
        print(pid, process.kill_all())
        """)
    pid, killed = map(int, out.split())
    assert killed == 1
    assert not _alive(pid)


def test_spawn_resolves_prctl_before_fork_and_dies_with_its_parent(tmp_path: Path) -> None:
    """No dlopen between fork and exec (ctypes.CDLL broken after import must not
    matter), and PR_SET_PDEATHSIG still takes the child down with a SIGKILLed parent."""
    pidfile = tmp_path / "pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import ctypes, os, pathlib, signal, time
        from pytest_fastsnap.qemu import process
        def no_dlopen(*args, **kwargs):
            raise RuntimeError("dlopen after fork")
        ctypes.CDLL = no_dlopen
        assert process.spawn(["true"]).wait(10) == 0
        child = process.spawn(["sleep", "60"])
        pathlib.Path({str(pidfile)!r}).write_text(str(child.pid))
        time.sleep(60)
        """)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists():
            assert parent.poll() is None, parent.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert _alive(child)
    finally:
        parent.kill()
        parent.wait()
        parent.stderr.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_machine_shutdown_never_raises(tmp_path: Path) -> None:
    """A child that will not be reaped (stuck in the kernel) makes shutdown
    record the problem, not raise it into the teardown of every other machine."""
    vm = QemuMachine("qemu-system-x86_64", tmp_path, name="stuck")
    proc = process.spawn(["sleep", "60"])
    real_wait = proc.wait

    def never_reaped(timeout: float | None = None) -> int:
        raise subprocess.TimeoutExpired(proc.args, timeout or 0)

    proc.wait = never_reaped  # type: ignore[method-assign]
    vm._proc = proc
    try:
        assert vm.shutdown(timeout=0.1) is None
        assert vm.kill() is None
        assert [e.split(":")[0] for e in vm.shutdown_errors] == ["killing QEMU"] * 3
        assert "shutdown: killing QEMU: TimeoutExpired" in "".join(vm.report().values())
    finally:
        proc.wait = real_wait  # type: ignore[method-assign]
        process.kill(proc)


class _Part:
    """Stands in for a machine or an owned resource; *fails* makes it raise."""

    def __init__(self, name: str, log: list[str], fails: bool = False) -> None:
        self.name, self.log, self.fails = name, log, fails
        self.shutdown_errors: list[str] = []

    def _stop(self) -> None:
        self.log.append(self.name)
        if self.fails:
            raise RuntimeError(f"{self.name} broke")

    shutdown = close = _stop

    def is_running(self) -> bool:
        return False

    def __repr__(self) -> str:
        return self.name


def test_shutdown_all_runs_every_step_and_reports_all_failures() -> None:
    log: list[str] = []
    machines = [_Part("vm1", log), _Part("vm2", log, fails=True), _Part("vm3", log)]
    factory = VmFactory(None, "tcg", Path("/nonexistent"), None, None,  # type: ignore[arg-type]
                        machines, None)  # type: ignore[arg-type]
    factory.own(_Part("loader", log, fails=True))
    with pytest.raises(TeardownError) as failed:
        factory.shutdown_all()
    assert log == ["loader", "vm3", "vm2", "vm1"]
    assert "closing loader: RuntimeError('loader broke')" in str(failed.value)
    assert "stopping vm2: RuntimeError('vm2 broke')" in str(failed.value)


def test_sweep_knows_bridge_socket_directories() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(tempfile.mkdtemp(prefix=f"fsb-{dead.pid}-", dir="/tmp"))
    mine = Path(tempfile.mkdtemp(prefix=f"fsb-{os.getpid()}-", dir="/tmp"))
    try:
        removed = sweep_stale()
        assert stale in removed and not stale.exists()
        assert mine.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(mine, ignore_errors=True)


def test_suites_conftest_marks_only_the_suites_directory(pytester: pytest.Pytester) -> None:
    """A checkout that lives under some .../suites/... directory: its self-tests
    stay self-tests (not QEMU tests skipped without --fastsnap)."""
    conftest = Path(__file__).resolve().parent.parent / "suites" / "conftest.py"
    checkout = pytester.mkdir("suites") / "checkout"
    (checkout / "suites").mkdir(parents=True)
    (checkout / "tests").mkdir()
    shutil.copy(conftest, checkout / "suites" / "conftest.py")
    (checkout / "suites" / "test_suite.py").write_text("def test_in_suite(): pass\n")
    (checkout / "tests" / "test_self.py").write_text("def test_self(): pass\n")
    (checkout / "pytest.ini").write_text("[pytest]\n")
    os.chdir(checkout)
    result = pytester.runpytest("tests", "suites", "-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*test_suite.py*test_in_suite boots QEMU*"])


@pytest.mark.fastsnap
@pytest.mark.requires_uffd
def test_factory_owns_the_loader_and_socket_dir_of_a_restore(pytester: pytest.Pytester
                                                             ) -> None:
    """A test that never closes its bridge restore: the loader and the
    /tmp/fsb-* socket directory are gone when that test ends, not at session end."""
    record = pytester.path / "record"
    pytester.makepyfile(f"""
        import pathlib
        from pytest_fastsnap.restore import restore

        def test_forgets_to_close(guest, snapshot_factory, vm_factory):
            snap = snapshot_factory(guest.vm)
            g = restore("loader-bridge", snap.path, snap.device_args, vm_factory)
            pathlib.Path({str(record)!r}).write_text(f"{{g.loader.pid}} {{g.sock_dir}}")

        def test_next(vm_factory):
            pid, sock_dir = pathlib.Path({str(record)!r}).read_text().split()
            stat = pathlib.Path(f"/proc/{{pid}}/stat")
            assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
            assert not pathlib.Path(sock_dir).exists()
        """)
    result = pytester.runpytest_subprocess("--fastsnap", "-p", "no:randomly", "-p",
                                           "no:cacheprovider")
    result.assert_outcomes(passed=2)
    pid, sock_dir = record.read_text().split()
    assert not _alive(int(pid)) and not Path(sock_dir).exists()


def _in_own_namespace(*script: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "--", "sh", "-c",
                             " && ".join(script)], start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ns = mount_namespace(proc.pid)
        # the namespace counts once the script's mounts are in (mountinfo)
        if ns is not None and ns != mount_namespace(os.getpid()) and \
                Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep":
            return proc, ns
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError("unshare did not start its namespace within 10 s")


def test_sweep_kills_daemons_a_dead_session_left_in_their_namespace() -> None:
    """libvirtd and virtlogd double-fork out of pytest's tree: a SIGKILLed session
    leaves them running, tied to it only by the namespace its marker names. The
    sweep kills that namespace only while it still mounts the session's
    directory: namespace numbers are reused, and a stranger's is left alone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(tempfile.mkdtemp(prefix=f"fastsnap-gw9-{dead.pid}-", dir="/tmp"))
    etc = stale / "libvirt-1" / "etc"
    etc.mkdir(parents=True)
    ours, ns = _in_own_namespace(f"mount --bind {etc} {etc}", "exec sleep 600")
    stranger, other_ns = _in_own_namespace("exec sleep 600")
    try:
        assert kill_namespace(other_ns, stale / "libvirt-1") == []
        assert stranger.poll() is None
        (stale / "libvirt-1" / NAMESPACE_MARKER).write_text(ns)
        removed = sweep_stale()
        assert stale in removed and not stale.exists()
        assert ours.wait(timeout=10) == -signal.SIGKILL
        assert stranger.poll() is None
    finally:
        for proc in (ours, stranger):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(stale, ignore_errors=True)
