"""The restore strategies as one table of what each can check.

The suites run every check through every strategy that can express it, so a
QEMU build with fast snapshot load gets the whole suite through its fast path
with no new test code.  Strategies differ in what they can express; rather than
testing strategy names inside tests, tests select strategies by these traits:

============== ====== =========== ==== =====================================
strategy       reader destination lazy a hostile header must ...
============== ====== =========== ==== =====================================
qemu-precopy   qemu   yes         no   fail the load cleanly, or load the
                                       source's memory
qemu-fast      qemu   yes         yes  (the same: QEMU parses the headers)
loader-bridge  loader yes         yes  make the loader exit 2 naming the
                                       broken rule before it feeds QEMU
loader-local   loader no          yes  make the loader exit 2 naming the
                                       broken rule
============== ====== =========== ==== =====================================

*reader* parses the mapped-ram headers, so known QEMU header defects
(``qemu_defect``) apply only where it is ``qemu``.  *destination*: a QEMU guest
comes out (device state, registers, the guest runs on); ``loader-local`` has
none and is judged by memory digests.  *lazy*: pages can arrive after the
guest (or the loader's touching threads) started, through a fault path and an
eager path that must never place a page twice or lose one.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pytest_fastsnap.restore.strategies import STRATEGIES

LOCAL = "loader-local"


@dataclass(frozen=True)
class Strategy:
    name: str
    reader: str             # "qemu" | "loader": who parses the file's headers
    destination: bool       # a QEMU destination runs the restored guest
    lazy: bool              # the guest may run before every page is in
    page_accounting: bool   # reports pages placed per path and double placements
    needs_uffd: bool
    needs_fast_load: bool   # the binary under test must have QEMU's fast snapshot load
    hostile_header: str     # what a hostile header must cause (failure messages)

    @property
    def marks(self) -> list[pytest.MarkDecorator]:
        marks = []
        if self.needs_fast_load:
            marks.append(pytest.mark.qemu_feature("fast-snapshot-load"))
        if self.needs_uffd:
            marks.append(pytest.mark.requires_uffd)
        return marks


_QEMU_REFUSES = ("QEMU fails the load cleanly (an error, no signal, no hang) or completes "
                 "it with the source's memory")
_LOADER_REFUSES = "the native loader exits 2 naming the broken rule (E_ name)"

STRATEGY_TABLE: dict[str, Strategy] = {s.name: s for s in (
    Strategy("qemu-precopy", reader="qemu", destination=True, lazy=False,
             page_accounting=False, needs_uffd=False, needs_fast_load=False,
             hostile_header=_QEMU_REFUSES),
    Strategy("qemu-fast", reader="qemu", destination=True, lazy=True,
             page_accounting=False, needs_uffd=True, needs_fast_load=True,
             hostile_header=_QEMU_REFUSES),
    Strategy("loader-bridge", reader="loader", destination=True, lazy=True,
             page_accounting=True, needs_uffd=True, needs_fast_load=False,
             hostile_header=_LOADER_REFUSES + ", before the destination gets any state"),
    Strategy(LOCAL, reader="loader", destination=False, lazy=True,
             page_accounting=True, needs_uffd=True, needs_fast_load=False,
             hostile_header=_LOADER_REFUSES),
)}
assert set(STRATEGY_TABLE) == {*STRATEGIES, LOCAL}, "every restore strategy is in the table"


def strategies(**traits: object) -> list[Strategy]:
    """The strategies whose traits equal *traits*, e.g. ``strategies(destination=True)``."""
    unknown = set(traits) - set(Strategy.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown strategy traits {sorted(unknown)}")
    return [s for s in STRATEGY_TABLE.values()
            if all(getattr(s, k) == v for k, v in traits.items())]


def strategy_params(**traits: object) -> list[object]:
    """``pytest.param`` per selected strategy, id = its name, with the marks that
    skip it where it cannot run (fast snapshot load missing: the probe's reason)."""
    return [pytest.param(s.name, id=s.name, marks=s.marks) for s in strategies(**traits)]
