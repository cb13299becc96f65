"""Markers of the plugin and their evaluation against the probed binary."""

from __future__ import annotations

import re

import pytest

from pytest_fastsnap.qemu.probe import QemuProbe

MARKERS = (
    "fastsnap: boots QEMU; runs only with --fastsnap",
    "requires_kvm: needs a working KVM accelerator",
    "requires_uffd: needs usable userfaultfd on the host",
    "qemu_version(min=None, max=None): needs a QEMU version in [min, max)",
    "qemu_feature(*names): needs migration capabilities/parameters/features "
    "(e.g. 'mapped-ram', 'fast-snapshot-load') in the binary under test",
    "qemu_defect(affected, fixed_in, reason, unless_feature=None): a known QEMU defect; "
    "strict xfail on affected versions, so a fixed QEMU shows up as XPASS(strict) failure",
)


def parse_version(text: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", text)
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in parts[:3]) + (0,) * (3 - min(len(parts), 3))


def version_matches(version: tuple[int, ...], spec: str) -> bool:
    """Does *version* satisfy *spec*: comma-separated ``<X``, ``<=X``, ``>=X``, ``==X``."""
    ops = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
           ">=": lambda a, b: a >= b, "==": lambda a, b: a == b}
    for clause in spec.split(","):
        m = re.fullmatch(r"\s*(<=|>=|==|<|>)?\s*([\d.]+)\s*", clause)
        if not m:
            raise pytest.UsageError(f"bad QEMU version spec {spec!r} in a marker")
        op = m[1] or "=="
        if not ops[op](tuple(version), parse_version(m[2])):
            return False
    return True


def _skip(reason: str) -> None:
    """Skip reported at the test's own location (not at this module's line)."""
    raise pytest.skip.Exception(reason, _use_item_location=True)


def apply_markers(item: pytest.Item, probe: QemuProbe) -> None:
    """Skip or xfail *item* according to its markers and the probed binary."""
    if item.get_closest_marker("requires_kvm") and not probe.kvm_usable:
        _skip(f"KVM not usable: {probe.kvm_reason}")
    if item.get_closest_marker("requires_uffd") and not probe.uffd_usable:
        _skip(f"userfaultfd not usable: {probe.uffd_reason}")
    for mark in item.iter_markers("qemu_version"):
        low, high = mark.kwargs.get("min"), mark.kwargs.get("max")
        if low and probe.version < parse_version(low):
            _skip(f"needs QEMU >= {low}; {probe.binary} is {probe.version_str}")
        if high and probe.version >= parse_version(high):
            _skip(f"needs QEMU < {high}; {probe.binary} is {probe.version_str}")
    for mark in item.iter_markers("qemu_feature"):
        for name in mark.args:
            if not probe.has_feature(name):
                why = f" ({probe.fast_load_reason})" if name == "fast-snapshot-load" else ""
                _skip(f"{probe.binary} ({probe.version_str}) lacks {name!r}{why}")
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
