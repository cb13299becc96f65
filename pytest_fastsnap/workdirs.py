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


# A file naming the mount namespace (``mnt:[N]``) of daemons a session started
# in a private namespace (libvirtd, virtlogd and their QEMUs double-fork out of
# our process tree, so only their namespace ties them to the session).  As
# namespace numbers are reused, the sweep kills a namespace only while its
# processes still have the marker's directory bind-mounted (mountinfo).
NAMESPACE_MARKER = "mnt-namespace"


def mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _mounts_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return f.read()
    except OSError:
        return ""


def kill_namespace(namespace: str, owner: Path) -> list[int]:
    """SIGKILL every process in mount namespace *namespace* if it still mounts
    something from directory *owner* (so it is the one *owner*'s session made;
    never our own namespace)."""
    if namespace == mount_namespace(os.getpid()):
        return []
    members = [int(e) for e in os.listdir("/proc")
               if e.isdigit() and mount_namespace(int(e)) == namespace]
    # mountinfo shows a bind mount's source relative to its filesystem's root
    # (/tmp may be a tmpfs): match the directory's last two components.
    tag = f"{owner.parent.name}/{owner.name}/"
    if not any(tag in _mounts_of(pid) for pid in members):
        return []
    killed = []
    for pid in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
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
                        kill_namespace(marker.read_text().strip(), marker.parent)
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
