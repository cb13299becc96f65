"""Test guests whose memory content is known exactly.

* :mod:`pytest_fastsnap.guests.tiny` - a bare-metal multiboot guest that fills a
  range with :mod:`pytest_fastsnap.guests.pattern` and checks it on command;
* :mod:`pytest_fastsnap.guests.linux` - a Debian kernel with a busybox initramfs
  running a memory workload.

Both are built at set-up into a cache keyed by source hash (``fastsnap
build-images``); tests call the same functions and reuse that cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_fastsnap.guests.linux import LinuxGuest
    from pytest_fastsnap.guests.tiny import TinyGuest
    from pytest_fastsnap.qemu.machine import QemuMachine


def _arg(args: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(args[:-1]):
        if arg == flag:
            return args[i + 1]
    return None


def guest_agent(vm: QemuMachine) -> TinyGuest | LinuxGuest:
    """The agent of the test guest *vm* runs, told from its arguments alone.

    Works for any QEMU with a test guest's definition: one from
    ``guest_factory``, a destination (``device_args`` repeat the source's) or a
    guest restored with :func:`pytest_fastsnap.restore.restore`.  Both agents
    have ``self_check() -> Verdict``.  ValueError for any other guest.
    """
    from pytest_fastsnap.guests.linux import LinuxGuest
    from pytest_fastsnap.guests.tiny import KERNEL_NAME, TinyGuest, TinyParams

    kernel = _arg(vm.device_args, "-kernel")
    append = _arg(vm.device_args, "-append") or ""
    if kernel is not None and Path(kernel).name == KERNEL_NAME:
        return TinyGuest(vm, TinyParams.from_cmdline(append))
    if kernel is not None and "fastsnap.mem=" in append:
        return LinuxGuest(vm)
    raise ValueError(f"{vm.name}: not a pytest-fastsnap test guest (neither the tiny guest "
                     f"kernel {KERNEL_NAME} nor the Linux workload in its arguments), so it "
                     "has no self-check")


def build_all_images(cache_dir: Path | None = None) -> dict[str, Path]:
    """Build every guest image; returns name -> path (what ``fastsnap build-images`` prints)."""
    from pytest_fastsnap.guests.tiny import default_cache_dir, tiny_kernel

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    images: dict[str, Path] = {"tiny": tiny_kernel(cache)}
    try:
        from pytest_fastsnap.guests.linux import linux_image
    except ImportError:  # not there yet
        return images
    kernel, initrd = linux_image(cache)
    images["linux-kernel"] = kernel
    images["linux-initrd"] = initrd
    return images
