"""fastsnap-loader load: the fault path racing the eager path (needs --fastsnap).

Every run's memory digest is compared with an independent pure-Python
computation from the file (bit set: the page from the file, clear: zeros),
reading the bitmap directly, not through the project's reader.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from pytest_fastsnap.fixtures import GuestFactory, SnapshotFactory
from pytest_fastsnap.native.loader import run_loader
from pytest_fastsnap.qemu.migration import SavedSnapshot

pytestmark = pytest.mark.fastsnap

PAGE = 4096
ZERO = bytes(PAGE)


@pytest.fixture
def saved(guest_factory: GuestFactory, snapshot_factory: SnapshotFactory) -> SavedSnapshot:
    guest = guest_factory("tiny", mem="128M", size=96 << 20, zero_ratio=0.1)
    snap = snapshot_factory(guest.vm)
    guest.vm.shutdown()
    return snap


def expected_digests(path: Path, offset: int) -> dict[str, str]:
    """sha256 of each block's restored memory, from inspect's offsets and the raw file."""
    res = run_loader(["inspect", str(path), "--offset", str(offset), "--json"], timeout=10)
    assert res.returncode == 0, res.stderr
    out = {}
    with open(path, "rb") as f:
        for blk in json.loads(res.stdout)["blocks"]:
            f.seek(blk["bitmap_offset"])
            bitmap = f.read(blk["bitmap_size"])
            h = hashlib.sha256()
            for i in range(blk["num_pages"]):
                if bitmap[i // 8] >> (i % 8) & 1:
                    f.seek(blk["pages_offset"] + i * PAGE)
                    page = f.read(PAGE)
                    assert len(page) == PAGE
                    h.update(page)
                else:
                    h.update(ZERO)
            out[blk["id"]] = h.hexdigest()
    return out


def load(saved: SavedSnapshot, *args: str, variant: str = "release") -> dict[str, Any]:
    res = run_loader(["load", str(saved.path), "--offset", str(saved.offset), *args, "--json"],
                     variant=variant, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out: dict[str, Any] = json.loads(res.stdout)
    stats = out["stats"]
    assert stats["double_loads"] == 0
    assert stats["pages_loaded"] == stats["total_pages"]
    assert stats["pages_copied"] + stats["pages_zero"] == stats["total_pages"]
    return out


@pytest.mark.parametrize("variant", ["release", "asan"])
def test_fault_and_eager_race_over_the_same_pages(saved: SavedSnapshot, variant: str) -> None:
    """Access threads walk the memory from the start of their slices while the
    eager thread walks from page 0: they collide on the same pages.  Each page
    is placed exactly once, none is lost, and the collisions did happen
    (faults on pages the eager thread was placing, or already placed)."""
    want = expected_digests(saved.path, saved.offset)
    collisions = fault_placed = 0
    for threads in ("1", "4"):
        for seed in ("1", "2"):
            out = load(saved, "--mode", "lazy", "--access", "all", "--threads", threads,
                       "--seed", seed, variant=variant)
            assert {b["id"]: b["sha256"] for b in out["blocks"]} == want
            stats = out["stats"]
            assert stats["faults"] > 0 and stats["eager_pages"] > 0
            # Which path wins a page is timing: over all runs the fault path
            # must have placed some (one run may see the eager thread win all).
            fault_placed += stats["total_pages"] - stats["eager_pages"]
            collisions += stats["fault_dedup"] + stats["wakes"]
    assert fault_placed > 0, "the fault path never placed a page"
    assert collisions > 0, "the fault and eager paths never met on a page"


def test_every_mode_matches_python_digest_with_baseline(saved: SavedSnapshot) -> None:
    want = expected_digests(saved.path, saved.offset)
    for mode in ("lazy", "fault-only", "eager", "sync"):
        out = load(saved, "--mode", mode, "--access", "random", "--threads", "2", "--baseline")
        assert {b["id"]: b["sha256"] for b in out["blocks"]} == want, mode
        stats, base = out["stats"], out["baseline"]
        assert 0 < base["uffd_round_trip_us"]["p50"] <= base["uffd_round_trip_us"]["p99"]
        assert base["pread_mib_s"] > 0
        assert base["pread_bytes"] == sum(b["length"] for b in out["blocks"])
        touch = stats["touch_latency_us"]
        if mode in ("lazy", "fault-only"):
            # random touches of unclaimed pages fault: timed from the toucher's side
            assert touch["count"] > 0 and 0 < touch["p50"] <= touch["p99"]
            assert stats["fault_latency_us"]["p50"] > 0
        else:  # everything was placed before access began
            assert touch["count"] == 0 and stats["faults"] == 0
