"""Private libvirt daemons and domains for tests: nothing touches a system libvirt.

As root, libvirtd and virtlogd use fixed paths (``/run/libvirt``,
``/var/lib/libvirt``, ``/var/log/libvirt``, ``/var/cache/libvirt``,
``/etc/libvirt``) that no option or environment variable moves.
:class:`PrivateLibvirt` therefore starts them in their own mount namespace
(``unshare -m``) where those directories are bind mounts of directories under
its *root*; clients reach the daemon through the socket file under *root*
(``qemu:///system?socket=ROOT/run/libvirt/libvirt-sock``).  Its ``qemu.conf``
runs QEMU as root without cgroups, namespaces or a security driver.
:meth:`PrivateLibvirt.stop` destroys every domain, stops the daemons, kills
whatever still lives in the namespace (and says so), and removes *root*.

:class:`LibvirtDomain` is a transient domain whose COM1 is a unix socket the
test listens on, so :class:`~pytest_fastsnap.guests.tiny.TinyGuest` talks to it
as to a :class:`~pytest_fastsnap.qemu.machine.QemuMachine` (``console``,
``name``, ``memsave``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

from pytest_fastsnap.qemu import process
from pytest_fastsnap.qemu.console import Console
from pytest_fastsnap.workdirs import NAMESPACE_MARKER, mount_namespace, socket_path

TOOLS = ("libvirtd", "virtlogd", "virsh", "unshare")
MIN_VERSION = (11, 2)  # virsh save --image-format sparse
# Directory under root -> what it hides inside the namespace.
BINDS = {"run": "/run", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
         "cache": "/var/cache/libvirt", "etc": "/etc/libvirt"}
LIBVIRTD_CONF = """\
auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_rw_perms = "0700"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
"""
VIRTLOGD_CONF = 'log_outputs = "3:file:/var/log/libvirt/virtlogd.log"\n'


class LibvirtError(RuntimeError):
    """libvirt is missing, too old, or its daemons did not start (the message says which)."""


def libvirt_version() -> str | None:
    """``virsh --version`` (the client library's version), or None without virsh."""
    if shutil.which("virsh") is None:
        return None
    out = subprocess.run(["virsh", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def unavailable_reason() -> str | None:
    """Why private libvirt daemons cannot run here, or None."""
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return (f"libvirt is not installed: {tool} not found on PATH "
                    "(scripts/install-system-deps.sh installs libvirt-daemon, "
                    "libvirt-daemon-driver-qemu and libvirt-clients)")
    version = libvirt_version() or "0"
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if parts < MIN_VERSION:
        return (f"libvirt {version} has no sparse save images "
                f"(virsh save --image-format sparse needs >= {'.'.join(map(str, MIN_VERSION))})")
    if os.geteuid() != 0:
        return "private libvirtd needs root (it runs in its own mount namespace)"
    for target in BINDS.values():
        if not os.path.isdir(target):
            return f"{target} does not exist: the libvirt-daemon package creates it"
    return None


def process_cmdline(pid: int) -> str:
    """A process's command line with spaces, or '?' once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return "?"


class PrivateLibvirt:
    """virtlogd + libvirtd in their own mount namespace, all state under *root*."""

    def __init__(self, root: Path, cache: Path | None = None) -> None:
        self.root = root
        # /var/cache/libvirt: QEMU capabilities, probed once per cache (seconds under TCG);
        # instances may share one.
        self.cache = cache or root / "cache"
        # The longest socket clients use; checked against sun_path here, not at connect.
        self.socket = socket_path(root / "run" / "libvirt", "libvirt-sock-ro").with_name(
            "libvirt-sock")
        self.uri = f"qemu:///system?socket={self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.namespace: str | None = None
        self.log_path = root / "daemons.log"

    def start(self, timeout: float = 180.0) -> PrivateLibvirt:
        """Start the daemons; LibvirtError with their output if they do not come up
        (then nothing of them is left)."""
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _source(self, sub: str) -> Path:
        return self.cache if sub == "cache" else self.root / sub

    def _start(self, timeout: float) -> PrivateLibvirt:
        for sub in BINDS:
            self._source(sub).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc"
        (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        (etc / "qemu.conf").write_text(QEMU_CONF)
        (etc / "virtlogd.conf").write_text(VIRTLOGD_CONF)
        mounts = " && ".join(f"mount --bind {self._source(sub)} {target}"
                             for sub, target in BINDS.items())
        script = (f"{mounts} || exit 97\n"
                  "virtlogd -d -p /run/virtlogd.pid -f /etc/libvirt/virtlogd.conf || exit 98\n"
                  "exec libvirtd -p /run/libvirtd.pid -f /etc/libvirt/libvirtd.conf\n")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
                # libvirtd (this pid after the execs) dies with us; what it and
                # virtlogd forked is left to workdirs.sweep_stale via the marker.
                preexec_fn=functools.partial(process.die_with_parent, os.getpid()))
        self.namespace = mount_namespace(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._mark_namespace()
            if self.proc.poll() is not None:
                raise LibvirtError(f"libvirtd exited with status {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            if self.socket.exists():
                res = self.virsh("version", check=False, timeout=max(1.0, deadline
                                                                      - time.monotonic()))
                if res.returncode == 0:
                    self.namespace = mount_namespace(self.proc.pid) or self.namespace
                    return self
            time.sleep(0.2)
        raise LibvirtError(f"libvirtd did not answer within {timeout:.0f} s: {self.log_tail(5)}")

    def _mark_namespace(self) -> None:
        """Once the daemons run in their own namespace, name it in *root*, so a
        later session's workdirs.sweep_stale can kill them if we are SIGKILLed."""
        ns = mount_namespace(self.proc.pid) if self.proc is not None else None
        marker = self.root / NAMESPACE_MARKER
        if ns is not None and ns != mount_namespace(os.getpid()) and not marker.exists():
            self.namespace = ns
            marker.write_text(ns)

    def sibling(self, prefix: str) -> PrivateLibvirt:
        """Another instance (not started) next to this one, sharing its QEMU cache."""
        return PrivateLibvirt(Path(tempfile.mkdtemp(prefix=prefix, dir=self.root.parent)),
                              self.cache)

    def __enter__(self) -> PrivateLibvirt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for path in (self.log_path, self.root / "log" / "libvirtd.log"):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def virsh(self, *args: str, check: bool = True, timeout: float = 120.0
              ) -> subprocess.CompletedProcess[str]:
        """``virsh -c URI ARGS``; *check* raises LibvirtError with virsh's stderr.
        Output is decoded leniently: libvirt quotes hostile image bytes (a mutated
        domain XML) in its errors, which need not be UTF-8."""
        res = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                             errors="replace", timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)}: exit {res.returncode}: "
                               f"{res.stderr.strip()}")
        return res

    def domains(self) -> list[str]:
        """Names of all domains this daemon knows (TimeoutExpired if it does not answer)."""
        res = self.virsh("list", "--all", "--name", check=False, timeout=30)
        return [n for n in res.stdout.split() if n]

    def namespace_pids(self) -> list[int]:
        """Every process in the daemons' mount namespace (daemons, QEMU)."""
        if self.namespace is None:
            return []
        return [int(p) for p in os.listdir("/proc")
                if p.isdigit() and int(p) != os.getpid()
                and mount_namespace(int(p)) == self.namespace]

    def stop(self) -> list[str]:
        """Destroy the domains, stop the daemons, remove *root*.  Returns what had to be
        killed besides libvirtd and virtlogd (a QEMU left behind is a leak)."""
        leftovers: list[str] = []
        if self.alive():
            try:
                for name in self.domains():
                    self.virsh("destroy", name, check=False, timeout=30)
            except subprocess.TimeoutExpired:
                leftovers.append("libvirtd did not answer virsh within 30 s")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pid in self.namespace_pids():
            what = process_cmdline(pid)
            if not what.startswith("virtlogd"):
                leftovers.append(f"pid {pid}: {what}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self.namespace_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.namespace_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # SIGKILL is not instant either (a loaded host, a QEMU freeing its RAM):
        # return only once the namespace is empty, so nothing outlives stop().
        deadline = time.monotonic() + 30
        while self.namespace_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers += [f"pid {pid} survived SIGKILL: {process_cmdline(pid)}"
                      for pid in self.namespace_pids()]
        shutil.rmtree(self.root, ignore_errors=True)
        return leftovers


def tiny_domain_xml(name: str, kernel: Path, cmdline: str, console: Path, mem_mib: int = 64,
                    machine: str = "q35") -> str:
    """A TCG domain booting the tiny guest with ``<kernel>``; COM1 connects to *console*."""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{mem_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(shutil.which('qemu-system-x86_64') or 'qemu-system-x86_64')}</emulator>
    <serial type='unix'>
      <source mode='connect' path='{escape(str(console))}'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class LibvirtDomain:
    """A transient domain of a :class:`PrivateLibvirt`, its console on a socket we listen on.

    Every QEMU libvirt starts for it (create, restore) connects to the socket;
    :meth:`create` and :meth:`restore` accept that connection as ``console``.
    """

    def __init__(self, libvirt: PrivateLibvirt, name: str, workdir: Path, xml: str) -> None:
        self.libvirt = libvirt
        self.name = name
        self.workdir = workdir
        self.xml_path = workdir / f"{name}.xml"
        self.xml_path.write_text(xml)
        self.console_path = self.console_path_for(workdir, name)
        self.console: Console | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.console_path))
        self._listener.listen(4)
        self._incarnation = 0

    @classmethod
    def tiny(cls, libvirt: PrivateLibvirt, name: str, workdir: Path, kernel: Path, cmdline: str,
             mem_mib: int = 64) -> LibvirtDomain:
        """A tiny-guest domain (not started yet)."""
        xml = tiny_domain_xml(name, kernel, cmdline, cls.console_path_for(workdir, name),
                              mem_mib=mem_mib)
        return cls(libvirt, name, workdir, xml)

    @staticmethod
    def console_path_for(workdir: Path, name: str) -> Path:
        return workdir / f"{name}.con"

    def attach_console(self, timeout: float = 30.0) -> None:
        """Accept the console connection of the QEMU libvirt just started."""
        self._close_console()
        self._listener.settimeout(timeout)
        conn, _ = self._listener.accept()
        self._incarnation += 1
        self.console = Console(conn, self.workdir / f"{self.name}.console{self._incarnation}.log")

    def _close_console(self) -> None:
        if self.console is not None:
            self.console.close()
            self.console = None

    def qemu_started(self, timeout: float = 0.5) -> bool:
        """Some QEMU of this domain connected to the console socket since the last
        call (QEMU connects at start-up, before it reads the stream); drains them all."""
        started = False
        self._listener.settimeout(timeout)
        while True:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                return started
            conn.close()
            started = True
            self._listener.settimeout(0.05)

    def create(self) -> LibvirtDomain:
        self.libvirt.virsh("create", str(self.xml_path))
        self.attach_console()
        return self

    def save(self, path: Path, *options: str) -> subprocess.CompletedProcess[str]:
        """``virsh save NAME PATH OPTIONS`` (no check: callers look at the result)."""
        res = self.libvirt.virsh("save", self.name, str(path), *options, check=False)
        if res.returncode == 0:
            self._close_console()
        return res

    def restore(self, path: Path, *options: str) -> LibvirtDomain:
        self.libvirt.virsh("restore", str(path), *options)
        self.attach_console()
        return self

    def state(self) -> str:
        res = self.libvirt.virsh("domstate", self.name, check=False, timeout=30)
        return res.stdout.strip() if res.returncode == 0 else "absent"

    def hmp(self, command: str) -> str:
        return self.libvirt.virsh("qemu-monitor-command", self.name, "--hmp", command).stdout

    def memsave(self, addr: int, size: int) -> bytes:
        """Guest-physical memory through QEMU's pmemsave (as QemuMachine.memsave)."""
        dump = self.workdir / f"{self.name}.pmem"
        self.hmp(f'pmemsave {addr:#x} {size:#x} "{dump}"')
        try:
            return dump.read_bytes()
        finally:
            dump.unlink(missing_ok=True)

    def close(self) -> None:
        if self.state() not in ("absent", "shut off"):
            self.libvirt.virsh("destroy", self.name, check=False, timeout=30)
        self._close_console()
        self._listener.close()
        self.console_path.unlink(missing_ok=True)
