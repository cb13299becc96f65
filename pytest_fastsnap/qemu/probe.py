"""Probe a QEMU binary: version, accelerator, migration capabilities, fast load.

Results are cached on disk per binary (path, size, mtime) under a file lock, so
xdist workers and repeated runs probe once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from pytest_fastsnap.qemu.machine import QemuError, QemuMachine
from pytest_fastsnap.qemu.qmp import QMPCommandError
from pytest_fastsnap.qemu.uffd import probe_userfaultfd
from pytest_fastsnap.workdirs import cache_dir

PROBE_FORMAT = 4
POSTCOPY_CONFLICT = "Mapped-ram migration is incompatible with postcopy"


class ProbeError(Exception):
    """The binary under test is missing or unusable; the message says what to do."""


@dataclass(frozen=True)
class QemuProbe:
    binary: str
    version: tuple[int, int, int]
    version_text: str
    capabilities: tuple[str, ...]
    parameters: tuple[str, ...]
    kvm_usable: bool
    kvm_reason: str
    nested: bool
    uffd_usable: bool
    uffd_reason: str
    fast_load: bool
    fast_load_reason: str
    machines: tuple[str, ...]
    # (alias, versioned type) from query-machines: q35 -> pc-q35-10.0, pc -> pc-i440fx-10.0
    machine_aliases: tuple[tuple[str, str], ...] = ()

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def mapped_ram(self) -> bool:
        return "mapped-ram" in self.capabilities

    def has_feature(self, name: str) -> bool:
        """A capability name, a migration parameter, or a derived feature."""
        derived = {"fast-snapshot-load": self.fast_load, "kvm": self.kvm_usable,
                   "userfaultfd": self.uffd_usable}
        if name in derived:
            return derived[name]
        return name in self.capabilities or name in self.parameters or name in self.machines

    def resolve_machine(self, machine: str) -> str:
        """The versioned machine type *machine* (an alias such as ``q35``) means here."""
        return dict(self.machine_aliases).get(machine, machine)

    def choose_accel(self, requested: str) -> tuple[str, str]:
        """Resolve auto|kvm|tcg to the accelerator used, with the reason."""
        if requested == "tcg":
            return "tcg", "requested"
        if requested == "kvm":
            if not self.kvm_usable:
                raise ProbeError(f"--fastsnap-accel=kvm but KVM is not usable: {self.kvm_reason}")
            return "kvm", "requested"
        if not self.kvm_usable:
            return "tcg", f"KVM not usable ({self.kvm_reason})"
        if self.nested:
            return "tcg", ("KVM is nested (CPU 'hypervisor' flag): first touches of guest "
                           "memory cost milliseconds there, TCG is faster for test guests")
        return "kvm", "KVM usable on bare metal"


def resolve_binary(binary: str) -> str:
    """Absolute path of *binary* (a name on PATH or a path), or ProbeError."""
    hint = "(install qemu-system-x86 >= 9.0, or pass --qemu-binary=PATH / set QEMU_BINARY)"
    if not binary:
        raise ProbeError(f"QEMU binary: empty name {hint}")
    if os.sep in binary:
        if not os.path.exists(binary):
            raise ProbeError(f"QEMU binary not found: {binary!r} (no such file) {hint}")
        if os.path.isdir(binary):
            raise ProbeError(f"QEMU binary {binary!r} is a directory, not a program")
        if not os.access(binary, os.X_OK):
            raise ProbeError(f"QEMU binary {binary!r} is not executable")
    found = shutil.which(binary)
    if found is None:
        raise ProbeError(f"QEMU binary not found: {binary!r} {hint}")
    return os.path.abspath(found)


def _run_binary(binary: str, args: list[str], timeout: float) -> str:
    """stdout of ``binary args``.  In its own process group, so a timeout kills
    whatever it started too (a wrapper script's children); ProbeError when it
    cannot be run or does not finish within *timeout* seconds."""
    try:
        proc = subprocess.Popen([binary, *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                errors="replace", start_new_session=True)
    except OSError as err:
        why = err.strerror or str(err)
        if err.errno == errno.ENOEXEC:
            why += " (not a program; a script needs a #! line)"
        raise ProbeError(f"QEMU binary {binary} cannot be run: {why}") from None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ProbeError(f"QEMU binary {binary} did not answer within {timeout:g} s "
                         f"({' '.join(args)})") from None
    return out


def _version(binary: str, timeout: float = 30.0) -> tuple[tuple[int, int, int], str]:
    out = _run_binary(binary, ["--version"], timeout)
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if not m:
        first = out.strip().splitlines()[0][:100] if out.strip() else ""
        raise ProbeError(f"QEMU binary {binary}: --version printed no QEMU version "
                         f"({f'first line: {first!r}' if first else 'nothing'})")
    return (int(m[1]), int(m[2]), int(m[3])), out.splitlines()[0].strip()


def check_binary(binary: str, timeout: float = 30.0) -> tuple[str, tuple[int, int, int], str]:
    """(absolute path, version, version line) of a QEMU binary that runs and
    answers ``--version`` within *timeout* seconds; ProbeError otherwise."""
    path = resolve_binary(binary)
    version, text = _version(path, timeout)
    return path, version, text


def _machine_types(binary: str, workdir: Path
                   ) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Machine types and aliases (query-machines): which versioned type each alias means."""
    vm = QemuMachine(binary, workdir, name="probe-machines", machine="none", mem="16M",
                     paused=True)
    try:
        vm.launch()
        found = vm.qmp("query-machines")
    finally:
        vm.shutdown()
    aliases = tuple(sorted((m["alias"], m["name"]) for m in found if m.get("alias")))
    names = {m["name"] for m in found} | {alias for alias, _ in aliases}
    return tuple(sorted(names)), aliases


def _nested() -> bool:
    try:
        return " hypervisor" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _kvm(binary: str, workdir: Path) -> tuple[bool, str]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm missing or not accessible"
    vm = QemuMachine(binary, workdir, name="probe-kvm", accel="kvm", machine="q35", mem="16M",
                     paused=True)
    try:
        vm.launch()
        kvm = vm.qmp("query-kvm")
        if kvm.get("enabled"):
            return True, "query-kvm: enabled"
        return False, f"query-kvm says {kvm}"
    except QemuError as err:
        return False, f"QEMU fails to start with -accel kvm: {str(err).splitlines()[0]}"
    finally:
        vm.shutdown()


def _migration_facts(binary: str, workdir: Path) -> tuple[tuple[str, ...], tuple[str, ...],
                                                          bool, str]:
    """Capabilities, parameters and fast-load support from an incoming QEMU.

    The postcopy host check runs in the incoming state, so probe there, and
    set mapped-ram and postcopy-ram in one call (reference §12).
    """
    vm = QemuMachine(binary, workdir, name="probe-migration", machine="q35", mem="16M",
                     incoming="defer", paused=True)
    try:
        vm.launch()
        caps = tuple(sorted(c["capability"] for c in vm.qmp("query-migrate-capabilities")))
        params = tuple(sorted(vm.qmp("query-migrate-parameters")))
        if "mapped-ram" not in caps:
            return caps, params, False, "binary has no mapped-ram capability (QEMU < 9.0)"
        try:
            vm.qmp("migrate-set-capabilities", capabilities=[
                {"capability": "mapped-ram", "state": True},
                {"capability": "postcopy-ram", "state": True}])
        except QMPCommandError as err:
            if err.desc == POSTCOPY_CONFLICT:
                return caps, params, False, f"refused: {err.desc!r} (predates fast snapshot load)"
            if err.desc.startswith("Postcopy is not supported"):
                return caps, params, False, f"host cannot do postcopy: {err.desc}"
            raise ProbeError(f"unexpected answer to mapped-ram + postcopy-ram: {err.desc}") \
                from None
        return caps, params, True, "postcopy-ram + mapped-ram accepted on an incoming QEMU"
    finally:
        vm.shutdown()


def probe(binary: str, cache_dir: Path | None = None, *, timeout: float = 30.0) -> QemuProbe:
    """Probe *binary* (cached by path, size, mtime and probe format).  *timeout*
    bounds ``--version``, which runs first: a binary that hangs is killed."""
    path = resolve_binary(binary)
    st = os.stat(path)
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = f"{PROBE_FORMAT}-{path}-{st.st_size}-{st.st_mtime_ns}-{os.access('/dev/kvm', os.W_OK)}"
    cache = cache_dir / f"probe-{abs(hash_text(key)):x}.json"
    _sweep_stale_entries(cache_dir)
    lock = Path(str(cache) + ".lock")
    with FileLock(str(lock)):
        if cache.exists():
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return _from_json(data["probe"])
        try:
            result = _probe_now(path, timeout)
        except BaseException:
            # Nothing is cached for a binary that fails: leave no lock file behind
            # (a waiter then probes again, which is what it would do anyway).
            lock.unlink(missing_ok=True)
            raise
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "probe": asdict(result)}))
        os.replace(tmp, cache)
        return result


