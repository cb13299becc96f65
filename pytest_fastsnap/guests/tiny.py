"""The tiny guest: a 32-bit multiboot kernel that fills RAM with a known pattern.

Sources live in ``pytest_fastsnap/guests/tiny/`` (package data); the kernel is
built with the system ``gcc``/``ld`` (``-m32 -ffreestanding``, no libc, so no
multilib) into a cache directory keyed by the source hash.

Console protocol (COM1; the machine class wires ``-serial``):

* boot: ``FASTSNAP-TINY BOOT``; after the fill ``FASTSNAP-TINY READY mode=...
  seed=0x.. start=0x.. size=0x.. pages=N zero=Z dirty=D``; a bad parameter gives
  ``FASTSNAP-TINY ERROR <why>`` and the guest stops.
* one-byte commands: ``C`` check -> ``CHECK OK pages=N gen=P`` or ``CHECK FAIL
  page=<pfn> addr=0x.. why=zero|content|gen gen=G want=W``; ``P`` -> ``PONG n=<k>
  gen=<P>``; ``S`` stop dirtying -> ``STOPPED gen=P cursor=0x..``; ``D`` resume ->
  ``DIRTYING gen=P``; ``I`` repeats the READY line.
* the workload: digits, then ``T`` (ascending) or ``R`` (seeded random order,
  each page once): read and check that many per mille of the range's pages ->
  ``TOUCH OK order=seq|rand permille=N pages=K gen=P us=.. tsc_khz=..
  lat_thresh_us=10 faulted=F lat_p50_us=.. lat_p90_us=.. lat_p99_us=..
  lat_max_us=.. lat_res=16`` or ``TOUCH FAIL page=...`` (as ``CHECK FAIL``);
  :meth:`TinyGuest.touch`.  The timing fields (the first read of every
  touched page, rdtsc against a boot-time PIT calibration) are explained in
  :mod:`pytest_fastsnap.guests.touch_latency`; the READY line carries
  ``tsc_khz=`` too.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from pytest_fastsnap.guests.agent import CHECK_RE, ConsoleAgent, check_verdict
from pytest_fastsnap.guests.pattern import PAGE_SIZE, check_range
from pytest_fastsnap.guests.touch_latency import parse_touch_latency
from pytest_fastsnap.verdict import Verdict
from pytest_fastsnap.workdirs import cache_dir

if TYPE_CHECKING:
    from pytest_fastsnap.qemu.machine import QemuMachine

SOURCE_DIR = Path(__file__).with_name("tiny")
SOURCES = ("entry.S", "tiny.c", "tiny.ld")
KERNEL_NAME = "fastsnap-tiny.elf"
# microvm boots through qboot (no SeaBIOS): ~0.1 s to guest entry under TCG
# against ~0.15 s (pc) and ~0.19 s (q35), and mapped-ram snapshots of it load.
RECOMMENDED_MACHINE = "microvm"
MACHINES = ("microvm", "pc", "q35")

CFLAGS = ("-m32", "-ffreestanding", "-fno-pic", "-fno-pie", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-mgeneral-regs-only",
          "-fno-tree-loop-distribute-patterns", "-O2", "-Wall", "-Wextra", "-Werror")

READY_RE = r"FASTSNAP-TINY (READY [^\r\n]*|ERROR [^\r\n]*)\r?\n"


class TinyBuildError(RuntimeError):
    """The tiny guest did not compile; carries the compiler output."""


class TinyGuestError(AssertionError):
    """The guest reported an error instead of becoming ready."""


@dataclass(frozen=True)
class TinyParams:
    """What the tiny guest fills and how.

    ``zero_ratio`` (0..1) makes that share of pages zero by hash; ``zero_every``
    (N > 0) additionally makes every page with ``pfn % N == 0`` zero.
    In ``dirty`` mode the non-zero pages with ``pfn % dirty_stride == 0`` are
    rewritten with increasing generations until the guest gets ``S``.
    """

    seed: int = 1
    start: int = 0x400000
    size: int = 0x1000000
    mode: str = "static"
    zero_ratio: float = 0.25
    zero_every: int = 0
    dirty_stride: int = 8

    def __post_init__(self) -> None:
        if self.mode not in ("static", "dirty"):
            raise ValueError(f"mode must be 'static' or 'dirty', not {self.mode!r}")
        if self.start % PAGE_SIZE or self.size % PAGE_SIZE or self.size <= 0:
            raise ValueError("start and size must be positive multiples of 4096")
        if self.start < 0x200000:
            raise ValueError("start must be at least 2 MiB (the kernel lives at 1 MiB)")
        if self.start + self.size > 0xFFFFF000:
            raise ValueError("the range must lie below 4 GiB (the guest is 32-bit)")
        if not 0.0 <= self.zero_ratio <= 1.0:
            raise ValueError("zero_ratio must be within [0, 1]")
        if self.zero_every < 0 or self.dirty_stride < 1:
            raise ValueError("zero_every must be >= 0 and dirty_stride >= 1")
        if not 0 <= self.seed < 1 << 64:
            raise ValueError("seed must fit in 64 bits")

    @property
    def zthresh(self) -> int:
        """zero_ratio as the guest's 16-bit threshold (hash >> 48 < zthresh)."""
        return round(self.zero_ratio * 65536)

    @property
    def first_pfn(self) -> int:
        return self.start // PAGE_SIZE

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def end(self) -> int:
        return self.start + self.size

    def cmdline(self) -> str:
        return (f"seed={self.seed:#x} start={self.start:#x} size={self.size:#x} "
                f"mode={self.mode} zthresh={self.zthresh} zevery={self.zero_every} "
                f"dstride={self.dirty_stride}")

    @classmethod
    def from_cmdline(cls, cmdline: str) -> TinyParams:
        """The parameters :meth:`cmdline` wrote (e.g. a restored VM's ``-append``)."""
        fields = dict(re.findall(r"(\w+)=(\S+)", cmdline))
        try:
            return cls(seed=int(fields["seed"], 0), start=int(fields["start"], 0),
                       size=int(fields["size"], 0), mode=fields["mode"],
                       zero_ratio=int(fields["zthresh"]) / 65536,
                       zero_every=int(fields["zevery"]), dirty_stride=int(fields["dstride"]))
        except (KeyError, ValueError) as err:
            raise ValueError(f"not a tiny guest command line: {cmdline!r}") from err

    def min_mem(self) -> str:
        """The smallest QEMU ``-m`` (MiB, rounded up, with 2 MiB spare) that holds the range."""
        return f"{-(-(self.end + 0x200000) // 0x100000)}M"


