"""Reserve 2 MiB huge pages for a test: raise ``/proc/sys/vm/nr_hugepages``
(as root) until enough are free, and put it back afterwards unless someone
else changed it meanwhile (other sessions share the pool)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


class HugePagesUnavailable(RuntimeError):
    """Not enough free huge pages and no way to reserve them; the message says why."""


def free_hugepages() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def reserved_hugepages(needed: int) -> Iterator[None]:
    """At least *needed* free 2 MiB pages inside the block, or HugePagesUnavailable."""
    free = free_hugepages()
    if free >= needed:
        yield
        return
    if os.geteuid() != 0 or not os.access(NR_HUGEPAGES, os.W_OK):
        raise HugePagesUnavailable(f"needs {needed} free 2 MiB huge pages ({free} free) and "
                                   f"root to raise {NR_HUGEPAGES}")
    before = int(NR_HUGEPAGES.read_text())
    target = before + needed - free
    NR_HUGEPAGES.write_text(str(target))
    try:
        if free_hugepages() < needed:
            raise HugePagesUnavailable(
                f"the kernel could not reserve {needed} 2 MiB huge pages "
                f"({NR_HUGEPAGES} = {NR_HUGEPAGES.read_text().strip()})")
        yield
    finally:
        with contextlib.suppress(OSError):
            if int(NR_HUGEPAGES.read_text()) == target:
                NR_HUGEPAGES.write_text(str(before))
