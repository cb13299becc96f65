"""The documented ways to load a snapshot work without reading the source:
``restore()`` finds an offset snapshot's stream by itself and says where the
stream is when told the wrong offset, ``restore_precopy(resume=True)`` runs the
guest, waiting for a MIGRATION event that cannot come says why, and the QMP
transcript is a kept artifact of a failed test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_fastsnap.fixtures import Guest, SnapshotFactory, VmFactory
from pytest_fastsnap.restore import RestoreFailed, restore
from pytest_fastsnap.restore.manifest import manifest_path

pytestmark = pytest.mark.fastsnap
OFFSET = 0x10000


def test_restore_takes_the_offset_from_the_manifest(guest: Guest, vm_factory: VmFactory,
                                                    snapshot_factory: SnapshotFactory) -> None:
    snap = snapshot_factory(guest.vm, offset=OFFSET)
    with restore("qemu-precopy", snap.path, snap.device_args, vm_factory) as restored:
        assert restored.self_check()


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
def test_a_wrong_offset_says_where_the_stream_starts(guest: Guest, vm_factory: VmFactory,
                                                     snapshot_factory: SnapshotFactory,
                                                     manifest: bool) -> None:
    snap = snapshot_factory(guest.vm, offset=OFFSET)
    where = f"snap1.img.json says it starts at {OFFSET:#x}"
    if not manifest:
        manifest_path(snap.path).unlink()
        where = f"one starts at {OFFSET:#x}"
    with pytest.raises(RestoreFailed) as failed:
        restore("qemu-precopy", snap.path, snap.device_args, vm_factory, offset=0)
    assert "hint: no migration stream starts at offset 0x0" in str(failed.value)
    assert f"{where}: pass offset={OFFSET:#x}" in str(failed.value)


@pytest.mark.parametrize("transport", ["unix", "fd", "tcp"])
def test_bridge_loader_start_is_off_the_restore_clock_only_over_unix(
        guest: Guest, vm_factory: VmFactory, snapshot_factory: SnapshotFactory,
        transport: str) -> None:
    """Over unix the strategy starts the loader before ``migrate-incoming``
    (its start-up is no more part of time to running than QEMU's is), and it
    still connects only once the destination listens; fd and tcp need the
    destination first, so their loader starts after."""
    snap = snapshot_factory(guest.vm)
    with restore("loader-bridge", snap.path, snap.device_args, vm_factory,
                 transport=transport) as restored:
        assert restored.self_check()
        restored.wait_loaded(120)
        summary = restored.summary()
        spawned = summary["loader_spawned_at_s"]
        connected = summary["loader_started_at_s"] + summary["loader"]["time_connected_s"]
        assert (spawned < 0) == (transport == "unix"), summary
        assert connected >= 0, summary      # never before migrate-incoming
        assert summary["time_to_running_s"] > 0, summary


def test_restore_precopy_resume_runs_the_guest(guest: Guest, restore_precopy: object,
                                               snapshot_factory: SnapshotFactory) -> None:
    snap = snapshot_factory(guest.vm)
    paused = restore_precopy(snap)  # type: ignore[operator]
    assert paused.status() == "paused"
    running = restore_precopy(snap, resume=True)  # type: ignore[operator]
    assert running.status() == "running"


def test_waiting_for_migration_events_that_are_off_says_so(vm_factory: VmFactory) -> None:
    dst = vm_factory(incoming="defer", paused=True)
    with pytest.raises(TimeoutError, match="only with the 'events' migration capability"):
        dst.wait_event("MIGRATION", timeout=0.2)
    dst.qmp("migrate-set-capabilities",
            capabilities=[{"capability": "events", "state": True}])
    with pytest.raises(TimeoutError) as plain:
        dst.wait_event("MIGRATION", timeout=0.2)
    assert "capability" not in str(plain.value)


def test_qmp_transcript_is_kept_with_a_failed_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_fails(vm_factory):
            vm_factory(name="kept").qmp("query-status")
            assert False
        """)
    out = pytester.path / "arts"
    result = pytester.runpytest_subprocess("--fastsnap", "--fastsnap-keep-artifacts",
                                           f"--fastsnap-artifacts-dir={out}",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    (kept,) = out.iterdir()
    transcript = (kept / "kept.qmp.log").read_text()
    assert "-> query-status {}" in transcript and "<- {'status': 'running'" in transcript


def test_readme_loading_examples_run(pytester: pytest.Pytester) -> None:
    """The README's "Loading snapshots" examples, run as they are written."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Loading snapshots in your own tests", 1)[1].split("\n### ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    pytester.makepyfile(**{f"test_readme{i}": code for i, code in enumerate(blocks)})
    result = pytester.runpytest_subprocess("--fastsnap", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
