"""Verdicts cannot pass by mistake: ``assert <verdict>`` fails exactly when the
check failed, for every verdict-returning API, and the failure says what failed.

The guests' agents are driven through a scripted console here (what a real
guest prints is in the tiny/Linux protocols); tests/test_guests.py does the
same against a real restored guest with a corrupted page.
"""

from __future__ import annotations

import pytest

from pytest_fastsnap.verdict import Verdict, VerdictFailed

# Each case builds a verdict with one API; ``bad`` selects the failing input.
CASES = '''
import re
import pytest
from pytest_fastsnap.fixtures import Guest
from pytest_fastsnap.guests.agent import check_verdict
from pytest_fastsnap.guests.linux import LinuxGuest
from pytest_fastsnap.guests.pattern import PAGE_SIZE, check_range, expected_range, page_is_zero
from pytest_fastsnap.guests.tiny import TinyGuest, TinyParams, tiny_args
from pytest_fastsnap.restore.strategies import RestoredGuest
from pytest_fastsnap.verdict import Verdict

PARAMS = TinyParams(seed=3, start=0x400000, size=64 * PAGE_SIZE)
BAD_PFN = next(p for p in range(PARAMS.first_pfn + 7, PARAMS.first_pfn + 64)
               if not page_is_zero(PARAMS, p))
TINY_FAIL = (f"CHECK FAIL page={BAD_PFN} addr={BAD_PFN * PAGE_SIZE:#x} why=content gen=0 "
             "want=0")


class Console:
    """Answers every command with one scripted line, as the guest would."""

    def __init__(self, reply):
        self.reply, self.text = reply, ""

    def mark(self):
        return len(self.text)

    def write(self, data):
        self.text += self.reply + "\\r\\n"

    def read_until(self, pattern, timeout=0, since=0):
        assert re.search(pattern, self.text[since:]), (pattern, self.text)
        return self.text[since:]


class VM:
    name = "fake"

    def __init__(self, reply="", memory=b""):
        self.console, self.memory = Console(reply), memory
        self.device_args = ["-machine", "microvm", *tiny_args("/c/fastsnap-tiny.elf", PARAMS)]

    def memsave(self, addr, size):
        return self.memory

    def status(self):
        return "running"


def memory(bad):
    data = bytearray(expected_range(PARAMS, PARAMS.start, PARAMS.size))
    if bad:
        data[(BAD_PFN - PARAMS.first_pfn) * PAGE_SIZE + 40] ^= 1
    return bytes(data)


def verdict(api, bad):
    tiny_line = TINY_FAIL if bad else "CHECK OK pages=64 gen=0"
    if api == "Verdict":
        return Verdict.fail("checked X: wrong") if bad else Verdict.pass_("checked X")
    if api == "check_verdict":
        return check_verdict(tiny_line, "fake")
    if api == "check_range":
        return check_range(PARAMS, memory(bad), PARAMS.start)
    if api == "TinyGuest.self_check":
        return TinyGuest(VM(tiny_line), PARAMS).self_check()
    if api == "TinyGuest.host_check":
        return TinyGuest(VM(memory=memory(bad)), PARAMS).host_check()
    if api == "LinuxGuest.self_check":
        line = f"CHECK FAIL page={BAD_PFN} gen=2" if bad else "CHECK OK pages=8192"
        return LinuxGuest(VM(line)).self_check()
    if api == "Guest.self_check":
        vm = VM(tiny_line)
        return Guest("tiny", vm, TinyGuest(vm, PARAMS), PARAMS).self_check()
    if api == "RestoredGuest.self_check":
        return RestoredGuest("qemu-precopy", VM(tiny_line), 0.0, 0, False, 0.0).self_check()
    raise AssertionError(api)


APIS = ["Verdict", "check_verdict", "check_range", "TinyGuest.self_check",
        "TinyGuest.host_check", "LinuxGuest.self_check", "Guest.self_check",
        "RestoredGuest.self_check"]


@pytest.mark.parametrize("api", APIS)
def test_failed(api):
    assert verdict(api, bad=True)


@pytest.mark.parametrize("api", APIS)
def test_passed(api):
    assert verdict(api, bad=False)
'''

APIS = 8


def test_assert_fails_for_every_failed_verdict(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_cases=CASES)
    result = pytester.runpytest("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=APIS, passed=APIS)
    out = result.stdout.str()
    # Every failure names what failed: the page and, where the check knows it, its address.
    assert out.count("FAILED test_cases.py::test_failed[") == APIS
    assert "FAILED test_cases.py::test_passed" not in out
    result.stdout.fnmatch_lines([
        "*assert <Verdict FAIL: checked X: wrong>*",
        "*assert <Verdict FAIL: fake: self-check failed at page * (gpa 0x*): why=content*",
        "*assert <Verdict FAIL: pattern check failed at page * (gpa 0x*): content*",
        "*assert <Verdict FAIL: fake: pattern check failed at page * (gpa 0x*): content*",
        "*assert <Verdict FAIL: fake: self-check failed at page *: gen=2>*",
    ])


def test_verdict_is_not_a_sequence_and_raises_on_request() -> None:
    bad = Verdict.fail("self-check failed at page 1031 (gpa 0x407000)", page=1031)
    assert not bad and str(bad) == "self-check failed at page 1031 (gpa 0x407000)"
    assert repr(bad) == "<Verdict FAIL: self-check failed at page 1031 (gpa 0x407000)>"
    with pytest.raises(TypeError):
        len(bad)  # type: ignore[arg-type]
    with pytest.raises(VerdictFailed, match=r"page 1031 \(gpa 0x407000\)") as info:
        bad.raise_for_failure()
    assert isinstance(info.value, AssertionError) and info.value.verdict is bad
    good = Verdict.pass_("fine")
    assert good.raise_for_failure() is good