def source_hash() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``<cache>/images`` (see :func:`pytest_fastsnap.workdirs.cache_dir`)."""
    return cache_dir("images")


def tiny_kernel(cache_dir: Path | None = None) -> Path:
    """The built tiny guest kernel (ELF32 multiboot), building it if needed.

    Cached as ``<cache_dir>/tiny-<source hash>/fastsnap-tiny.elf``; concurrent
    callers (xdist workers) serialise on a file lock and the result appears
    atomically.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target_dir = cache / f"tiny-{source_hash()}"
    kernel = target_dir / KERNEL_NAME
    if kernel.exists():
        return kernel
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / "tiny.lock")):
        if kernel.exists():
            return kernel
        target_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tiny-build-", dir=target_dir) as tmp:
            out = Path(tmp) / KERNEL_NAME
            _build(Path(tmp), out)
            os.replace(out, kernel)
    return kernel


def _run(cmd: list[str]) -> None:
    tool = shutil.which(cmd[0])
    if tool is None:
        raise TinyBuildError(f"{cmd[0]} not found: install gcc and binutils "
                             "(apt-get install gcc binutils)")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TinyBuildError(f"building the tiny guest failed: {' '.join(cmd)}\n"
                             f"{proc.stdout}{proc.stderr}")


def _build(tmp: Path, out: Path) -> None:
    objs = []
    for name in ("entry.S", "tiny.c"):
        obj = tmp / (name.rsplit(".", 1)[0] + ".o")
        _run(["gcc", *CFLAGS, "-c", str(SOURCE_DIR / name), "-o", str(obj)])
        objs.append(str(obj))
    _run(["ld", "-m", "elf_i386", "-nostdlib", "-z", "noexecstack", "--no-warn-rwx-segments",
          "-T", str(SOURCE_DIR / "tiny.ld"), "-o", str(out), *objs])


def tiny_args(kernel: Path, params: TinyParams) -> list[str]:
    """QEMU arguments that boot the tiny guest with *params*.

    Serial wiring is the machine class's job (no ``-serial`` here).  Pair with
    ``machine=RECOMMENDED_MACHINE`` (or q35/pc) and ``mem >= params.min_mem()``.
    """
    return ["-kernel", str(kernel), "-append", params.cmdline()]


@dataclass(frozen=True)
class ReadyInfo:
    mode: str
    seed: int
    start: int
    size: int
    pages: int
    zero: int
    dirty: int


