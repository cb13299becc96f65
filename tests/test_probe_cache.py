"""The probe cache leaves nothing behind for binaries that fail or are gone."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pytest_fastsnap.qemu.probe import STALE_LOCK_AGE_S, ProbeError, probe


def test_failed_probe_leaves_no_lock_file(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    script = tmp_path / "not-qemu"
    script.write_text("#!/bin/sh\necho 'not a QEMU'\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(ProbeError):
        probe(str(script), cache)
    assert sorted(p.name for p in cache.iterdir()) == []


def test_entries_of_vanished_binaries_are_swept(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    gone = cache / "probe-1.json"
    gone.write_text(json.dumps({"key": "k", "probe": {"binary": str(tmp_path / "gone")}}))
    kept_binary = tmp_path / "still-here"
    kept_binary.write_text("")
    kept = cache / "probe-2.json"
    kept.write_text(json.dumps({"key": "k", "probe": {"binary": str(kept_binary)}}))
    old_lock = cache / "probe-3.json.lock"
    old_lock.write_text("")
    past = time.time() - STALE_LOCK_AGE_S - 10
    os.utime(old_lock, (past, past))
    fresh_lock = cache / "probe-4.json.lock"  # a probe may hold it right now
    fresh_lock.write_text("")
    script = tmp_path / "not-qemu"
    script.write_text("#!/bin/sh\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(ProbeError):
        probe(str(script), cache)
    assert sorted(p.name for p in cache.iterdir()) == ["probe-2.json", "probe-4.json.lock"]
