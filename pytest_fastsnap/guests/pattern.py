"""The tiny guest's memory pattern, computed on the host.

This mirrors ``tiny/tiny.c`` exactly; change both or neither.  All words are
64-bit little-endian, 512 per 4 KiB page; ``pfn`` is the guest-physical page
number (address >> 12), not an index into the range::

    mix(x)      = splitmix64 finaliser of x + 0x9E3779B97F4A7C15
    T[i]        = mix(seed + i * 0xD1B54A32D192ED03)
    zero(pfn)   = (zero_every and pfn % zero_every == 0) or mix(seed ^ pfn) >> 48 < zthresh
    h(pfn, gen) = mix(mix(seed ^ pfn) + gen)
    word 0      = gen;   word i (1..511) = T[i] ^ h(pfn, gen)

Zero pages are all zero.  In ``dirty`` mode the guest rewrites the *dirty set*
(non-zero pages with ``pfn % dirty_stride == 0``) in ascending order, pass after
pass, pass p writing generation p; so at any instant the dirty set reads
p, ..., p, p-1, ..., p-1 in pfn order (one edge, possibly at either end) and
every other non-zero page holds generation 0.

A page is computed as one big-integer XOR of the per-seed template with its
hash repeated 512 times, so 64 MiB of expectation takes well under a second.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from pytest_fastsnap.verdict import Verdict

PAGE_SIZE = 4096
WORDS = PAGE_SIZE // 8
MASK64 = (1 << 64) - 1
# 1 in every 64-bit word: h * _ONES repeats h in all 512 words.
_ONES = sum(1 << (64 * i) for i in range(WORDS))
ZERO_PAGE = bytes(PAGE_SIZE)


class PatternParams(Protocol):
    """What the pattern depends on (``TinyParams`` satisfies it)."""

    @property
    def seed(self) -> int: ...
    @property
    def zthresh(self) -> int: ...
    @property
    def zero_every(self) -> int: ...
    @property
    def dirty_stride(self) -> int: ...
    @property
    def mode(self) -> str: ...


def mix(z: int) -> int:
    """splitmix64's output function (mod 2**64)."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=16)
def _template(seed: int) -> int:
    """T as one 4096-byte little-endian integer, word 0 zero."""
    seed &= MASK64
    words = [0] + [mix((seed + i * 0xD1B54A32D192ED03) & MASK64) for i in range(1, WORDS)]
    return int.from_bytes(b"".join(w.to_bytes(8, "little") for w in words), "little")


def page_is_zero(params: PatternParams, pfn: int) -> bool:
    """Is page *pfn* one the guest leaves all zero?"""
    if params.zero_every and pfn % params.zero_every == 0:
        return True
    return (mix((params.seed & MASK64) ^ pfn) >> 48) < params.zthresh


def page_is_dirty(params: PatternParams, pfn: int) -> bool:
    """Does the guest keep rewriting page *pfn* (``dirty`` mode only)?"""
    return (params.mode == "dirty" and pfn % params.dirty_stride == 0
            and not page_is_zero(params, pfn))


def page_hash(seed: int, pfn: int, generation: int) -> int:
    seed &= MASK64
    return mix((mix(seed ^ pfn) + generation) & MASK64)


def page_content(params: PatternParams, pfn: int, generation: int = 0) -> bytes:
    """The 4096 bytes of page *pfn* at *generation* (all zero for a zero page)."""
    if page_is_zero(params, pfn):
        return ZERO_PAGE
    return _pattern_page(params.seed, pfn, generation)


def _pattern_page(seed: int, pfn: int, generation: int) -> bytes:
    h = page_hash(seed, pfn, generation)
    value = _template(seed & MASK64) ^ (h * _ONES)
    # word 0 of the template is 0, so word 0 is h; replace it with the generation.
    value ^= h ^ (generation & MASK64)
    return value.to_bytes(PAGE_SIZE, "little")


def page_generation(page: bytes) -> int:
    """The generation a (non-zero) page claims in its header word."""
    return int.from_bytes(page[:8], "little")


