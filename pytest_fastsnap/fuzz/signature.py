"""Signatures that group findings caused by the same defect.

Crashes: the signal plus the first meaningful frames of a gdb backtrace when
there is one, else QEMU's last stderr line with numbers masked.  Wrong memory
and hangs have no message to go by: their signature is the class plus the set
of fields the (minimised) edits touch, with indices masked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pytest_fastsnap.fuzz.mutators import Edit
from pytest_fastsnap.fuzz.outcomes import (
    LoadResult,
    internal_error_line,
    mask_numbers,
    stderr_lines,
)

__all__ = ["field_signature", "generic_target", "preliminary_signature", "stderr_signature"]

# Frames that say nothing about where the defect is.
NOISE_FRAMES = re.compile(r"^(\?\?|raise|abort|__GI_|__pthread_kill|pthread_kill|"
                          r"__assert|g_assertion|g_log|g_error|g_malloc|g_realloc|"
                          r"error_handle|error_setv|error_setg|error_propagate|"
                          r"qemu_coroutine_|coroutine_trampoline|__libc|_start|clone)")


def generic_target(name: str) -> str:
    """``dev:cpu/0.env.regs[3]`` -> ``dev:cpu/N.env.regs[N]``; block names are kept."""
    return re.sub(r"\[\d+\]", "[N]", re.sub(r"/\d+(?=[./]|$)", "/N", name))


def field_signature(cls: str, edits: Sequence[Edit]) -> str:
    fields = sorted({("truncate@" if e.kind == "truncate" else "") + generic_target(e.target)
                     for e in edits})
    return f"{cls}:{'+'.join(fields)}"


def stderr_signature(result: LoadResult) -> str:
    line = internal_error_line(result.log)
    if line is None:
        lines = stderr_lines(result.log)
        line = lines[-1] if lines else "(no output)"
    return mask_numbers(line.strip())[:200]


def preliminary_signature(result: LoadResult, edits: Sequence[Edit]) -> str:
    if result.outcome == "signal":
        return f"signal:{result.signal}:{stderr_signature(result)}"
    if result.outcome == "internal_error":
        return f"internal_error:{stderr_signature(result)}"
    return field_signature(result.outcome, edits)


def frames_signature(frames: Sequence[str], depth: int = 3) -> str | None:
    useful = [f for f in frames if not NOISE_FRAMES.match(f)]
    return "<".join(useful[:depth]) if useful else None
