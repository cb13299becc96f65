"""Markers of the plugin and their evaluation against the probed binary."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence

import pytest

from pytest_fastsnap.qemu.probe import QemuProbe

MARKERS = (
    "fastsnap: boots QEMU; runs only with --fastsnap",
    "requires_kvm: needs a working KVM accelerator",
    "requires_uffd: needs usable userfaultfd on the host",
    "qemu_version(min=None, max=None): needs a QEMU version in [min, max)",
    "qemu_feature(*names): needs migration capabilities/parameters/features "
    "(e.g. 'mapped-ram', 'fast-snapshot-load') in the binary under test",
    "qemu_defect(affected, reason, fixed_in=None, unless_feature=None): a known QEMU defect; "
    "strict xfail on affected versions (affected=\"10.0\" is every 10.0.x; also \"<=10.0\", "
    "\">=9.2,<10.1\", \"10.0.*\" or a list), so a fixed QEMU shows up as XPASS(strict)",
)


def parse_version(text: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", text)
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in parts[:3]) + (0,) * (3 - min(len(parts), 3))


_OPS: dict[str, Callable[[tuple[int, ...], tuple[int, ...]], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "==": operator.eq, "!=": operator.ne,
}
_CLAUSE = re.compile(r"\s*(<=|>=|==|!=|<|>)?\s*(\d+(?:\.\d+){0,2})(\.\*)?\s*")
VersionSpec = str | Sequence[str]


class SpecError(ValueError):
    """A version spec that is not ``[op]X[.Y[.Z]][.*]`` clauses joined by commas."""


def _clause_matches(version: tuple[int, ...], clause: str) -> bool:
    """One clause, compared on as many components as it gives: ``10.0`` and
    ``10.0.*`` mean the whole 10.0.x series, ``<=10.0`` includes 10.0.2 and
    ``>10.0`` starts at 10.1.0."""
    m = _CLAUSE.fullmatch(clause)
    if not m:
        raise SpecError(f"bad version clause {clause.strip()!r}")
    want = tuple(int(p) for p in m[2].split("."))
    return _OPS[m[1] or "=="](tuple(version)[:len(want)], want)


def version_matches(version: tuple[int, ...], spec: VersionSpec) -> bool:
    """Does *version* satisfy *spec*?

    A spec is clauses joined by commas, all of which must hold
    (``">=9.2,<10.1"``); a list of specs matches when any does
    (``["9.2.*", ">=10.0,<10.0.3"]``).  A clause is ``[op]X[.Y[.Z]][.*]`` with
    op one of ``< <= > >= == !=`` (none means ``==``), compared on the
    components it gives: ``"10.0"``, ``"==10.0"`` and ``"10.0.*"`` match every
    10.0.x; ``"<=10.0"`` matches 10.0.2; ``"10.0.2"`` only 10.0.2.
    """
    if isinstance(spec, str):
        clauses = spec.split(",")
        if not spec.strip() or not all(c.strip() for c in clauses):
            raise SpecError(f"empty clause in version spec {spec!r}")
        return all(_clause_matches(version, c) for c in clauses)
    if not isinstance(spec, list | tuple) or not spec \
            or not all(isinstance(s, str) for s in spec):
        raise SpecError(f"a list of version specs must hold strings, not {spec!r}")
    return any(version_matches(version, s) for s in spec)


def check_defect_marker(mark: pytest.Mark) -> str | None:
    """What is wrong with a ``qemu_defect`` marker's arguments, or None."""
    if mark.args:
        return "takes keyword arguments only (affected=, reason=, fixed_in=, unless_feature=)"
    unknown = set(mark.kwargs) - {"affected", "reason", "fixed_in", "unless_feature"}
    if unknown:
        return f"unknown argument(s) {', '.join(sorted(unknown))}"
    missing = [k for k in ("affected", "reason") if not mark.kwargs.get(k)]
    if missing:
        return (f"needs {' and '.join(k + '=' for k in missing)}: e.g. "
                'qemu_defect(affected="<=10.0", reason="what goes wrong", fixed_in="10.1")')
    if not isinstance(mark.kwargs["reason"], str):
        return "reason= must be a string"
    try:
        version_matches((0, 0, 0), mark.kwargs["affected"])
    except SpecError as err:
        return (f"affected={mark.kwargs['affected']!r}: {err}; write e.g. \"10.0\" (all of "
                "10.0.x), \"<=10.0\", \">=9.2,<10.1\", \"10.0.*\" or a list of those")
    return None


def marker_problems(item: pytest.Item) -> list[str]:
    """What is wrong with *item*'s fastsnap markers, one line each naming the
    test and the marker (empty when all is well)."""
    errors = []
    for mark in item.iter_markers("qemu_defect"):
        problem = check_defect_marker(mark)
        if problem:
            errors.append(f"{item.nodeid}: @pytest.mark.qemu_defect {problem}")
    for mark in item.iter_markers("qemu_version"):
        for key in ("min", "max"):
            value = mark.kwargs.get(key)
            if value is not None and not re.fullmatch(r"\d+(\.\d+){0,2}", str(value)):
                errors.append(f"{item.nodeid}: @pytest.mark.qemu_version {key}={value!r} "
                              "is not a version like 9.2 or 10.0.2")
    return errors


def skip_reason(item: pytest.Item, probe: QemuProbe) -> str | None:
    """Why *item* cannot run on the probed binary (naming the test), or None."""
    name = item.name
    if item.get_closest_marker("requires_kvm") and not probe.kvm_usable:
        return f"{name} needs KVM, not usable here: {probe.kvm_reason}"
    if item.get_closest_marker("requires_uffd") and not probe.uffd_usable:
        return f"{name} needs userfaultfd, not usable here: {probe.uffd_reason}"
    for mark in item.iter_markers("qemu_version"):
        low, high = mark.kwargs.get("min"), mark.kwargs.get("max")
        if low and probe.version < parse_version(low):
            return f"{name} needs QEMU >= {low}; {probe.binary} is {probe.version_str}"
        if high and probe.version >= parse_version(high):
            return f"{name} needs QEMU < {high}; {probe.binary} is {probe.version_str}"
    for mark in item.iter_markers("qemu_feature"):
        for feature in mark.args:
            if not probe.has_feature(feature):
                why = f" ({probe.fast_load_reason})" if feature == "fast-snapshot-load" else ""
                return (f"{name} needs {feature!r}: {probe.binary} ({probe.version_str}) "
                        f"lacks it{why}")
    return None


def apply_markers(item: pytest.Item, probe: QemuProbe) -> None:
    """Mark *item* skipped or strict-xfail according to its markers and the probed
    binary.  Called at collection, so ``-rs`` shows the test's own location
    (``skipif(True)``: pytest drops the line number of an added ``skip`` mark)."""
    reason = skip_reason(item, probe)
    if reason is not None:
        item.add_marker(pytest.mark.skipif(True, reason=reason))
        return
    for mark in item.iter_markers("qemu_defect"):
        if defect_applies(mark, probe):
            item.add_marker(pytest.mark.xfail(
                strict=True, reason=f"QEMU defect on {probe.version_str}: "
                f"{mark.kwargs['reason']} (fix: {mark.kwargs.get('fixed_in', '?')})"))


def defect_applies(mark: pytest.Mark, probe: QemuProbe) -> bool:
    feature = mark.kwargs.get("unless_feature")
    if feature and probe.has_feature(feature):
        return False
    return version_matches(probe.version, mark.kwargs["affected"])
