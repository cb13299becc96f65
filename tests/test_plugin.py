"""Self-tests of the plugin itself: options, inertness, skips, reports, cleanup, xdist."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

FASTSNAP = "--fastsnap"


def _qemu_pids(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*-name {marker}"], capture_output=True,
                         text=True, check=False).stdout
    return [int(p) for p in out.split()]


def test_help_lists_options_in_their_group(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*QEMU mapped-ram snapshots and fast snapshot load*"])
    for flag in ("--fastsnap ", "--qemu-binary=", "--qemu-binary-dst=", "--fastsnap-accel=",
                 "--fastsnap-mem=", "--fastsnap-keep-artifacts", "--fastsnap-artifacts-dir="):
        result.stdout.fnmatch_lines([f"*{flag}*"])
    result.stdout.fnmatch_lines(["*fastsnap_qemu_binary (string)*"])


def test_inert_without_flag(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        def test_plain():
            assert 1 + 1 == 2
        def test_needs_qemu(vm_factory):
            raise AssertionError("must not run without --fastsnap")
        @pytest.mark.fastsnap
        def test_marked():
            raise AssertionError("must not run without --fastsnap")
        """)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*boots QEMU: pass --fastsnap*"])
    result.stdout.no_fnmatch_line("fastsnap: QEMU*")


def test_bad_accel_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(FASTSNAP, "-p", "no:cacheprovider",
                                "-o", "fastsnap_accel=warp")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*must be auto, kvm or tcg, not 'warp'*"])


