"""Test guests whose memory content is known exactly.

* :mod:`pytest_fastsnap.guests.tiny` - a bare-metal multiboot guest that fills a
  range with :mod:`pytest_fastsnap.guests.pattern` and checks it on command;
* :mod:`pytest_fastsnap.guests.linux` - a Debian kernel with a busybox initramfs
  running a memory workload.

Both are built at set-up into a cache keyed by source hash (``fastsnap
build-images``); tests call the same functions and reuse that cache.
"""

from __future__ import annotations

from pathlib import Path


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
