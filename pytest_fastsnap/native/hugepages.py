"""Reserve 2 MiB huge pages for a test: as root, add the pages it needs to
``/proc/sys/vm/nr_hugepages`` and take exactly those back afterwards.

Each reservation adds its own pages, under an exclusive ``flock`` on the
sysctl file, so reservations made at once (pytest-xdist workers, another
session) add up and each gives back only what it added: a reservation that
counted another's free pages as its own, or wrote back the value it saw
first, either shared pages it did not hold or left the pool raised (a run of
``-n 2`` left 68 pages reserved)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
HUGE_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


class HugePagesUnavailable(RuntimeError):
    """Not enough free huge pages and no way to reserve them; the message says why."""


def free_hugepages() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def _pool_locked() -> Iterator[None]:
    """The pool's size read and written by one reserver at a time."""
    fd = os.open(NR_HUGEPAGES, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)    # releases the lock


def _resize(delta: int) -> int:
    """Grow (shrink) the pool by *delta* pages; how many it actually changed by."""
    with _pool_locked():
        before = int(NR_HUGEPAGES.read_text())
        NR_HUGEPAGES.write_text(str(max(0, before + delta)))
        return int(NR_HUGEPAGES.read_text()) - before


@contextlib.contextmanager
def reserved_hugepages(needed: int) -> Iterator[None]:
    """*needed* 2 MiB pages of this block's own inside it, or HugePagesUnavailable.

    As root the pool grows by *needed* and shrinks by as much after; otherwise
    the pool must already have that many free (shared with whoever else uses
    it)."""
    if not HUGE_2M.exists():
        raise HugePagesUnavailable(f"no 2 MiB huge page support ({HUGE_2M} missing)")
    if os.geteuid() != 0 or not os.access(NR_HUGEPAGES, os.W_OK):
        free = free_hugepages()
        if free >= needed:
            yield
            return
        raise HugePagesUnavailable(f"needs {needed} free 2 MiB huge pages ({free} free) and "
                                   f"root to raise {NR_HUGEPAGES}")
    added = _resize(needed)
    try:
        if added < needed:
            raise HugePagesUnavailable(
                f"the kernel added {added} of the {needed} 2 MiB huge pages asked for "
                f"({NR_HUGEPAGES} = {NR_HUGEPAGES.read_text().strip()}; memory too "
                "fragmented?)")
        yield
    finally:
        _resize(-added)


@contextlib.contextmanager
def hugepages_or_skip(needed: int) -> Iterator[None]:
    """For a test: :func:`reserved_hugepages`, or a pytest skip naming what
    is missing and how to provide it."""
    import pytest

    try:
        with reserved_hugepages(needed):
            yield
    except HugePagesUnavailable as e:
        pytest.skip(f"{e}: as root, echo {needed} > {NR_HUGEPAGES}")
