"""Marker syntax: ``qemu_defect(affected=...)`` accepts the forms people write,
misuse is one usage error naming the marker and the test, and skips point at
the test that was skipped."""

from __future__ import annotations

import pytest

from pytest_fastsnap.markers import SpecError, version_matches

V10_0_2 = (10, 0, 2)


@pytest.mark.parametrize("spec", [
    "10.0", "10.0.*", "==10.0", "<=10.0", ">=10.0", "10", "10.0.2", ">=9.2,<10.1",
    "<10.1", ">9.2", " >= 10.0 , < 10.0.3 ", "!=10.1", ["9.2", "10.0.*"], ("<9", ">=10.0.1"),
])
def test_specs_that_match_10_0_2(spec: str | list[str]) -> None:
    assert version_matches(V10_0_2, spec)


@pytest.mark.parametrize("spec", [
    "10.1", "10.0.1", "<10.0", ">10.0", "<=9.2", ">=10.1", "10.1.*", ">=9.2,<10.0",
    "!=10.0", ["9.2", "10.1.*"],
])
def test_specs_that_do_not_match_10_0_2(spec: str | list[str]) -> None:
    assert not version_matches(V10_0_2, spec)


@pytest.mark.parametrize("spec", ["", "ten", "10.0,", "~=10.0", "10.0.0.1", "=>10", [], [1],
                                  10.0, None])
def test_bad_specs_are_refused(spec: object) -> None:
    with pytest.raises(SpecError):
        version_matches(V10_0_2, spec)  # type: ignore[arg-type]


@pytest.mark.parametrize(("marker", "problem"), [
    ('qemu_defect(reason="r")', "needs affected="),
    ('qemu_defect(affected="10.0")', "needs reason="),
    ("qemu_defect()", "needs affected= and reason="),
    ('qemu_defect(affected="ten", reason="r")', "affected='ten': bad version clause 'ten'"),
    ('qemu_defect("10.0", reason="r")', "takes keyword arguments only"),
    ('qemu_defect(affected="10.0", reason="r", fixed="10.1")', "unknown argument(s) fixed"),
    ('qemu_version(min="nine")', "qemu_version min='nine' is not a version"),
])
def test_misused_marker_is_a_collection_error(pytester: pytest.Pytester, marker: str,
                                             problem: str) -> None:
    """Without --fastsnap too: a misused marker stops the run at collection."""
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.{marker}
        def test_marked():
            pass
        """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([
        "*ERROR collecting test_misused_marker_is_a_collection_error.py*",
        "fastsnap: bad marker arguments:",
        f"test_misused_marker_is_a_collection_error.py::test_marked: @pytest.mark.*{problem}*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert "KeyError" not in result.stdout.str() + result.stderr.str()


def test_misused_marker_under_xdist(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest
        class TestX:
            @pytest.mark.parametrize("x", [1, pytest.param(
                2, marks=pytest.mark.qemu_defect(affected="<=10.0"))])
            def test_param(self, x):
                pass
        """)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "fastsnap: bad marker arguments:",
        "*::TestX::test_param?2?: @pytest.mark.qemu_defect needs reason=*"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_skips_without_fastsnap_point_at_each_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest
        def test_uses_vm(vm_factory):
            pass
        @pytest.mark.fastsnap
        def test_marked():
            pass
        """)
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines([
        "SKIPPED ?1? test_skips_without_fastsnap_point_at_each_test.py:2: test_uses_vm "
        "boots QEMU: pass --fastsnap*",
        "SKIPPED ?1? test_skips_without_fastsnap_point_at_each_test.py:4: test_marked "
        "boots QEMU: pass --fastsnap*"], consecutive=False)
    result.stdout.no_fnmatch_line("SKIPPED*pytest_fastsnap*")


@pytest.mark.fastsnap
class TestWithQemu:
    def test_bare_series_version_xfails_on_the_running_qemu(
            self, pytester: pytest.Pytester, qemu_probe: object) -> None:
        """``affected="X.Y"`` and ``"<=X.Y"`` cover the running X.Y.Z: strict
        xfail, not a plain failure."""
        major, minor = qemu_probe.version[:2]  # type: ignore[attr-defined]
        pytester.makepyfile(f"""
            import pytest
            @pytest.mark.qemu_defect(affected="{major}.{minor}", reason="series")
            def test_series():
                assert False
            @pytest.mark.qemu_defect(affected="<={major}.{minor}", reason="up to")
            def test_up_to():
                assert False
            @pytest.mark.qemu_defect(affected=["1.0", "{major}.{minor}.*"], reason="list")
            def test_list():
                assert False
            """)
        # The inner run must test the same binary (.ci/run's cells pass --qemu-binary).
        result = pytester.runpytest_subprocess(
            "--fastsnap", "-p", "no:cacheprovider",
            f"--qemu-binary={qemu_probe.binary}")  # type: ignore[attr-defined]
        result.assert_outcomes(xfailed=3)

    def test_feature_skips_point_at_each_test(self, pytester: pytest.Pytester) -> None:
        """-rs shows each test's own location and name, not the plugin's line,
        and two tests with the same missing feature are two lines."""
        pytester.makepyfile("""
            import pytest
            @pytest.mark.qemu_feature("no-such-capability")
            def test_one():
                pass
            @pytest.mark.qemu_feature("no-such-capability")
            def test_two():
                pass
            """)
        result = pytester.runpytest_subprocess("--fastsnap", "-rs", "-p", "no:cacheprovider")
        result.assert_outcomes(skipped=2)
        result.stdout.fnmatch_lines([
            "SKIPPED ?1? test_feature_skips_point_at_each_test.py:2: test_one needs "
            "'no-such-capability': * lacks it",
            "SKIPPED ?1? test_feature_skips_point_at_each_test.py:5: test_two needs "
            "'no-such-capability': * lacks it"])
        result.stdout.no_fnmatch_line("*markers.py*")


def test_kvm_skip_inside_a_test_points_at_the_test(pytester: pytest.Pytester) -> None:
    """vm_factory(accel="kvm") on a host without KVM skips at the test, not in fixtures.py."""
    pytester.makepyfile("""
        from types import SimpleNamespace
        from pytest_fastsnap.fixtures import VmFactory

        def test_wants_kvm(tmp_path):
            probe = SimpleNamespace(kvm_usable=False, kvm_reason="/dev/kvm: No such file",
                                    binary="qemu-system-x86_64")
            VmFactory(None, "tcg", tmp_path, probe, probe, [], None)(accel="kvm")
        """)
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines([
        "SKIPPED ?1? test_kvm_skip_inside_a_test_points_at_the_test.py:4: accel='kvm' asked "
        "for, but KVM is not usable: /dev/kvm: No such file"])