def expected_range(params: PatternParams, start: int, size: int,
                   generations: dict[int, int] | None = None) -> bytes:
    """Expected bytes of [start, start+size), each page at generation 0 unless
    *generations* (pfn -> generation) says otherwise."""
    _check_aligned(start, size)
    gens = generations or {}
    first = start // PAGE_SIZE
    return b"".join(page_content(params, pfn, gens.get(pfn, 0))
                    for pfn in range(first, first + size // PAGE_SIZE))


def expected_digest(params: PatternParams, start: int, size: int, algorithm: str = "sha256",
                    generations: dict[int, int] | None = None) -> str:
    """hashlib hex digest of :func:`expected_range` (computed page by page)."""
    import hashlib

    _check_aligned(start, size)
    gens = generations or {}
    digest = hashlib.new(algorithm)
    first = start // PAGE_SIZE
    for pfn in range(first, first + size // PAGE_SIZE):
        digest.update(page_content(params, pfn, gens.get(pfn, 0)))
    return digest.hexdigest()


@dataclass(frozen=True)
class BadPage:
    """The first page that breaks the pattern, and how."""

    pfn: int
    why: str          # "zero" | "content" | "gen"
    generation: int   # what the page claims (0 for zero pages)
    detail: str = ""

    @property
    def addr(self) -> int:
        return self.pfn * PAGE_SIZE

    def __str__(self) -> str:
        return (f"page {self.pfn} ({self.addr:#x}): {self.why}, generation {self.generation}"
                + (f"; {self.detail}" if self.detail else ""))


def check_range(params: PatternParams, data: bytes, start: int,
                allow_torn: bool = True) -> Verdict:
    """Verify guest memory *data* read from guest-physical *start*.

    Every zero page must be zero; every other page must equal the pattern at
    the generation stored in it; pages outside the dirty set must be at
    generation 0; the dirty set must show the one-edge shape p..p, p-1..p-1.

    A dirty guest stopped (or saved live) in the middle of rewriting a page
    leaves that one page *torn*: the guest writes the header word last, so it
    still says p-1 while each other word holds generation p-1 or p.  With
    *allow_torn* exactly one such page is accepted, and only where the guest
    can be writing: at the edge (the first page after the p run, or the first
    dirty page).  Returns a :class:`Verdict`, falsy on failure, naming the first
    bad page (``details["bad_page"]`` is its :class:`BadPage`).
    """
    bad = first_bad_page(params, data, start, allow_torn)
    if bad is None:
        return Verdict.pass_(f"pattern check passed: {len(data) // PAGE_SIZE} pages from "
                             f"{start:#x}")
    return Verdict.fail(f"pattern check failed at page {bad.pfn} (gpa {bad.addr:#x}): "
                        f"{bad.why}, generation {bad.generation}"
                        + (f"; {bad.detail}" if bad.detail else ""),
                        page=bad.pfn, addr=bad.addr, why=bad.why, bad_page=bad)


def first_bad_page(params: PatternParams, data: bytes, start: int,
                   allow_torn: bool = True) -> BadPage | None:
    """The first page of *data* that breaks the pattern, or None (the search
    behind :func:`check_range`; see there)."""
    _check_aligned(start, len(data))
    first = start // PAGE_SIZE
    top: int | None = None      # generation of the first dirty page
    edge_seen = False
    torn_seen = False
    view = memoryview(data)
    for index in range(len(data) // PAGE_SIZE):
        pfn = first + index
        page = view[index * PAGE_SIZE:(index + 1) * PAGE_SIZE]
        if page_is_zero(params, pfn):
            if page != ZERO_PAGE:
                return BadPage(pfn, "zero", 0, _first_diff(page, ZERO_PAGE))
            continue
        gen = page_generation(page)
        want_page = _pattern_page(params.seed, pfn, gen)
        dirty = page_is_dirty(params, pfn)
        if page != want_page:
            at_edge = top is None or (not edge_seen and gen == top - 1)
            if not (dirty and allow_torn and not torn_seen and at_edge
                    and _is_torn(page, want_page, _pattern_page(params.seed, pfn, gen + 1))):
                return BadPage(pfn, "content", gen, _first_diff(page, want_page))
            torn_seen = True
        if not dirty:
            if gen != 0:
                return BadPage(pfn, "gen", gen, "not in the dirty set, so generation 0")
            continue
        if top is None:
            top = gen
        elif gen == top and not edge_seen:
            pass
        elif top > 0 and gen == top - 1:
            edge_seen = True
        else:
            return BadPage(pfn, "gen", gen,
                           f"dirty set must read {top}..{top} then {top - 1}..{top - 1}")
    return None


def _is_torn(page: bytes | memoryview, old: bytes, new: bytes) -> bool:
    """Every word after the header is either the old or the new generation's."""
    got = bytes(page)
    return all(got[i:i + 8] in (old[i:i + 8], new[i:i + 8]) for i in range(8, PAGE_SIZE, 8))


def dirty_generations(params: PatternParams, data: bytes, start: int) -> dict[int, int]:
    """pfn -> generation of every dirty-set page in *data* (for reports)."""
    first = start // PAGE_SIZE
    return {pfn: page_generation(data[(pfn - first) * PAGE_SIZE:][:8])
            for pfn in range(first, first + len(data) // PAGE_SIZE)
            if page_is_dirty(params, pfn)}


def count_zero_pages(params: PatternParams, pfns: Iterable[int]) -> int:
    return sum(1 for pfn in pfns if page_is_zero(params, pfn))


def _first_diff(got: bytes | memoryview, want: bytes) -> str:
    got_b = bytes(got)
    for i, (a, b) in enumerate(zip(got_b, want, strict=True)):
        if a != b:
            return f"first difference at byte {i:#x}: {a:#04x}, expected {b:#04x}"
    return "no difference"


def _check_aligned(start: int, size: int) -> None:
    if start % PAGE_SIZE or size % PAGE_SIZE:
        raise ValueError(f"start {start:#x} and size {size:#x} must be multiples of {PAGE_SIZE}")


def touch_count(pages: int, permille: int) -> int:
    """How many pages the tiny guest's ``T``/``R`` workload touches (tiny.c ``touch``)."""
    return pages // 1000 * permille + pages % 1000 * permille // 1000


def touch_order(seed: int, pages: int, permille: int, random: bool) -> list[int]:
    """Indexes (from the range's first page) the tiny guest touches, in order:
    ascending for ``T``, tiny.c's seeded permutation for ``R``."""
    count = touch_count(pages, permille)
    if not random:
        return list(range(count))
    bits = 0
    while bits < 32 and (1 << bits) < pages:
        bits += 1
    mask = (1 << bits) - 1
    k = (mix(seed & MASK64) & 0xFFFFFFFF) | 1
    add = (seed >> 32) & 0xFFFFFFFF

    def permute(x: int) -> int:
        for _ in range(3):
            x = (x * k) & mask
            x ^= x >> (bits // 2 + 1)
            x = (x + add) & mask
        return x

    out: list[int] = []
    x = 0
    while len(out) < count:
        idx = permute(x)
        x += 1
        if idx < pages:
            out.append(idx)
    return out
