"""What the host's memory settings do to a restore's numbers, for bench reports.

A restore places every guest page in memory the destination QEMU allocates
right then, so its speed depends on how the host backs fresh pages.  Two
settings of the machine the bench runs on change that by large factors and
are not visible in the figures themselves:

- **free page reporting** (``page_reporting``, a virtio-balloon guest's way
  of handing free memory back to its hypervisor): on a virtual machine with
  it on, memory a previous restore freed goes back to the hypervisor, and
  the next restore's first touch of it faults there.  Measured here at
  4 GiB (loader-bridge with preempt, pinned, 6 restores each): eager
  throughput 595 MiB/s with it on (order 9), 1,164 MiB/s with it off
  (order 11); benchmarks/README.md, "Where the 4 GiB tail comes from".
- **transparent huge pages**: a full load faults its memory in 2 MiB at a
  time where THP is allowed; a postcopy restore places 4 KiB pages.

    before = memory_state()
    ...  # the bench
    memory_state_delta(before, memory_state())["reported_mib"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PAGE_REPORTING = Path("/sys/module/page_reporting/parameters")
THP = Path("/sys/kernel/mm/transparent_hugepage")
# the buddy allocator's largest order + 1 (x86-64, MAX_PAGE_ORDER 10): an
# order this high or higher reports nothing
NO_REPORTING_ORDER = 11


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _selected(text: str | None) -> str | None:
    """The bracketed choice of a sysfs enum ("always [madvise] never")."""
    if text is None or "[" not in text:
        return text
    return text[text.index("[") + 1:text.index("]")]


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def memory_state(page_reporting: Path = PAGE_REPORTING, thp: Path = THP) -> dict[str, Any]:
    """The host's THP mode and free page reporting state; a missing file
    (no such module, an older kernel) reads as None."""
    order = _int(_read(page_reporting / "page_reporting_order"))
    return {
        "thp": _selected(_read(thp / "enabled")),
        "thp_defrag": _selected(_read(thp / "defrag")),
        "page_reporting": order is not None and order < NO_REPORTING_ORDER,
        "page_reporting_order": order,
        "reported_kib": _int(_read(page_reporting / "reported_kib")),
    }


def memory_state_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """*after*, plus how much memory went back to the hypervisor in between
    (``reported_mib``; None where the kernel does not count it)."""
    b, a = before.get("reported_kib"), after.get("reported_kib")
    return {**after, "reported_mib": (a - b) >> 10 if a is not None and b is not None else None}


def describe(state: dict[str, Any]) -> str:
    """One line for a report header."""
    thp = f"THP {state['thp'] or 'unknown'}"
    if state.get("page_reporting"):
        rep = (f"free page reporting on (order {state['page_reporting_order']}): memory "
               "freed by one restore goes back to the hypervisor and refaults there on "
               "the next one")
        if state.get("reported_mib") is not None:
            rep += f"; {state['reported_mib']} MiB reported during this run"
    elif state.get("page_reporting_order") is not None:
        rep = f"free page reporting off (order {state['page_reporting_order']})"
    else:
        rep = "no free page reporting"
    return f"host memory: {thp}; {rep}"
