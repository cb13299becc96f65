"""Is userfaultfd usable here, and if not, which step failed?"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass

_USERFAULTFD_IOC_NEW = 0xAA00  # _IO(0xAA, 0x00)
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
_O_CLOEXEC = 0o2000000
_O_NONBLOCK = 0o4000


@dataclass(frozen=True)
class UffdStatus:
    usable: bool
    how: str  # "/dev/userfaultfd", "syscall" or the failure reason

    def __str__(self) -> str:
        return f"yes ({self.how})" if self.usable else f"no: {self.how}"


def probe_userfaultfd() -> UffdStatus:
    """Try /dev/userfaultfd, then the syscall; name the failing step (as QEMU does)."""
    libc = ctypes.CDLL(None, use_errno=True)
    failures = []
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        failures.append(f"/dev/userfaultfd: {err.strerror}")
    else:
        try:
            fd = libc.ioctl(dev, _USERFAULTFD_IOC_NEW, _O_CLOEXEC | _O_NONBLOCK)
            if fd >= 0:
                os.close(fd)
                return UffdStatus(True, "/dev/userfaultfd")
            failures.append(f"USERFAULTFD_IOC_NEW: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(dev)
    nr = _SYS_USERFAULTFD.get(platform.machine())
    if nr is not None:
        fd = libc.syscall(nr, _O_CLOEXEC | _O_NONBLOCK)
        if fd >= 0:
            os.close(fd)
            return UffdStatus(True, "syscall")
        err = ctypes.get_errno()
        hint = ""
        if err == errno.EPERM:
            hint = " (vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE)"
        failures.append(f"userfaultfd(2): {os.strerror(err)}{hint}")
    return UffdStatus(False, "; ".join(failures))
