"""Two network namespaces joined by a veth pair, for restores "across hosts"
on one machine: the destination QEMU in one namespace, the loader in the
other, ``tc netem`` adding delay on the link.

    with veth_pair() as link:               # skip-worthy problems: netns_missing()
        link.delay(10)                      # +10 ms round trip (netem on one end)
        with link.inside(link.ns_b):        # processes started here live in ns_b
            vm = launch_destination()
        loader_prefix = link.exec_prefix(link.ns_a)   # ["ip", "netns", "exec", ns_a]

Delay: ``tc netem`` where the kernel has it (:func:`netem_missing`).  Where
it does not (this project's 6.18 kernel: no sch_netem, and none of the other
qdiscs that could hold packets for a time, fq or etf, either; it has htb,
tbf, the fifos and ingress, which shape rate but add no fixed delay),
:func:`delay_mechanism` says ``relay``: a
:class:`pytest_fastsnap.restore.delay_relay.DelayRelay` whose sockets
:meth:`VethPair.socket_in` makes inside a namespace, so the delayed bytes
still cross the veth pair.

Names carry our pid (``fsn<pid>x<n>a``/``b``), so :func:`sweep_stale` removes
the namespaces of a process that was SIGKILLed before its cleanup ran; a
namespace's veth end goes with it.  Only 10.233.<n>.1/.2 inside the two
namespaces are used: nothing changes in the machine's own network namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
_STALE = re.compile(r"fsn(\d+)x\d+[ab]")
_counter = itertools.count()
_lock = threading.Lock()


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be made (message: the command and its error)."""


def _run(*args: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")


def netns_missing() -> str | None:
    """None when veth pairs between namespaces can be made here, else what is
    missing (one line, for a skip)."""
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install {package})"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    probe = f"fsn{os.getpid()}x999999a"  # matches _STALE: swept if we die here
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          timeout=30, check=False)
    if proc.returncode != 0:
        return f"`ip netns add` failed: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=30,
                   check=False)
    return None


def netem_missing(link: VethPair) -> str | None:
    """None when ``tc qdisc ... netem`` works on *link*, else why not (one line)."""
    try:
        link.delay(1)
    except NetnsError as err:
        return (f"tc netem unusable, so no delay can be added: {err} (the kernel needs "
                "CONFIG_NET_SCH_NETEM / the sch_netem module)")
    link.delay(0)
    return None


@functools.cache
def delay_mechanism() -> tuple[str, str]:
    """How delay is added on a veth pair here, probed once per process on a
    throw-away namespace's loopback: ``("netem", "")`` when ``tc qdisc ...
    netem`` works, else ``("relay", why netem cannot be used)``.  Callers
    check :func:`netns_missing` first."""
    probe = f"fsn{os.getpid()}x999998a"     # matches _STALE: swept if we die here
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root",
             "netem", "delay", "1ms")
        return ("netem", "")
    except NetnsError as err:
        return ("relay", f"tc netem unusable: {err} (the kernel needs CONFIG_NET_SCH_NETEM "
                "/ the sch_netem module)")
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=30,
                       check=False)


def sweep_stale() -> list[str]:
    """Delete namespaces named for processes that no longer exist."""
    removed = []
    for path in NETNS_DIR.glob("fsn*") if NETNS_DIR.is_dir() else ():
        m = _STALE.fullmatch(path.name)
        if m and not Path(f"/proc/{m[1]}").exists():
            subprocess.run(["ip", "netns", "delete", path.name], capture_output=True,
                           timeout=30, check=False)
            removed.append(path.name)
    return removed


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(err)}")


@dataclass
class VethPair:
    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str
    addr_a: str
    addr_b: str

    def exec_prefix(self, ns: str) -> list[str]:
        """Command prefix that runs a program in *ns* (``ip netns exec`` execs
        it: the pid stays the program's)."""
        return ["ip", "netns", "exec", ns]

    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """The calling thread is in *ns* for the block: children it starts stay
        there; other threads are not affected."""
        with _lock:     # one thread switching at a time keeps the bookkeeping simple
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                target = os.open(NETNS_DIR / ns, os.O_RDONLY)
                try:
                    _setns(target)
                finally:
                    os.close(target)
                try:
                    yield
                finally:
                    _setns(own)
            finally:
                os.close(own)

    def socket_in(self, ns: str, family: int = socket.AF_INET) -> socket.socket:
        """A new TCP socket of network namespace *ns* (a socket keeps the
        namespace it was made in, whichever thread uses it later)."""
        with self.inside(ns):
            return socket.socket(family, socket.SOCK_STREAM)

    def delay(self, ms: float) -> None:
        """netem delay *ms* on ns_a's end (so the round trip grows by *ms*); 0
        removes it.  A large queue limit: netem's default (1000 packets) drops
        a fast stream's packets at 10 ms."""
        if ms:
            _run("ip", "netns", "exec", self.ns_a, "tc", "qdisc", "replace", "dev", self.dev_a,
                 "root", "netem", "delay", f"{ms}ms", "limit", "1000000")
        else:
            subprocess.run(["ip", "netns", "exec", self.ns_a, "tc", "qdisc", "del", "dev",
                            self.dev_a, "root"], capture_output=True, timeout=30, check=False)

    def remove(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30,
                           check=False)

    def exists(self) -> bool:
        return (NETNS_DIR / self.ns_a).exists() or (NETNS_DIR / self.ns_b).exists()


@contextlib.contextmanager
def veth_pair() -> Iterator[VethPair]:
    """Make two namespaces joined by a veth pair (10.233.n.1 in ns_a, .2 in
    ns_b); remove both however the block ends."""
    sweep_stale()
    n = next(_counter)
    pid = os.getpid()
    tag = f"{pid}x{n}"
    link = VethPair(ns_a=f"fsn{tag}a", ns_b=f"fsn{tag}b", dev_a=f"fsv{n}a{pid % 100000}",
                    dev_b=f"fsv{n}b{pid % 100000}", addr_a=f"10.233.{n % 250}.1",
                    addr_b=f"10.233.{n % 250}.2")
    try:
        _run("ip", "netns", "add", link.ns_a)
        _run("ip", "netns", "add", link.ns_b)
        _run("ip", "link", "add", link.dev_a, "netns", link.ns_a, "type", "veth", "peer", "name",
             link.dev_b, "netns", link.ns_b)
        for ns, dev, addr in ((link.ns_a, link.dev_a, link.addr_a),
                              (link.ns_b, link.dev_b, link.addr_b)):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield link
    finally:
        link.remove()
