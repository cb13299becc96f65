"""`fastsnap restore SNAPSHOT` (restore_cli) and the <snapshot>.json manifest."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from pytest_fastsnap.cli.restore import restore_cli
from pytest_fastsnap.fixtures import SnapshotFactory, VmFactory
from pytest_fastsnap.restore.manifest import manifest_path, read_manifest, write_manifest


def test_manifest_roundtrip(vm_factory: VmFactory, snapshot_factory: SnapshotFactory) -> None:
    src = vm_factory(mem="64M")
    snap = snapshot_factory(src)
    path = write_manifest(snap.path, src, offset=snap.offset)
    assert path == manifest_path(snap.path) == snap.path.with_name(snap.path.name + ".json")
    m = read_manifest(snap.path)
    assert list(m.qemu_args) == src.device_args
    assert m.binary == src.binary and m.offset == 0
    assert set(json.loads(path.read_text())) >= {"qemu_args", "binary", "offset"}


@pytest.mark.parametrize("content, message", [
    (None, "no manifest"),
    ("{", "not JSON"),
    ('{"qemu_args": "-m 64M"}', "list of strings"),
    ('{"qemu_args": [], "offset": -1}', "bad 'binary' or 'offset'"),
])
def test_manifest_errors(tmp_path: Path, content: str | None, message: str) -> None:
    snap = tmp_path / "s.img"
    if content is not None:
        manifest_path(snap).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_manifest(snap)


@pytest.mark.parametrize("strategy", ["loader-bridge", "qemu-precopy"])
def test_restore_cli(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                     strategy: str) -> None:
    src = vm_factory(mem="128M")
    src.wait_status("running")
    snap = snapshot_factory(src, offset=0x10000)
    write_manifest(snap.path, src, offset=snap.offset)
    src.shutdown()
    out = io.StringIO()
    rc = restore_cli(snap.path, src.binary, strategy=strategy, out=out)
    text = out.getvalue()
    assert rc == 0, text
    assert re.search(rf"{strategy}: guest running after \d+\.\d+ s", text), text
    assert re.search(rf"{strategy}: fully loaded after \d+\.\d+ s", text), text
    if strategy == "loader-bridge":
        assert "page requests served" in text


def test_restore_cli_without_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    (tmp_path / "alone.img").write_bytes(b"QEVM")
    rc = restore_cli(tmp_path / "alone.img", "qemu-system-x86_64")
    assert rc == 2
    assert "no manifest next to the snapshot" in capsys.readouterr().err


def test_qemu_fast_strategy(vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
                            qemu_probe_dst) -> None:  # type: ignore[no-untyped-def]
    """qemu-fast runs where the binary has fast snapshot load, and otherwise
    refuses with QEMU's own reason (not a generic failure)."""
    from pytest_fastsnap.restore import RestoreUnsupported, restore

    src = vm_factory(mem="64M")
    snap = snapshot_factory(src)
    src.shutdown()
    if qemu_probe_dst.fast_load:
        with restore("qemu-fast", snap.path, snap.device_args, vm_factory) as guest:
            assert guest.wait_loaded() >= guest.time_to_running > 0
        return
    with pytest.raises(RestoreUnsupported, match="incompatible with postcopy"):
        restore("qemu-fast", snap.path, snap.device_args, vm_factory)
