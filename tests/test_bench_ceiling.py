"""The bench's ceiling run: a QEMU-to-QEMU postcopy migration of the bench
guest really goes through postcopy, even for a guest small enough that QEMU
could finish it in precopy before the switch."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_fastsnap.config import FastsnapConfig
from pytest_fastsnap.qemu.probe import probe
from pytest_fastsnap.restore.bench import make_snapshot
from pytest_fastsnap.restore.ceiling import postcopy_ceiling

pytestmark = pytest.mark.fastsnap


def test_ceiling_sends_the_guest_in_postcopy(fastsnap_workdir: Path,
                                             fastsnap_config: FastsnapConfig) -> None:
    binary = fastsnap_config.qemu_binary
    machine = probe(binary).resolve_machine("q35")
    snap, device_args, ranges, _ = make_snapshot(24 << 20, binary=binary,
                                                 workdir=fastsnap_workdir, machine=machine,
                                                 log=lambda _msg: None)
    data = sum(n for _, n in ranges)
    result = postcopy_ceiling(snap, device_args, binary, fastsnap_workdir)
    # the data pages went after the switch, but for what precopy sends at its
    # 1 MiB/s cap in the one 100 ms rate-limit slice before it (~100 KiB)
    assert result["postcopy_bytes"] >= data - (256 << 10), result
    assert result["postcopy_s"] > 0 and result["postcopy_mib_s"] > 0, result
    assert result["blocktime"]["vcpu_ms"] is not None, result
