"""Child-process hygiene: every QEMU and loader dies with us and is reaped.

A registry of live processes lets the plugin kill whatever is left when a
session ends abnormally (Ctrl-C, an internal error); PR_SET_PDEATHSIG covers a
SIGKILLed pytest, where no Python code runs at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import weakref

from avocado.utils import process as avocado_process

_PR_SET_PDEATHSIG = 1
_live: weakref.WeakSet[subprocess.Popen[bytes]] = weakref.WeakSet()
_live_lock = threading.Lock()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(args: list[str], *, pass_fds: tuple[int, ...] = (), stdout: int | None = None,
          stderr: int | None = None, stdin: int | None = subprocess.DEVNULL,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a child in its own session that is SIGKILLed if we die."""
    proc = subprocess.Popen(
        args, pass_fds=pass_fds, stdout=stdout, stderr=stderr, stdin=stdin,
        start_new_session=True, preexec_fn=_die_with_parent, env=env,
    )
    with _live_lock:
        _live.add(proc)
    return proc


def kill(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """SIGKILL *proc* and everything it started, then reap it; return its status."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            # Walks /proc for children (avocado's process-tree helper), so a
            # helper started by the child dies too.
            avocado_process.kill_process_tree(proc.pid, signal.SIGKILL, timeout=0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        return proc.wait(timeout)
    finally:
        forget(proc)


def forget(proc: subprocess.Popen[bytes]) -> None:
    with _live_lock:
        _live.discard(proc)


def kill_all() -> int:
    """Kill every child still registered; return how many were alive."""
    with _live_lock:
        procs = list(_live)
    alive = [p for p in procs if p.poll() is None]
    for proc in procs:
        kill(proc)
    return len(alive)
