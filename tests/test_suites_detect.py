"""The conformance suites must fail when their property is broken.

Each test runs a real suite file through pytester with one thing sabotaged: a
wrong expectation, a loader that accepts everything, a flipped bitmap bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.fastsnap
SUITES = Path(__file__).resolve().parent.parent / "suites"


def _suite(pytester: pytest.Pytester, name: str) -> None:
    """Copy one suite file, with the helper module the suites import."""
    pytester.makepyfile(**{name: (SUITES / f"{name}.py").read_text(),
                           "reference_snapshot": (SUITES / "reference_snapshot.py").read_text()})


def test_capability_suite_catches_a_wrong_expectation(pytester: pytest.Pytester) -> None:
    _suite(pytester, "test_capabilities")
    pytester.makeconftest(
        """
        def pytest_collection_modifyitems(items):
            for item in items:
                # Claim xbzrle is compatible with mapped-ram: QEMU refuses it.
                item.module.expected_conflict = lambda capability, probe: None
        """)
    result = pytester.runpytest_subprocess("--fastsnap", "-k", "test_mapped_ram_pair and xbzrle")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*compatible capability refused*xbzrle*"])


def test_header_suite_catches_a_loader_that_accepts_corruption(
        pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _suite(pytester, "test_header_bounds")
    fake = tmp_path / "accept-everything"
    fake.write_text('#!/bin/sh\necho \'{"valid": true}\'\nexit 0\n')
    fake.chmod(0o755)
    monkeypatch.setenv("FASTSNAP_LOADER", str(fake))
    # Selects loader-local with pc.ram:page_size=0 (the other page_size values
    # contain 1, 512 or 0x).
    result = pytester.runpytest_subprocess(
        "--fastsnap", "-k", "test_hostile_header and loader-local and page_size and pc.ram "
        "and not 512 and not 0x and not 1")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*want the loader to refuse pc.ram:page_size=0 with "
                                 "E_PAGE_SIZE*"])


def test_fast_load_suite_catches_stale_data_under_clear_bits(pytester: pytest.Pytester) -> None:
    """A reader that ignores clear bits (here: every bit set in the file just
    before the restore) must fail the zero-page check through the guest."""
    _suite(pytester, "test_fast_load")
    pytester.makeconftest(
        """
        from pytest_fastsnap.snapshot.format import parse

        def pytest_collection_modifyitems(items):
            for item in items:
                module = item.module
                if getattr(module, "leaky", False):
                    continue
                real = module.restore

                def leaky(strategy, path, *args, **kwargs):
                    blk = parse(path, offset=kwargs.get("offset", 0)).blocks[0]
                    with open(path, "r+b") as f:
                        f.seek(blk.bitmap_range.start)
                        f.write(b"\\xff" * blk.bitmap_size)
                    return real(strategy, path, *args, **kwargs)
                module.restore, module.leaky = leaky, True
        """)
    result = pytester.runpytest_subprocess(
        "--fastsnap", "-k", "test_zero_pages_served_as_zeros and loader-bridge-on-request")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*stale data reached the guest*"])


def test_bitmap_suite_catches_a_flipped_bit(pytester: pytest.Pytester) -> None:
    _suite(pytester, "test_bitmap")
    pytester.makeconftest(
        """
        import os, pytest
        from pytest_fastsnap.fixtures import SnapshotFactory
        from pytest_fastsnap.snapshot import mutate
        from pytest_fastsnap.snapshot.format import parse

        class Flipping(SnapshotFactory):
            def save(self, vm, **kwargs):
                saved = super().save(vm, **kwargs)
                block = parse(saved.path, offset=saved.offset).block("microvm.ram")
                bits = block.read_bitmap(saved.path)
                # First clear bit in the pattern range (4 MiB on): a zero page.
                page = next(i for i in range(0x400, block.num_pages)
                            if not bits[i // 8] >> (i % 8) & 1)
                tmp = saved.path.with_suffix(".flip")
                mutate.set_bitmap_bit(saved.path, tmp, "microvm.ram", page, True,
                                      stream_offset=saved.offset)
                os.replace(tmp, saved.path)
                return saved
            __call__ = save

        @pytest.fixture
        def snapshot_factory(fastsnap_workdir):
            return Flipping(fastsnap_workdir)
        """)
    result = pytester.runpytest_subprocess(
        "--fastsnap", "-k", "test_stopped_save_bitmap_matches_pattern_and_dump and "
        "single and not zpd and not multifd")
    result.assert_outcomes(failed=1)