def test_missing_binary_names_the_problem(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(FASTSNAP, "--qemu-binary=/nonexistent/qemu-system-x86_64")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*QEMU binary not found: '/nonexistent/qemu-system-x86_64'*"])


def test_env_var_and_ini_resolution(pytester: pytest.Pytester,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\nfastsnap_mem = 48M\nfastsnap_accel = kvm\n")
    pytester.makepyfile(
        """
        def test_cfg(pytestconfig):
            from pytest_fastsnap.plugin_state import CONFIG_KEY
            cfg = pytestconfig.stash[CONFIG_KEY]
            assert (cfg.mem, cfg.accel, cfg.enabled) == ("48M", "tcg", False)
        """)
    monkeypatch.setenv("FASTSNAP_ACCEL", "tcg")  # env beats ini
    pytester.runpytest().assert_outcomes(passed=1)


@pytest.mark.fastsnap
class TestWithQemu:
    def test_report_header(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile("def test_x(): pass")
        result = pytester.runpytest_subprocess(FASTSNAP, "--fastsnap-accel=tcg")
        result.stdout.fnmatch_lines([
            "fastsnap: QEMU * (QEMU emulator version *)",
            "fastsnap: accelerator tcg: requested",
            "fastsnap: userfaultfd *",
            "fastsnap: mapped-ram supported",
            "fastsnap: fast snapshot load (postcopy-ram + mapped-ram) *",
        ])

    def test_skip_reasons_name_what_is_missing(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(
            """
            import pytest
            @pytest.mark.qemu_feature("no-such-capability")
            def test_feature(qemu_probe): pass
            @pytest.mark.qemu_version(min="99.0")
            def test_version(qemu_probe): pass
            """)
        result = pytester.runpytest_subprocess(FASTSNAP, "-rs")
        result.assert_outcomes(skipped=2)
        result.stdout.fnmatch_lines(["*test_feature needs 'no-such-capability': * lacks it*",
                                     "*test_version needs QEMU >= 99.0; * is *"])

    def test_defect_marker_is_strict_xfail(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(
            """
            import pytest
            defect = pytest.mark.qemu_defect(affected=">=1.0", fixed_in="never",
                                             reason="demo defect")
            @defect
            def test_still_broken(qemu_probe):
                assert False
            @defect
            def test_fixed_now(qemu_probe):
                pass
            @pytest.mark.qemu_defect(affected="<1.0", fixed_in="1.0", reason="old")
            def test_not_affected(qemu_probe):
                pass
            """)
        result = pytester.runpytest_subprocess(FASTSNAP, "-rxXf")
        result.assert_outcomes(xfailed=1, failed=1, passed=1)
        result.stdout.fnmatch_lines(["*XPASS(strict)*demo defect*",
                                     "*known QEMU defects reproduced*",
                                     "QEMU *: demo defect (fix: never)*"])

    def test_failure_report_has_qemu_sections(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(
            """
            def test_fails(vm_factory):
                vm = vm_factory(name="reported")
                vm.qmp("query-status")
                assert False, "deliberate"
            """)
        result = pytester.runpytest_subprocess(FASTSNAP)
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["*Captured qemu reported (still running) log call*",
                                     "*-name reported*",
                                     "*Captured qemu reported qmp call*",
                                     "*-> query-status*"])

    def test_keep_artifacts_of_failed_tests(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(
            """
            def test_fails(vm_factory, snapshot_factory):
                vm = vm_factory(name="kept")
                snapshot_factory(vm)
                assert False
            def test_passes(vm_factory):
                vm_factory(name="notkept")
            """)
        out = pytester.path / "arts"
        result = pytester.runpytest_subprocess(FASTSNAP, "--fastsnap-keep-artifacts",
                                               f"--fastsnap-artifacts-dir={out}")
        result.assert_outcomes(failed=1, passed=1)
        kept = list(out.iterdir())
        assert [p.name for p in kept] == ["test_keep_artifacts_of_failed_tests.py_test_fails"]
        assert (kept[0] / "kept.log").exists() and (kept[0] / "snap1.img").exists()
        result.stdout.fnmatch_lines(["*artifacts of failed tests*",
                                     f"*::test_fails: {kept[0]}"])

    def test_no_leak_after_failure(self, pytester: pytest.Pytester) -> None:
        marker = f"leak{uuid.uuid4().hex[:8]}"
        pytester.makepyfile(
            f"""
            def test_fails(vm_factory):
                vm_factory(name="{marker}")
                vm_factory(name="{marker}", incoming="defer")
                raise RuntimeError("boom")
            """)
        before = set(os.listdir("/tmp"))
        pytester.runpytest_subprocess(FASTSNAP).assert_outcomes(failed=1)
        assert _qemu_pids(marker) == []
        # Directories of sessions still running (other xdist workers' pytester
        # runs, other users) are not ours; a leak is one whose pytest is gone.
        new = set(os.listdir("/tmp")) - before
        sessions = [re.fullmatch(r"fastsnap-.+-(\d+)-[^-]+", n) for n in new]
        assert [m[0] for m in sessions if m and not Path(f"/proc/{m[1]}").exists()] == []

    @pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
    def test_no_leak_after_interrupt(self, pytester: pytest.Pytester, sig: signal.Signals
                                     ) -> None:
        """Ctrl-C runs the plugin's cleanup; a SIGKILLed pytest takes QEMU
        with it through PR_SET_PDEATHSIG."""
        marker = f"intr{uuid.uuid4().hex[:8]}"
        flag = pytester.path / "started"
        pytester.makepyfile(
            f"""
            import pathlib, time
            def test_hangs(vm_factory):
                vm_factory(name="{marker}")
                pathlib.Path({str(flag)!r}).write_text("x")
                time.sleep(120)
            """)
        proc = subprocess.Popen([sys.executable, "-m", "pytest", FASTSNAP, "-p", "pytester"],
                                cwd=pytester.path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not flag.exists():
                assert proc.poll() is None and time.monotonic() < deadline, "test never started"
                time.sleep(0.1)
            assert len(_qemu_pids(marker)) == 1
            proc.send_signal(sig)
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 10
        while _qemu_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _qemu_pids(marker) == []
        # Ctrl-C removes the session directory.  A SIGKILLed pytest cannot; the
        # next session (maybe a concurrent one, under xdist) sweeps it, since
        # its pid is in the name and that pid is gone.
        if sig == signal.SIGINT:
            assert list(Path("/tmp").glob(f"fastsnap-main-{proc.pid}-*")) == []
        from pytest_fastsnap.workdirs import sweep_stale

        sweep_stale()
        assert list(Path("/tmp").glob(f"fastsnap-main-{proc.pid}-*")) == []

    def test_destination_binary(self, pytester: pytest.Pytester, tmp_path: Path) -> None:
        """--qemu-binary-dst makes every destination that binary (cross-version runs)."""
        import shutil

        dst = tmp_path / "qemu-dst"
        dst.symlink_to(shutil.which("qemu-system-x86_64"))  # type: ignore[arg-type]
        pytester.makepyfile(
            f"""
            def test_dst(vm_factory, snapshot_factory, restore_precopy):
                src = vm_factory()
                snap = snapshot_factory(src)
                dst = restore_precopy(snap)
                assert dst.binary == {str(dst)!r} != src.binary
                assert dst.status() == "paused"
            """)
        result = pytester.runpytest_subprocess(FASTSNAP, f"--qemu-binary-dst={dst}")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"fastsnap: destination QEMU {dst} (*"])

    def test_xdist_two_workers(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(
            """
            import os, pytest
            @pytest.mark.parametrize("i", range(4))
            def test_vm(vm_factory, fastsnap_workdir, i):
                vm = vm_factory()
                assert vm.status() == "running"
                assert os.environ["PYTEST_XDIST_WORKER"] in str(fastsnap_workdir)
            """)
        result = pytester.runpytest_subprocess(FASTSNAP, "-n", "2")
        result.assert_outcomes(passed=4)
        result.stdout.fnmatch_lines(["*2 workers*"])


def test_socket_path_limit_is_checked(tmp_path: Path) -> None:
    from pytest_fastsnap.workdirs import socket_path

    with pytest.raises(ValueError, match="over the 107-byte sun_path limit"):
        socket_path(tmp_path / ("d" * 120), "s.sock")
    assert socket_path(Path("/tmp"), "s.sock") == Path("/tmp/s.sock")
