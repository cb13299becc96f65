"""The Linux guest: a Debian kernel plus a busybox initramfs with a memory workload.

Built at set-up (``fastsnap build-images``) into the image cache:

* the kernel comes from ``apt-get download linux-image-<version>-<flavour>``
  (flavour ``cloud-amd64`` by default, ``FASTSNAP_LINUX_FLAVOUR`` to change it,
  ``FASTSNAP_LINUX_DEB=/path/x.deb`` to use a .deb you already have), unpacked
  with ``dpkg-deb -x``;
* the initramfs (cpio newc, gzip, written here so device nodes need no root) holds
  ``/bin/busybox`` from busybox-static, ``/init`` and ``/bin/fastsnap-mem``
  (``gcc -static``).

Console protocol (ttyS0, line based; ``-append`` must carry ``console=ttyS0``):
``FASTSNAP-LINUX READY mem=<MiB> pages=N seed=0x..`` once the workload has filled
its memory; then ``ping`` -> ``pong <n>``, ``check`` -> ``CHECK OK pages=N`` or
``CHECK FAIL page=<index> gen=G``, ``touch <k>`` -> ``TOUCHED <k> gen=G``,
``info`` -> the READY line.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from pytest_fastsnap.guests.agent import CHECK_RE, ConsoleAgent, check_verdict
from pytest_fastsnap.guests.tiny import default_cache_dir
from pytest_fastsnap.verdict import Verdict

SOURCE_DIR = Path(__file__).with_name("linux")
SOURCES = ("init", "fastsnap-mem.c")
BUSYBOX = Path("/bin/busybox")
DEFAULT_FLAVOUR = "cloud-amd64"
# q35 and microvm both boot it; q35 is what the rest of the suite uses.
RECOMMENDED_MACHINE = "q35"
READY_RE = r"FASTSNAP-LINUX (READY|ERROR)[^\r\n]*\r?\n"


class LinuxImageError(RuntimeError):
    """The Linux guest could not be built; says what to install or run."""


@dataclass(frozen=True)
class LinuxImage:
    kernel: Path
    initrd: Path
    package: str


def _flavour() -> str:
    return os.environ.get("FASTSNAP_LINUX_FLAVOUR", DEFAULT_FLAVOUR)


def _source_hash(extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes())
    return digest.hexdigest()[:16]


def linux_image(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """(kernel, initrd) of the Linux guest, building them if needed (under a lock)."""
    image = linux_image_info(cache_dir)
    return image.kernel, image.initrd


def linux_image_info(cache_dir: Path | None = None) -> LinuxImage:
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    deb = os.environ.get("FASTSNAP_LINUX_DEB")
    key = f"deb={deb}" if deb else f"flavour={_flavour()}"
    target = cache / f"linux-{_source_hash(key)}"
    done = target / "package"
    if done.exists():
        return LinuxImage(target / "vmlinuz", target / "initrd.gz", done.read_text().strip())
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / "linux.lock")):
        if not done.exists():
            target.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="linux-build-", dir=target) as tmp:
                package = _build(Path(tmp), Path(deb) if deb else None, target)
                staged = Path(tmp) / "package"
                staged.write_text(package + "\n")
                os.replace(staged, done)
    return LinuxImage(target / "vmlinuz", target / "initrd.gz", done.read_text().strip())


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    if shutil.which(cmd[0]) is None:
        raise LinuxImageError(f"{what}: {cmd[0]} not found")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    if proc.returncode != 0:
        raise LinuxImageError(f"{what} failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def kernel_package() -> str:
    """The versioned kernel package behind linux-image-<flavour> (apt-cache)."""
    meta = f"linux-image-{_flavour()}"
    out = _run(["apt-cache", "depends", meta], f"resolving {meta}")
    for line in out.splitlines():
        found = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if found:
            return found.group(1)
    raise LinuxImageError(f"{meta} names no linux-image package; run `apt-get update` "
                          f"and check `apt-cache depends {meta}`")


def _apt_update() -> None:
    """Refresh apt's lists (a fresh machine may have none) when we may."""
    if os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)