class TinyGuest(ConsoleAgent):
    """Talks to a launched tiny guest over its console."""

    def __init__(self, vm: QemuMachine, params: TinyParams) -> None:
        super().__init__(vm)
        self.params = params

    def wait_ready(self, timeout: float = 30.0) -> ReadyInfo:
        """Wait for the READY line (from boot); raise TinyGuestError on ERROR."""
        last = self.ready_line(READY_RE, timeout)
        if "FASTSNAP-TINY ERROR" in last:
            raise TinyGuestError(f"{self.vm.name}: {last}")
        return _parse_ready(last)

    def command(self, byte: bytes, reply: str, timeout: float = 30.0) -> str:
        """Send a one-byte command; return the reply line matching regex *reply*."""
        return self.exchange(byte, reply, timeout)

    def self_check(self, timeout: float = 60.0) -> Verdict:
        """The guest checks its whole range; falsy on failure, naming the first
        bad page (``details``: ``page`` (pfn), ``addr``, ``why``, ``gen``)."""
        return check_verdict(self.command(b"C", CHECK_RE, timeout), self.vm.name)

    def touch(self, permille: int, order: str = "seq", timeout: float = 300.0) -> Verdict:
        """The workload: the guest reads and checks *permille* per mille of its
        pages, ascending (``seq``) or in its seeded random order (``rand``,
        :func:`pytest_fastsnap.guests.pattern.touch_order`); falsy on a bad
        page, naming it.  ``details``: ``pages`` touched, ``order``, ``line``,
        and ``latency``: the guest-timed first reads
        (:class:`~pytest_fastsnap.guests.touch_latency.TouchLatency`, None
        from a guest built before it reported them)."""
        send = touch_command(permille, order)
        line = self.command(send, r"TOUCH (OK|FAIL)[^\r\n]*\r?\n", timeout)
        verdict = check_verdict(line.replace("TOUCH", "CHECK", 1), self.vm.name)
        latency = parse_touch_latency(line) if verdict else None
        # the guest's own TOUCH line in details
        return Verdict(verdict.ok, verdict.reason,
                       {**verdict.details, "line": line.strip(), "latency": latency})

    def last_check_line(self) -> str:
        lines = [ln for ln in self.console.text.splitlines() if ln.startswith("CHECK ")]
        return lines[-1] if lines else ""

    def ping(self, timeout: float = 10.0) -> int:
        """PONG: proves the guest runs; returns its current generation."""
        line = self.command(b"P", r"PONG n=\d+ gen=\d+\r?\n", timeout)
        return int(line.rsplit("gen=", 1)[1])

    def stop_dirtying(self, timeout: float = 10.0) -> int:
        """Freeze the dirty set (so memory stops changing); returns the generation."""
        line = self.command(b"S", r"STOPPED gen=\d+ cursor=0x[0-9a-f]+\r?\n", timeout)
        return int(re.search(r"gen=(\d+)", line).group(1))  # type: ignore[union-attr]

    def start_dirtying(self, timeout: float = 10.0) -> str:
        return self.command(b"D", r"(NOT-)?DIRTYING gen=\d+\r?\n", timeout)

    def read_range(self) -> bytes:
        """The whole pattern range through pmemsave."""
        return self.vm.memsave(self.params.start, self.params.size)

    def host_check(self) -> Verdict:
        """Read the range with pmemsave and check it against the Python pattern
        (works on a paused guest); falsy on failure, naming the first bad page."""
        verdict = check_range(self.params, self.read_range(), self.params.start)
        return Verdict(verdict.ok, f"{self.vm.name}: {verdict.reason}", verdict.details)


def touch_command(permille: int, order: str) -> bytes:
    """The bytes that start the workload (see :meth:`TinyGuest.touch`)."""
    if order not in ("seq", "rand"):
        raise ValueError(f"order must be 'seq' or 'rand', not {order!r}")
    if not 0 <= permille <= 1000:
        raise ValueError(f"permille must be within [0, 1000], not {permille}")
    return f"{permille}{'T' if order == 'seq' else 'R'}".encode()


def _parse_ready(line: str) -> ReadyInfo:
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    try:
        return ReadyInfo(mode=fields["mode"], seed=int(fields["seed"], 0),
                         start=int(fields["start"], 0), size=int(fields["size"], 0),
                         pages=int(fields["pages"]), zero=int(fields["zero"]),
                         dirty=int(fields["dirty"]))
    except (KeyError, ValueError) as err:
        raise TinyGuestError(f"unparseable READY line {line!r}") from err
