"""The host-side pattern and the initramfs writer (no QEMU needed)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pytest_fastsnap.guests.linux import CpioEntry, cpio_newc
from pytest_fastsnap.guests.pattern import (
    PAGE_SIZE,
    ZERO_PAGE,
    check_range,
    expected_digest,
    expected_range,
    first_bad_page,
    mix,
    page_content,
    page_is_dirty,
    page_is_zero,
)
from pytest_fastsnap.guests.tiny import TinyParams


def test_mix_is_splitmix64() -> None:
    # splitmix64 seeded with 0: its first output is mix(0).
    assert mix(0) == 0xE220A8397B1DCDAF


def test_page_layout() -> None:
    params = TinyParams(seed=5, zero_ratio=0.0)
    page = page_content(params, 0x500, generation=7)
    assert len(page) == PAGE_SIZE
    assert int.from_bytes(page[:8], "little") == 7
    assert page != page_content(params, 0x500, generation=8)
    assert page != page_content(params, 0x501, generation=7)
    assert page != page_content(TinyParams(seed=6, zero_ratio=0.0), 0x500, generation=7)


def test_zero_selection() -> None:
    params = TinyParams(seed=9, zero_ratio=0.25, zero_every=16)
    pfns = range(0x400, 0x400 + 16384)
    zero = [pfn for pfn in pfns if page_is_zero(params, pfn)]
    assert all(page_is_zero(params, pfn) for pfn in pfns if pfn % 16 == 0)
    assert 0.25 < len(zero) / len(pfns) < 0.33
    assert page_content(params, zero[0]) == ZERO_PAGE
    assert not page_is_zero(TinyParams(zero_ratio=0.0), 0x401)
    assert page_is_zero(TinyParams(zero_ratio=1.0), 0x401)


def test_64_mib_of_expectation_is_fast() -> None:
    params = TinyParams(seed=3, size=64 << 20)
    t0 = time.monotonic()
    data = expected_range(params, params.start, params.size)
    elapsed = time.monotonic() - t0
    assert len(data) == 64 << 20
    assert elapsed < 3.0, f"{elapsed:.2f}s for 64 MiB"


def test_digest_matches_range() -> None:
    import hashlib

    params = TinyParams(seed=11, size=1 << 20)
    data = expected_range(params, params.start, params.size)
    assert expected_digest(params, params.start, params.size) == hashlib.sha256(data).hexdigest()


def test_check_range_finds_the_first_bad_page() -> None:
    params = TinyParams(seed=2, size=64 * PAGE_SIZE, zero_ratio=0.3)
    data = bytearray(expected_range(params, params.start, params.size))
    assert check_range(params, bytes(data), params.start)
    content_pfn = next(p for p in range(params.first_pfn + 10, params.first_pfn + 64)
                       if not page_is_zero(params, p))
    zero_pfn = next(p for p in range(params.first_pfn + 20, params.first_pfn + 64)
                    if page_is_zero(params, p))
    data[(zero_pfn - params.first_pfn) * PAGE_SIZE + 100] ^= 1
    data[(content_pfn - params.first_pfn) * PAGE_SIZE + 200] ^= 1
    verdict = check_range(params, bytes(data), params.start)
    assert not verdict
    bad = verdict.details["bad_page"]
    assert bad.pfn == min(content_pfn, zero_pfn)
    assert bad.why == ("content" if bad.pfn == content_pfn else "zero")
    assert str(verdict).startswith(f"pattern check failed at page {bad.pfn} "
                                   f"(gpa {bad.pfn * PAGE_SIZE:#x}): {bad.why}")


def _dirty_image(params: TinyParams, gens: dict[int, int]) -> bytes:
    return expected_range(params, params.start, params.size, generations=gens)


def test_dirty_set_edge_invariant() -> None:
    params = TinyParams(seed=4, size=256 * PAGE_SIZE, mode="dirty", dirty_stride=4)
    dirty = [p for p in range(params.first_pfn, params.first_pfn + params.pages)
             if page_is_dirty(params, p)]
    assert len(dirty) > 10
    # mid-pass: the first 5 dirty pages at 9, the rest at 8
    good = {p: 9 if i < 5 else 8 for i, p in enumerate(dirty)}
    assert check_range(params, _dirty_image(params, good), params.start)
    # a page the save missed: stale generation 7 after the edge
    stale = dict(good)
    stale[dirty[7]] = 7
    bad = first_bad_page(params, _dirty_image(params, stale), params.start)
    assert bad is not None and (bad.pfn, bad.why) == (dirty[7], "gen")
    # a page that stayed at the old generation before the edge
    early = dict(good)
    early[dirty[2]] = 8
    bad = first_bad_page(params, _dirty_image(params, early), params.start)
    assert bad is not None and bad.pfn == dirty[3]
    # a page outside the dirty set must stay at generation 0
    clean = next(p for p in range(params.first_pfn, params.first_pfn + params.pages)
                 if not page_is_zero(params, p) and not page_is_dirty(params, p))
    moved = dict(good)
    moved[clean] = 1
    bad = first_bad_page(params, _dirty_image(params, moved), params.start)
    assert bad is not None and (bad.pfn, bad.why) == (clean, "gen")


def test_params_validation_and_cmdline() -> None:
    with pytest.raises(ValueError):
        TinyParams(start=0x1000)
    with pytest.raises(ValueError):
        TinyParams(mode="busy")
    params = TinyParams(seed=0x1234, start=0x800000, size=0x100000, zero_ratio=0.5)
    assert params.cmdline() == ("seed=0x1234 start=0x800000 size=0x100000 mode=static "
                                "zthresh=32768 zevery=0 dstride=8")
    assert params.min_mem() == "11M"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool")
def test_cpio_newc_lists_with_gnu_cpio(tmp_path: Path) -> None:
    archive = cpio_newc([CpioEntry("bin", 0o040755), CpioEntry("bin/x", 0o100755, b"abc"),
                         CpioEntry("dev/console", 0o020600, rdev=(5, 1))])
    listing = subprocess.run(["cpio", "-t", "-v", "--quiet"], input=archive,
                             capture_output=True, check=True).stdout.decode()
    assert "bin/x" in listing and "dev/console" in listing
    assert listing.splitlines()[-1].startswith("crw-------")


def test_one_torn_page_at_the_edge_is_accepted() -> None:
    params = TinyParams(seed=8, size=256 * PAGE_SIZE, mode="dirty", dirty_stride=4)
    dirty = [p for p in range(params.first_pfn, params.first_pfn + params.pages)
             if page_is_dirty(params, p)]
    gens = {p: 3 if i < 4 else 2 for i, p in enumerate(dirty)}
    data = bytearray(_dirty_image(params, gens))

    def tear(pfn: int) -> None:
        # the guest got half-way through writing generation 3 (header still 2)
        new = page_content(params, pfn, 3)
        offset = (pfn - params.first_pfn) * PAGE_SIZE
        data[offset + 16:offset + 2048] = new[16:2048]

    tear(dirty[4])
    assert check_range(params, bytes(data), params.start)
    bad = first_bad_page(params, bytes(data), params.start, allow_torn=False)
    assert bad is not None and (bad.pfn, bad.why) == (dirty[4], "content")
    tear(dirty[6])      # a second torn page, away from the edge
    bad = first_bad_page(params, bytes(data), params.start)
    assert bad is not None and (bad.pfn, bad.why) == (dirty[6], "content")
