"""Versioned machine types: which type every guest uses when two binaries take
part (chosen from query-machines), and --fastsnap-machine."""

from __future__ import annotations

import dataclasses

import pytest

from pytest_fastsnap.qemu.machine_types import (
    MachineTypeError,
    choose_machine_types,
    parse_override,
)
from pytest_fastsnap.qemu.probe import QemuProbe

FASTSNAP = "--fastsnap"


def _probe(binary: str, version: tuple[int, int, int], newest: str) -> QemuProbe:
    """A probe of a binary whose aliases resolve to the *newest* (e.g. "10.2") types."""
    known = ("9.2", "10.0", "10.1", "10.2")
    names = [f"{family}-{v}" for family in ("pc-q35", "pc-i440fx") for v in known
             if tuple(map(int, v.split("."))) <= tuple(map(int, newest.split(".")))]
    return QemuProbe(binary=binary, version=version, version_text="", capabilities=(),
                     parameters=(), kvm_usable=False, kvm_reason="", nested=True,
                     uffd_usable=True, uffd_reason="", fast_load=False, fast_load_reason="",
                     machines=(*names, "microvm", "q35", "pc"),
                     machine_aliases=(("pc", f"pc-i440fx-{newest}"), ("q35", f"pc-q35-{newest}")))


OLD = _probe("/old/qemu", (10, 0, 2), "10.0")
NEW = _probe("/new/qemu", (10, 2, 2), "10.2")


@pytest.mark.parametrize(("src", "dst"), [(OLD, NEW), (NEW, OLD)])
def test_cross_version_pins_the_older_binarys_types(src: QemuProbe, dst: QemuProbe) -> None:
    types = choose_machine_types(src, dst, None)
    assert types.pinned == {"q35": "pc-q35-10.0", "pc": "pc-i440fx-10.0"}
    assert types.resolve("q35") == "pc-q35-10.0"
    assert types.resolve("microvm") == "microvm"
    assert "10.0.2" in types.describe()


def test_one_binary_keeps_the_aliases() -> None:
    types = choose_machine_types(NEW, NEW, None)
    assert types.pinned == {}
    assert types.resolve("q35") == "q35"


def test_override_wins_and_is_checked_against_both_binaries() -> None:
    types = choose_machine_types(NEW, OLD, "pc-q35-9.2")
    assert types.pinned == {"q35": "pc-q35-9.2", "pc": "pc-i440fx-10.0"}
    with pytest.raises(MachineTypeError, match=r"pc-q35-10.2 is not a machine type of "
                                               r"/old/qemu \(10.0.2\)"):
        choose_machine_types(NEW, OLD, "pc-q35-10.2")


def test_older_binary_without_a_common_type_is_refused() -> None:
    odd = dataclasses.replace(OLD, machine_aliases=(("pc", "pc-i440fx-10.0"),
                                                    ("q35", "pc-q35-8.0")))
    with pytest.raises(MachineTypeError, match=r"resolves it to pc-q35-8\.0, which /new/qemu"):
        choose_machine_types(odd, NEW, None)


@pytest.mark.parametrize(("text", "want"), [
    ("pc-q35-10.0", {"q35": "pc-q35-10.0"}),
    ("q35=pc-q35-10.0, pc=pc-i440fx-9.2", {"q35": "pc-q35-10.0", "pc": "pc-i440fx-9.2"}),
])
def test_override_syntax(text: str, want: dict[str, str]) -> None:
    assert parse_override(text) == want


@pytest.mark.parametrize("text", ["microvm", "q35", "pc=pc-q35-10.0", "virt=virt-10.0"])
def test_override_must_name_a_versioned_q35_or_pc_type(text: str) -> None:
    with pytest.raises(MachineTypeError, match="is not a versioned type of q35 or pc"):
        parse_override(text)


@pytest.mark.fastsnap
class TestWithQemu:
    def test_pinned_type_reaches_the_snapshot(self, pytester: pytest.Pytester) -> None:
        """--fastsnap-machine: the header names it, and the configuration record
        of a snapshot of a vm_factory(machine="q35") guest carries it."""
        pytester.makepyfile(
            """
            from pytest_fastsnap.snapshot.format import parse
            def test_saved_type(vm_factory, snapshot_factory):
                vm = vm_factory(machine="q35")
                snap = snapshot_factory(vm)
                assert parse(snap.path).machine == "pc-q35-9.2"
            """)
        result = pytester.runpytest_subprocess(FASTSNAP, "-p", "no:randomly",
                                               "--fastsnap-machine=pc-q35-9.2")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["fastsnap: machine types q35 -> pc-q35-9.2 "
                                     "(--fastsnap-machine)"])

    def test_unknown_type_is_a_usage_error(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile("def test_x(): pass")
        result = pytester.runpytest_subprocess(FASTSNAP, "--fastsnap-machine=pc-q35-1.0")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*--fastsnap-machine: pc-q35-1.0 is not a machine type "
                                     "of *qemu-system-x86_64 (*)*"])

    def test_env_var_sets_it(self, pytester: pytest.Pytester,
                             monkeypatch: pytest.MonkeyPatch) -> None:
        pytester.makepyfile("def test_x(): pass")
        monkeypatch.setenv("FASTSNAP_MACHINE", "q35=pc-q35-9.2")
        result = pytester.runpytest_subprocess(FASTSNAP)
        result.stdout.fnmatch_lines(["fastsnap: machine types q35 -> pc-q35-9.2 *"])
