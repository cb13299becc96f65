"""Plugin options: bad values are one usage error at start-up naming the option
and where its value came from; nothing bites without --fastsnap except values
that decide whether it is on; --fastsnap-mem sizes the guests it says it does."""

from __future__ import annotations

import pytest

NO_CACHE = ("-p", "no:cacheprovider")


def _usage_error(result: pytest.RunResult, *lines: str) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(list(lines))
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text and "qemu.qmp" not in text
    assert len([ln for ln in result.stderr.lines if ln.strip()]) == 1, result.stderr.lines


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--fastsnap-mem=garbage"], {},
     "ERROR: fastsnap: --fastsnap-mem='garbage': not a memory size like 64M or 1G: 'garbage'"),
    ([], {"FASTSNAP_MEM": "8M"},
     "ERROR: fastsnap: FASTSNAP_MEM (environment)='8M': at least 16M is needed"),
    ([], {"FASTSNAP_ACCEL": "bogus"},
     "ERROR: fastsnap: FASTSNAP_ACCEL (environment)='bogus': must be auto, kvm or tcg, "
     "not 'bogus'"),
    (["--qemu-binary-dst=/nonexistent"], {},
     "ERROR: fastsnap: --qemu-binary-dst='/nonexistent': QEMU binary not found: "
     "'/nonexistent' (not an executable file, nor a name on PATH)"),
    (["--qemu-binary="], {},
     "ERROR: fastsnap: --qemu-binary='': empty: name a QEMU binary (a path or a name on "
     "PATH), or leave the option out for qemu-system-x86_64 on PATH"),
    (["--qemu-binary-dst="], {}, "ERROR: fastsnap: --qemu-binary-dst='': empty:*"),
    (["--fastsnap-artifacts-dir="], {}, "ERROR: fastsnap: --fastsnap-artifacts-dir='': empty*"),
    (["--qemu-binary-dst=/bin/true"], {},
     "ERROR: fastsnap: --qemu-binary-dst: QEMU binary /bin/true: --version printed no QEMU*"),
], ids=["mem-garbage", "mem-too-small", "accel-env", "dst-missing", "binary-empty",
        "dst-empty", "artifacts-empty", "dst-not-qemu"])
def test_bad_value_is_one_usage_error(pytester: pytest.Pytester,
                                      monkeypatch: pytest.MonkeyPatch, args: list[str],
                                      env: dict[str, str], message: str) -> None:
    pytester.makepyfile("def test_x(vm_factory): vm_factory()")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _usage_error(pytester.runpytest("--fastsnap", *NO_CACHE, *args), message)


@pytest.mark.parametrize("name", ["FASTSNAP", "FASTSNAP_KEEP_ARTIFACTS"])
def test_non_boolean_switch_is_refused(pytester: pytest.Pytester,
                                       monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``FASTSNAP=maybe`` used to mean off, silently."""
    pytester.makepyfile("def test_x(): pass")
    monkeypatch.setenv(name, "maybe")
    _usage_error(pytester.runpytest(*NO_CACHE),
                 f"ERROR: fastsnap: {name} (environment)='maybe' is not a boolean: use "
                 "1/0, true/false, yes/no or on/off")


@pytest.mark.parametrize("value", ["0", "no", "off", "FALSE"])
def test_boolean_off_values(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                            value: str) -> None:
    pytester.makepyfile("def test_x(fastsnap_config): pass")
    monkeypatch.setenv("FASTSNAP", value)
    pytester.runpytest(*NO_CACHE).assert_outcomes(skipped=1)


def test_values_are_not_checked_without_fastsnap(pytester: pytest.Pytester,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin is inert without --fastsnap: a stray FASTSNAP_ACCEL, FASTSNAP_MEM
    or --qemu-binary must not break another project's test run."""
    pytester.makepyfile("def test_plain(): pass")
    monkeypatch.setenv("FASTSNAP_ACCEL", "bogus")
    monkeypatch.setenv("FASTSNAP_MEM", "garbage")
    result = pytester.runpytest(*NO_CACHE, "--qemu-binary=/nonexistent")
    result.assert_outcomes(passed=1)


@pytest.mark.fastsnap
def test_fastsnap_mem_sizes_the_test_guests(pytester: pytest.Pytester) -> None:
    """--fastsnap-mem is the RAM of vm_factory's machines and of the tiny guest;
    a size below the tiny guest's 22M shrinks its pattern range to fit."""
    pytester.makepyfile("""
        def _mem(vm):
            return vm.qmp("query-memory-size-summary")["base-memory"] >> 20

        def test_sizes(vm_factory, guest_factory, pytestconfig):
            assert _mem(vm_factory()) == 48
            tiny = guest_factory("tiny")
            assert _mem(tiny.vm) == 48 and tiny.params.size == 16 << 20
            assert tiny.self_check()
            assert _mem(guest_factory("tiny", mem="30M").vm) == 30

        def test_guest_fixture(guest):
            assert _mem(guest.vm) == 48
        """)
    result = pytester.runpytest_subprocess("--fastsnap", "--fastsnap-mem=48M", *NO_CACHE)
    result.assert_outcomes(passed=2)
    pytester.makepyfile(test_small="""
        def test_small(guest):
            assert guest.vm.qmp("query-memory-size-summary")["base-memory"] == 16 << 20
            assert guest.params.end <= (14 << 20) and guest.self_check()
        """)
    result = pytester.runpytest_subprocess("--fastsnap", "--fastsnap-mem=16M", *NO_CACHE,
                                           "test_small.py")
    result.assert_outcomes(passed=1)
