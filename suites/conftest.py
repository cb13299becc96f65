"""Everything in suites/ boots QEMU, so it runs only with --fastsnap."""

from __future__ import annotations

from pathlib import Path

import pytest

SUITES_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees every collected item, not only this directory's: match on
    # this directory itself, not on a path component named "suites" (a checkout
    # under .../suites/... would otherwise turn every self-test into a QEMU test).
    for item in items:
        if item.path.resolve().is_relative_to(SUITES_DIR):
            item.add_marker(pytest.mark.fastsnap)
