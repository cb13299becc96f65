"""Restore a libvirt sparse save image without libvirt's daemon: the QEMU command line
comes from the image's own domain XML.

``virsh -c qemu:///embed?root=DIR domxml-to-native qemu-argv`` (libvirt's embedded
QEMU driver: in-process, no daemon, state under DIR) prints the command line
libvirt would run for the XML.  :func:`libvirt_manifest` keeps the
guest-defining part of it and drops what belongs to libvirt's own plumbing
(monitor, master key, serial chardev: QemuMachine brings its own monitor and
COM1), so a destination started with it takes the stream at ``92 + data_len``.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from pytest_fastsnap.guests.tiny import default_cache_dir
from pytest_fastsnap.restore.manifest import Manifest
from pytest_fastsnap.snapshot.format import parse

__all__ = ["LibvirtArgvError", "libvirt_manifest", "qemu_args_from_argv"]

# Options libvirt adds for its own use, dropped with their argument.
_DROP_WITH_VALUE = {"-name", "-mon", "-msg"}
_DROP_FLAGS = {"-S", "-no-shutdown"}


class LibvirtArgvError(ValueError):
    """virsh could not turn the image's domain XML into a QEMU command line (bad input,
    like a FormatError: `fastsnap restore` exits 2)."""


def _drop(option: str, value: str) -> bool:
    if option in _DROP_WITH_VALUE:
        return True
    if option == "-object":
        return '"secret"' in value or "secret," in value
    if option == "-chardev":
        return "id=charmonitor" in value or "id=charserial" in value
    if option == "-device":
        return '"chardev":"charserial' in value or "chardev=charserial" in value
    return False


def qemu_args_from_argv(argv_text: str) -> tuple[str, list[str]]:
    """(binary, guest-defining arguments) from ``domxml-to-native qemu-argv`` output."""
    words = shlex.split(argv_text)
    while words and "=" in words[0] and not words[0].startswith("-"):
        words.pop(0)  # LC_ALL=C PATH=... HOME=...
    if not words:
        raise LibvirtArgvError("virsh domxml-to-native printed no command line")
    binary, rest = words[0], words[1:]
    args: list[str] = []
    i = 0
    while i < len(rest):
        word = rest[i]
        value = rest[i + 1] if i + 1 < len(rest) else ""
        takes_value = word.startswith("-") and i + 1 < len(rest) and \
            not rest[i + 1].startswith("-")
        if word in _DROP_FLAGS:
            i += 1
            continue
        if takes_value and _drop(word, value):
            i += 2
            continue
        args += [word, value] if takes_value else [word]
        i += 2 if takes_value else 1
    return binary, args


def libvirt_manifest(snapshot: str | Path, embed_root: Path | None = None,
                     timeout: float = 300.0) -> Manifest | None:
    """The restore manifest of a libvirt sparse save image, or None for another file.

    FormatError when libvirt's header is broken (as :func:`parse` raises it);
    LibvirtArgvError when virsh is missing or refuses the XML.
    """
    if not Path(snapshot).is_file():
        return None  # the caller's own checks name what is wrong
    snap = parse(snapshot, lenient=True)
    if snap.libvirt is None:
        if any(p.name.startswith("LIBVIRT_") for p in snap.problems):
            parse(snapshot)  # raises the header's FormatError
        return None
    parse(snapshot)  # the whole image must be valid
    if shutil.which("virsh") is None:
        raise LibvirtArgvError("virsh not found on PATH: libvirt-clients turns the image's "
                               "domain XML into a QEMU command line")
    with open(snapshot, "rb") as f:
        f.seek(snap.libvirt.xml.start)
        xml = f.read(snap.libvirt.xml.size)
    root = embed_root or default_cache_dir().parent / "libvirt-embed"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(prefix="fastsnap-domxml-", suffix=".xml") as tmp:
        tmp.write(xml)
        tmp.flush()
        res = subprocess.run(["virsh", "-c", f"qemu:///embed?root={root}", "domxml-to-native",
                              "qemu-argv", "--xml", tmp.name], capture_output=True, text=True,
                             errors="replace", timeout=timeout, check=False)
    if res.returncode != 0:
        raise LibvirtArgvError(f"virsh domxml-to-native: {res.stderr.strip()}")
    binary, args = qemu_args_from_argv(res.stdout)
    return Manifest(qemu_args=tuple(args), binary=binary, offset=snap.stream_offset)
