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
    _group_by_mutation(items)


def _group_by_mutation(items: list[pytest.Item]) -> None:
    """Put every test of one header mutation (each strategy, the ASan verify)
    next to each other, in place: they share one mutated file, which takes
    longer to make than most of them take to run."""
    slots = [i for i, item in enumerate(items)
             if "mutation" in getattr(getattr(item, "callspec", None), "params", {})]
    def name(i: int) -> str:
        return str(items[i].callspec.params["mutation"])  # type: ignore[attr-defined]

    first: dict[str, int] = {}
    for i in slots:
        first.setdefault(name(i), i)
    grouped = [items[i] for i in sorted(slots, key=lambda i: (first[name(i)], i))]
    for i, item in zip(slots, grouped, strict=True):
        items[i] = item
