"""What every test guest's host-side agent shares: talking over the serial console."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pytest_fastsnap.verdict import Verdict

if TYPE_CHECKING:
    from pytest_fastsnap.qemu.console import Console
    from pytest_fastsnap.qemu.machine import QemuMachine

CHECK_RE = r"CHECK (OK|FAIL)[^\r\n]*\r?\n"


class ConsoleAgent:
    """Talks to a launched guest over its console (COM1 / ttyS0)."""

    def __init__(self, vm: QemuMachine) -> None:
        self.vm = vm

    @property
    def console(self) -> Console:
        if self.vm.console is None:
            raise RuntimeError(f"{self.vm.name}: not launched")
        return self.vm.console

    def ready_line(self, pattern: str, timeout: float) -> str:
        """The line matching *pattern* printed since boot (searched from the start)."""
        return self.console.read_until(pattern, timeout=timeout, since=0).strip() \
            .splitlines()[-1]

    def exchange(self, data: bytes, reply: str, timeout: float) -> str:
        """Send *data*; return the first reply line after it matching regex *reply*."""
        mark = self.console.mark()
        self.console.write(data)
        return self.console.read_until(reply, timeout=timeout, since=mark).strip() \
            .splitlines()[-1]


def check_verdict(line: str, who: str) -> Verdict:
    """A guest's ``CHECK OK ...`` / ``CHECK FAIL page=N ...`` line as a :class:`Verdict`.

    The failure reason names the page and, when the guest reports it
    (``addr=``), its guest-physical address; ``details`` holds every
    ``key=value`` of the line (ints where they parse) and the raw ``line``.
    """
    line = line.strip()
    fields: dict[str, Any] = {}
    for key, value in re.findall(r"(\w+)=(\S+)", line):
        try:
            fields[key] = int(value, 0)
        except ValueError:
            fields[key] = value
    if line.startswith("CHECK OK"):
        return Verdict.pass_(f"{who}: self-check passed ({line})", line=line, **fields)
    if "page" not in fields:
        return Verdict.fail(f"{who}: self-check failed: {line!r}", line=line, **fields)
    where = f" (gpa {fields['addr']:#x})" if isinstance(fields.get("addr"), int) else ""
    rest = " ".join(f"{k}={v}" for k, v in re.findall(r"(\w+)=(\S+)", line)
                    if k not in ("page", "addr"))
    return Verdict.fail(f"{who}: self-check failed at page {fields['page']}{where}"
                        + (f": {rest}" if rest else ""), line=line, **fields)