STALE_LOCK_AGE_S = 3600.0


def _sweep_stale_entries(cache_dir: Path) -> None:
    """Drop cached probes of binaries that are gone (tests probe copies in temp
    directories) and lock files left by probes that died an hour ago or more."""
    now = time.time()
    for entry in cache_dir.glob("probe-*.json"):
        try:
            binary = json.loads(entry.read_text())["probe"]["binary"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not os.path.exists(binary):
            entry.unlink(missing_ok=True)
    for lock in cache_dir.glob("probe-*.json.lock"):
        try:
            old = now - lock.stat().st_mtime > STALE_LOCK_AGE_S
        except OSError:
            continue
        if old and not lock.with_suffix("").exists():
            lock.unlink(missing_ok=True)


def _probe_now(path: str, timeout: float = 30.0) -> QemuProbe:
    version, text = _version(path, timeout)
    with tempfile.TemporaryDirectory(prefix="fastsnap-probe-") as tmp:
        kvm_ok, kvm_reason = _kvm(path, Path(tmp))
        try:
            caps, params, fast, fast_reason = _migration_facts(path, Path(tmp))
            machines, aliases = _machine_types(path, Path(tmp))
        except QemuError as err:
            # e.g. a build run from its build tree: "could not load PC BIOS 'bios-256k.bin'"
            said = [ln for ln in str(err).splitlines() if ln.strip()][-1]
            raise ProbeError(f"{path} does not start a q35 guest: {said}") from None
    uffd = probe_userfaultfd()
    return QemuProbe(binary=path, version=version, version_text=text, capabilities=caps,
                     parameters=params, kvm_usable=kvm_ok, kvm_reason=kvm_reason,
                     nested=_nested(), uffd_usable=uffd.usable, uffd_reason=uffd.how,
                     fast_load=fast, fast_load_reason=fast_reason, machines=machines,
                     machine_aliases=aliases)


def _from_json(data: dict[str, object]) -> QemuProbe:
    fields = dict(data)
    for name in ("version", "capabilities", "parameters", "machines"):
        fields[name] = tuple(fields[name])  # type: ignore[arg-type]
    fields["machine_aliases"] = tuple(tuple(pair) for pair in fields["machine_aliases"])  # type: ignore[attr-defined]
    return QemuProbe(**fields)  # type: ignore[arg-type]


def hash_text(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def default_cache_dir() -> Path:
    return cache_dir()
