"""Defects `fastsnap fuzz qemu` found, as regression tests.

Each finding is its minimised edit list, re-applied by name to the suites'
fresh base snapshot (the tiny guest, q35, 64 MiB: the snapshot the campaign
ran on), so no binary file is committed.  QEMU must refuse the file cleanly
or load it with the source's memory: never die by a signal, hang, print an
internal error, or complete with wrong memory.  And the native loader must
refuse every file that makes QEMU crash or load wrong memory (it is stricter
than QEMU), except where the defect is in device state it does not interpret.

Found on QEMU 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1) by a 10-minute
``fastsnap fuzz qemu --guest tiny --jobs 2 --seed 10`` campaign; all four also
happen on QEMU 10.2.2 (built from Debian's source package), whose debug info
gave the functions named below.  The campaign's other distinct finding,
``pc.ram.header.bitmap_offset 139 -> 0`` (wrong memory), is already
``test_header_bounds.py::test_qemu_fails_cleanly[pc.ram:bitmap_offset=0]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_fastsnap.fuzz.locations import find_locations
from pytest_fastsnap.fuzz.mutators import Edit, apply_edits
from pytest_fastsnap.fuzz.outcomes import load_once
from pytest_fastsnap.native.loader import run_loader
from pytest_fastsnap.plugin_state import ACCEL_KEY, PROBE_DST_KEY
from pytest_fastsnap.qemu.probe import QemuProbe
from pytest_fastsnap.snapshot.format import parse

from reference_snapshot import BaseSnapshot, base_snapshot, ram_ranges

LOAD_TIMEOUT = 20.0
NO_FIX = "none known as of QEMU master 2026-08"


@dataclass(frozen=True)
class Finding:
    id: str
    edits: tuple[tuple[str, int], ...]  # (location name, new value), big-endian in place
    reason: str
    fixed_in: str = NO_FIX
    unless_feature: str | None = None
    loader_checks: bool = True  # False: the defect lives in device state

    def marks(self) -> pytest.MarkDecorator:
        kwargs = {"affected": ">=9.0", "reason": self.reason, "fixed_in": self.fixed_in}
        if self.unless_feature:
            kwargs["unless_feature"] = self.unless_feature
        return pytest.mark.qemu_defect(**kwargs)


FINDINGS = (
    Finding("block-id-length-into-header", (("pc.rom.id_length", 70),),
            "a block id length (70 for the 6-byte 'pc.rom') that runs into the block's "
            "used_length, header and bitmap kills the destination with SIGFPE: the id still "
            "names pc.rom up to the used_length's NUL byte, and the MappedRamHeader then read "
            "from bitmap zeros has page_size 0, which parse_ramblock_mapped_ram divides by",
            fixed_in="likely the upstream 2026 mapped-ram header page_size check (no release "
                     "yet)", unless_feature="fast-snapshot-load"),
    Finding("used-length-all-ones", (("pc.ram.used_length", (1 << 64) - 1),),
            "a block used_length of 2**64-1 makes parse_ramblock_mapped_ram allocate a bitmap "
            "sized from it before the length is checked against the RAMBlock: g_malloc0 "
            "fails and g_error kills the destination with SIGTRAP (\"failed to allocate N "
            "bytes\")"),
    Finding("ram-start-type-eof", (("ram.start.type", 0),),
            "a RAM START record type changed to EOF (00) ends the stream for QEMU right after "
            "the configuration: the load completes with no RAM and no device state loaded "
            "(only a warning: \"Expected vmdescription section, but got 0\"), so the guest "
            "has zeroed memory"),
    Finding("fw-cfg-rsdp-size", (("dev:fw_cfg/0/acpi_mr.rsdp_mr_size", 0x11DA5DD3387A8AC5),),
            "fw_cfg's acpi_mr subsection (fw_cfg_acpi_mr_restore_post_load -> fw_cfg_update_mr"
            " -> memory_region_ram_resize) resizes the /rom@etc/acpi/rsdp RAMBlock to the "
            "stream's rsdp_mr_size with &error_abort: a size above the block's max_length "
            "aborts the destination (SIGABRT, \"Size too large: /rom@etc/acpi/rsdp\")",
            loader_checks=False),
)


def _rebuild(base: BaseSnapshot, finding: Finding, workdir: Path) -> Path:
    """The finding's input: its edits applied, by location name, to *base*."""
    locs = {loc.name: loc for loc in find_locations(parse(base.path))}
    edits = [Edit(name, "set", 0, value.to_bytes(locs[name].size, "big").hex(),
                  f"{name} -> {value:#x}", locs[name].memory_safe)
             for name, value in finding.edits]
    return apply_edits(base.path, workdir / f"{finding.id}.img", edits, locs)


@pytest.fixture
def base(pytestconfig: pytest.Config) -> BaseSnapshot:
    probe = pytestconfig.stash[PROBE_DST_KEY]
    return base_snapshot(probe.binary, pytestconfig.stash[ACCEL_KEY][0])


@pytest.mark.parametrize("finding", [pytest.param(f, id=f.id, marks=f.marks())
                                     for f in FINDINGS])
def test_qemu_loads_fuzz_finding_cleanly(qemu_probe_dst: QemuProbe, fastsnap_workdir: Path,
                                         base: BaseSnapshot, finding: Finding) -> None:
    path = _rebuild(base, finding, fastsnap_workdir)
    result = load_once(qemu_probe_dst.binary, base.device_args, path, fastsnap_workdir,
                       name=finding.id, timeout=LOAD_TIMEOUT, digests=base.memory_digests,
                       ranges=ram_ranges(base.mem_bytes))
    assert result.outcome in ("refused", "same_memory"), (
        f"{finding.id}: {result.outcome} {result.signal or ''}: {result.reason}\n"
        f"{result.log[-2000:]}")


@pytest.mark.parametrize("finding", [
    pytest.param(f, id=f.id, marks=() if f.loader_checks else pytest.mark.xfail(
        strict=True, reason="fastsnap verify does not interpret device state, so it cannot "
                            "see this defect")) for f in FINDINGS])
def test_loader_refuses_fuzz_finding(fastsnap_workdir: Path, base: BaseSnapshot,
                                     finding: Finding) -> None:
    path = _rebuild(base, finding, fastsnap_workdir)
    res = run_loader(["verify", str(path), "--json"], timeout=30)
    assert res.returncode == 2, f"verify accepted {finding.id}: {res.stdout}{res.stderr}"
    assert json.loads(res.stdout)["error"].startswith("E_")
