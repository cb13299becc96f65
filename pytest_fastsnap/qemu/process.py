"""Child-process hygiene: every QEMU and loader dies with us and is reaped.

A registry of live processes lets the plugin kill whatever is left when a
session ends abnormally (Ctrl-C, an internal error); PR_SET_PDEATHSIG covers a
SIGKILLed pytest, where no Python code runs at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import threading

from avocado.utils import process as avocado_process

_PR_SET_PDEATHSIG = 1
# A strong registry: a child whose Popen the caller dropped must still be found
# by kill_all.  Entries leave it when the child is reaped (kill/forget, or the
# sweep of already-exited children in spawn).
_live: set[subprocess.Popen[bytes]] = set()
_live_lock = threading.Lock()
# Resolved once, here, before any fork: after fork() in a threaded process only
# async-signal-safe work is safe, and dlopen/dlsym (ctypes.CDLL) take locks that
# another thread may have held at the fork.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(parent: int) -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: nobody would kill us
        os.kill(os.getpid(), signal.SIGKILL)


def spawn(args: list[str], *, pass_fds: tuple[int, ...] = (), stdout: int | None = None,
          stderr: int | None = None, stdin: int | None = subprocess.DEVNULL,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a child in its own session that is SIGKILLed if we die."""
    proc = subprocess.Popen(
        args, pass_fds=pass_fds, stdout=stdout, stderr=stderr, stdin=stdin,
        start_new_session=True, preexec_fn=functools.partial(die_with_parent, os.getpid()),
        env=env,
    )
    with _live_lock:
        _live.difference_update([p for p in _live if p.poll() is not None])
        _live.add(proc)
    return proc


def running(pid: int) -> bool:
    """*pid* exists and is not a zombie (any process, ours or not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def live() -> list[subprocess.Popen[bytes]]:
    """The registered children not yet reaped."""
    with _live_lock:
        return [p for p in _live if p.returncode is None]


def kill(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """SIGKILL *proc* and everything it started, then reap it; return its status.

    subprocess.TimeoutExpired if it is not gone within *timeout* (stuck in the
    kernel); it then stays registered, so kill_all tries again.
    """
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            # Walks /proc for children (avocado's process-tree helper), so a
            # helper started by the child dies too.
            avocado_process.kill_process_tree(proc.pid, signal.SIGKILL, timeout=0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    status = proc.wait(timeout)
    forget(proc)
    return status


def forget(proc: subprocess.Popen[bytes]) -> None:
    """Drop a reaped child from the registry."""
    with _live_lock:
        _live.discard(proc)


def kill_all() -> int:
    """Kill every child still registered; return how many were alive.  One child
    that will not die does not stop the others from being killed."""
    with _live_lock:
        procs = list(_live)
    alive = [p for p in procs if p.poll() is None]
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            kill(proc)
    return len(alive)
