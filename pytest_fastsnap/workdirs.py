"""Per-session and per-test working directories, short enough for unix sockets.

Everything a test creates (snapshots, logs, sockets) lives in its own
directory, removed when the test ends, or moved to the artifacts directory
when it failed and --fastsnap-keep-artifacts is on.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

SUN_PATH_MAX = 107


SESSION_ROOT = Path("/tmp")


def session_dir(worker: str) -> Path:
    """A short private directory for this session (or xdist worker).

    Its name carries our pid, so a later session can sweep directories whose
    pytest was SIGKILLed and never ran its cleanup.
    """
    sweep_stale()
    return Path(tempfile.mkdtemp(prefix=f"fastsnap-{worker}-{os.getpid()}-", dir=SESSION_ROOT))


# Directories whose name carries the pid of the process that made them:
# sessions (fastsnap-<worker>-<pid>-*) and bridge sockets (fsb-<pid>-*).
STALE_PATTERNS = (("fastsnap-*-*-*", re.compile(r"fastsnap-.+-(\d+)-[^-]+")),
                  ("fsb-*-*", re.compile(r"fsb-(\d+)-[^-]+")))


# A file naming the mount namespace of daemons a session started in a private
# namespace (libvirtd, virtlogd and their QEMUs double-fork out of our process
# tree, so only their namespace ties them to the session): ``mnt:[N] PID
# START``, an anchor process in it with its start time, since namespace
# numbers are reused once a namespace is gone.
NAMESPACE_MARKER = "mnt-namespace"


def mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """Clock ticks after boot at which *pid* started (``/proc/PID/stat`` field 22)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def namespace_marker(pid: int) -> str | None:
    """The marker text for the namespace of *pid* (None if it is gone)."""
    ns, started = mount_namespace(pid), start_time(pid)
    return None if ns is None or started is None else f"{ns} {pid} {started}"


def kill_namespace(marker: str) -> list[int]:
    """SIGKILL every process in the mount namespace *marker* names, if its anchor
    process is still the one that was recorded and still in it (never ours)."""
    try:
        namespace, pid_text, started = marker.split()
        pid = int(pid_text)
    except ValueError:
        return []
    if (namespace == mount_namespace(os.getpid()) or start_time(pid) != int(started)
            or mount_namespace(pid) != namespace):
        return []
    killed = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and mount_namespace(int(entry)) == namespace:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    return killed


def sweep_stale() -> list[Path]:
    """Remove directories of processes that no longer exist (a SIGKILLed pytest),
    first killing the daemons their namespace markers name."""
    removed = []
    for glob, pattern in STALE_PATTERNS:
        for path in SESSION_ROOT.glob(glob):
            m = pattern.fullmatch(path.name)
            if m and not Path(f"/proc/{m[1]}").exists():
                for marker in path.glob(f"*/{NAMESPACE_MARKER}"):
                    with contextlib.suppress(OSError):
                        kill_namespace(marker.read_text().strip())
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def test_dir(base: Path, nodeid: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.split("::")[-1])[:40]
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))


def socket_path(directory: Path, name: str) -> Path:
    """A unix socket path in *directory*, checked against the sun_path limit."""
    path = directory / name
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ValueError(f"unix socket path {path} is {len(os.fsencode(path))} bytes, over the "
                         f"{SUN_PATH_MAX}-byte sun_path limit; use a shorter directory")
    return path


def keep(directory: Path, artifacts_root: Path, nodeid: str) -> Path:
    """Move *directory* into *artifacts_root* under a name derived from *nodeid*."""
    artifacts_root.mkdir(parents=True, exist_ok=True)
    target = artifacts_root / re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[:150]
    if target.exists():
        shutil.rmtree(target)
    shutil.move(str(directory), str(target))
    return target.resolve()


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def cache_dir(sub: str = "") -> Path:
    """The one cache root of every build and probe result, with *sub* below it:
    ``$FASTSNAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/pytest-fastsnap``, else
    ``~/.cache/pytest-fastsnap``."""
    base = os.environ.get("FASTSNAP_CACHE_DIR")
    root = Path(base) if base else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pytest-fastsnap"
    return root / sub if sub else root
