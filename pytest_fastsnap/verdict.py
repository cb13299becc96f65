"""Verdicts: the result of a check, falsy when the check failed.

Every check in pytest-fastsnap that does not raise returns a :class:`Verdict`,
so ``assert guest.self_check()`` fails exactly when the check failed, and the
assertion message says what failed::

    >>> v = Verdict.fail("self-check failed at page 1031 (gpa 0x407000)", page=1031)
    >>> bool(v), str(v)
    (False, 'self-check failed at page 1031 (gpa 0x407000)')
    >>> v.details["page"]
    1031

A verdict is deliberately not a tuple, a list or None: none of those can be
asserted the wrong way round by accident.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class VerdictFailed(AssertionError):
    """Raised by :meth:`Verdict.raise_for_failure`; carries the verdict."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        super().__init__(verdict.reason)


@dataclass(frozen=True)
class Verdict:
    """Outcome of a check: ``ok``, a one-line ``reason`` naming what was checked
    or what failed, and ``details`` (page numbers, addresses, raw lines)."""

    ok: bool
    reason: str
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def pass_(cls, reason: str, **details: Any) -> Verdict:
        return cls(True, reason, details)

    @classmethod
    def fail(cls, reason: str, **details: Any) -> Verdict:
        return cls(False, reason, details)

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return self.reason

    def __repr__(self) -> str:
        # pytest's assertion rewriting prints this: make it the whole story.
        return f"<Verdict {'PASS' if self.ok else 'FAIL'}: {self.reason}>"

    def raise_for_failure(self) -> Verdict:
        """Raise :class:`VerdictFailed` (an AssertionError) if the check failed;
        return the verdict otherwise, so calls chain."""
        if not self.ok:
            raise VerdictFailed(self)
        return self