def _download(tmp: Path) -> tuple[Path, str]:
    try:
        package = kernel_package()
    except LinuxImageError:
        _apt_update()
        package = kernel_package()
    proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        _apt_update()
        proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True,
                              text=True, check=False)
    debs = sorted(tmp.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise LinuxImageError(
            f"cannot download the kernel package {package}: run "
            f"`apt-get update && apt-get download {package}` and retry, or point "
            f"FASTSNAP_LINUX_DEB at the .deb\n{proc.stdout}{proc.stderr}")
    return debs[0], package


def _build(tmp: Path, deb: Path | None, target: Path) -> str:
    if deb is None:
        deb, package = _download(tmp)
    else:
        package = deb.name.split("_")[0]
    root = tmp / "deb"
    _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise LinuxImageError(f"{deb.name} holds no boot/vmlinuz-*")
    if not BUSYBOX.exists():
        raise LinuxImageError(f"{BUSYBOX} missing: apt-get install busybox-static")
    workload = tmp / "fastsnap-mem"
    _run(["gcc", "-static", "-O2", "-Wall", "-o", str(workload),
          str(SOURCE_DIR / "fastsnap-mem.c")],
         "building fastsnap-mem (needs gcc and libc6-dev)")
    entries = [
        CpioEntry("dev", 0o040755), CpioEntry("proc", 0o040755), CpioEntry("sys", 0o040755),
        CpioEntry("bin", 0o040755), CpioEntry("tmp", 0o041777),
        CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
        CpioEntry("dev/ttyS0", 0o020660, rdev=(4, 64)),
        CpioEntry("dev/null", 0o020666, rdev=(1, 3)),
        CpioEntry("bin/busybox", 0o100755, BUSYBOX.read_bytes()),
        CpioEntry("bin/sh", 0o120777, b"busybox"),
        CpioEntry("bin/fastsnap-mem", 0o100755, workload.read_bytes()),
        CpioEntry("init", 0o100755, (SOURCE_DIR / "init").read_bytes()),
    ]
    initrd = tmp / "initrd.gz"
    initrd.write_bytes(gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0))
    shutil.copyfile(kernels[-1], tmp / "vmlinuz")
    os.replace(tmp / "vmlinuz", target / "vmlinuz")
    os.replace(initrd, target / "initrd.gz")
    return package


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: list[CpioEntry]) -> bytes:
    """A cpio "newc" archive (what the kernel unpacks as initramfs)."""
    out = bytearray()

    def header(ino: int, entry: CpioEntry) -> bytes:
        name = entry.name.encode() + b"\0"
        fields = (ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, entry.rdev[0],
                  entry.rdev[1], len(name), 0)
        return b"070701" + b"".join(f"{v:08x}".encode() for v in fields) + name

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        out += header(ino, entry)
        pad()
        out += entry.data
        pad()
    return bytes(out)


def linux_args(kernel: Path, initrd: Path, mem_mib: int = 16, seed: int = 1,
               extra_append: str = "") -> list[str]:
    """QEMU arguments booting the Linux guest (serial wiring is the machine class's)."""
    append = (f"console=ttyS0 quiet loglevel=1 panic=-1 fastsnap.mem={mem_mib} "
              f"fastsnap.seed={seed:#x} {extra_append}").strip()
    return ["-kernel", str(kernel), "-initrd", str(initrd), "-append", append]


class LinuxGuest(ConsoleAgent):
    """Talks to a launched Linux guest's workload over ttyS0."""

    def wait_ready(self, timeout: float = 120.0) -> str:
        last = self.ready_line(READY_RE, timeout)
        if "ERROR" in last:
            raise AssertionError(f"{self.vm.name}: {last}")
        return last

    def command(self, text: str, reply: str, timeout: float = 60.0) -> str:
        return self.exchange(text.encode() + b"\n", reply, timeout)

    def ping(self, timeout: float = 30.0) -> int:
        return int(self.command("ping", r"pong \d+\r?\n", timeout).split()[-1])

    def self_check(self, timeout: float = 60.0) -> Verdict:
        """The workload checks its memory; falsy on failure, naming the first
        bad page (an index into the workload's buffer, ``details["page"]``)."""
        return check_verdict(self.command("check", CHECK_RE, timeout), self.vm.name)
