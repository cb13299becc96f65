"""What every test guest's host-side agent shares: talking over the serial console."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

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


def check_verdict(line: str) -> tuple[bool, int | None]:
    """``CHECK OK ...`` -> (True, None); ``CHECK FAIL page=N ...`` -> (False, N)."""
    if "CHECK OK" in line:
        return True, None
    found = re.search(r"page=(\d+)", line)
    return False, int(found.group(1)) if found else None
