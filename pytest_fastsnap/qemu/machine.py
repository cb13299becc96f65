"""QemuMachine: one QEMU process with QMP, a serial console and a log.

QMP and the console are socketpairs passed by fd, so there is no socket path
(no 107-byte sun_path limit, no accept race) and xdist workers never collide.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pytest_fastsnap.qemu import process
from pytest_fastsnap.qemu.console import Console
from pytest_fastsnap.qemu.qmp import QMPCommandError, QMPConnection, QMPConnectionError

__all__ = ["QMPCommandError", "QMPConnectionError", "QemuError", "QemuMachine"]


class QemuError(Exception):
    """QEMU failed to start or died; carries the command line and log tail."""


def _signal_name(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exit code {code}"


class QemuMachine:
    """A QEMU process under test.

    ``device_args`` is everything that defines the guest (machine, memory,
    devices, kernel); a destination for a migration repeats it verbatim.
    """

    def __init__(self, binary: str | Path, workdir: Path, *, name: str = "vm",
                 machine: str = "q35", accel: str = "tcg", mem: str = "64M",
                 extra_args: Sequence[str] = (), incoming: str | None = None,
                 paused: bool = False, qmp_timeout: float = 60.0,
                 device_args: Sequence[str] | None = None) -> None:
        """``device_args``, when given, is the whole guest definition verbatim
        (a destination repeating its source's); machine, accel, mem and
        extra_args are then not used."""
        self.binary = str(binary)
        self.workdir = Path(workdir)
        self.name = name
        self.accel = accel
        self.device_args: list[str] = list(device_args) if device_args is not None else [
            "-machine", machine, "-accel", accel, "-m", mem,
            "-nodefaults", "-display", "none", *extra_args,
        ]
        self.incoming = incoming
        self.paused = paused
        self.qmp_timeout = qmp_timeout
        self.log_path = self.workdir / f"{name}.log"
        self.console_log_path = self.workdir / f"{name}.console.log"
        self.qmp_log_path = self.workdir / f"{name}.qmp.log"
        self.shutdown_errors: list[str] = []
        self.args: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMPConnection | None = None
        self.console: Console | None = None  # type: ignore[assignment]
        self.transcript: list[str] = []

    # -- lifecycle ---------------------------------------------------------

    def launch(self) -> QemuMachine:
        """Start QEMU and connect QMP; on failure raise QemuError with the log."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        qmp_ours, qmp_theirs = socket.socketpair()
        con_ours, con_theirs = socket.socketpair()
        self.args = [
            # debug-threads: QEMU names its threads (vCPUs, mig/dst/*), which
            # restore(pin=...) places by name and a reader of top -H wants
            self.binary, "-name", f"{self.name},debug-threads=on",
            "-chardev", f"socket,id=mon,fd={qmp_theirs.fileno()}",
            "-mon", "chardev=mon,mode=control",
            "-chardev", f"socket,id=console,fd={con_theirs.fileno()}",
            "-serial", "chardev:console",
            *self.device_args,
        ]
        if self.incoming is not None:
            self.args += ["-incoming", self.incoming]
        if self.paused:
            self.args.append("-S")
        with open(self.log_path, "ab") as log:
            log.write(f"# {' '.join(self.args)}\n".encode())
            log.flush()
            try:
                self._proc = process.spawn(
                    self.args, pass_fds=(qmp_theirs.fileno(), con_theirs.fileno()),
                    stdout=log.fileno(), stderr=subprocess.STDOUT)
            except FileNotFoundError:
                raise QemuError(f"QEMU binary not found: {self.binary} "
                                "(set --qemu-binary or QEMU_BINARY)") from None
            finally:
                qmp_theirs.close()
                con_theirs.close()
        self.console = Console(con_ours, self.console_log_path)
        try:
            self._qmp = QMPConnection(self.name, qmp_ours, timeout=self.qmp_timeout,
                                      transcript_path=self.qmp_log_path)
            self.transcript = self._qmp.transcript
        except Exception as err:
            self.shutdown()
            raise QemuError(f"{self.name}: QEMU did not come up "
                            f"({_signal_name(self.exitcode)}): {err!r}\n"
                            f"command: {' '.join(self.args)}\nlog:\n{self.log_tail()}") from err
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def exitcode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to *timeout* for QEMU to exit by itself; return its status."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def shutdown(self, timeout: float = 10.0) -> int | None:
        """Stop QEMU: `quit`, then SIGKILL.  Idempotent; never raises: each step
        runs even if one before it failed, and failures are kept in
        ``shutdown_errors`` (and shown in the failure report).

        A postcopy-paused QEMU ignores `quit`, so the kill is not optional.
        """
        if self.console is not None:
            # An open console socket can block QEMU's exit; close it first.
            self._step("closing the console", self.console.close)
        if self._qmp is not None:
            qmp, self._qmp = self._qmp, None
            if self.is_running():
                self._step("sending quit", lambda: qmp.quit(timeout=min(timeout, 5.0)))
            self._step("closing QMP", qmp.close)
        if self._proc is None:
            return None
        proc = self._proc
        try:
            status: int | None = proc.wait(timeout)
            process.forget(proc)
        except subprocess.TimeoutExpired:
            status = self._step("killing QEMU", lambda: process.kill(proc))
        except Exception as err:  # never raise, see above
            self.shutdown_errors.append(f"waiting for QEMU: {err!r}")
            status = self._step("killing QEMU", lambda: process.kill(proc))
        return status

    def _step(self, what: str, step: Callable[[], Any]) -> Any:
        try:
            return step()
        except Exception as err:  # shutdown must go on
            self.shutdown_errors.append(f"{what}: {err!r}")
            return None

    def kill(self) -> int | None:
        """SIGKILL QEMU at once (e.g. a hung or postcopy-paused destination);
        never raises (see :meth:`shutdown`)."""
        if self._proc is None:
            return None
        proc = self._proc
        status = self._step("killing QEMU", lambda: process.kill(proc))
        self.shutdown()
        return status

    # -- QMP -----------------------------------------------------------------

    @property
    def qmp_connection(self) -> QMPConnection:
        if self._qmp is None:
            raise QMPConnectionError(f"{self.name}: not connected")
        return self._qmp

    def qmp(self, command: str, timeout: float | None = None, **args: Any) -> Any:
        """Run a QMP command (``-`` in argument names: pass a dict via **{...})."""
        return self.qmp_connection.cmd(command, args or None, timeout=timeout)

    def hmp(self, command_line: str) -> str:
        return str(self.qmp("human-monitor-command", **{"command-line": command_line}))

    def wait_event(self, name: str, match: dict[str, Any] | None = None,
                   timeout: float = 30.0, since: int = 0) -> dict[str, Any]:
        """Wait for QMP event *name* (data matching *match*) received since
        event index *since*; TimeoutError otherwise.  QEMU sends MIGRATION and
        MIGRATION_PASS only with the ``events`` migration capability on."""
        try:
            return self.qmp_connection.wait_event(name, match, timeout, since,
                                                  alive=self.is_running)
        except TimeoutError as err:
            if name in ("MIGRATION", "MIGRATION_PASS") and not self._migration_events_on():
                raise TimeoutError(
                    f"{err}: QEMU sends {name} events only with the 'events' migration "
                    "capability, which is off on this QEMU; load_snapshot() and "
                    "wait_migration() (pytest_fastsnap.qemu.migration) poll query-migrate "
                    "instead, or set the capability before migrating") from None
            raise

    def _migration_events_on(self) -> bool:
        try:
            caps = self.qmp("query-migrate-capabilities", timeout=5)
        except Exception:  # QEMU gone: the timeout is the news, not this
            return True
        return any(c.get("capability") == "events" and c.get("state") for c in caps)

    def status(self) -> str:
        return str(self.qmp("query-status")["status"])

    def wait_status(self, wanted: str | set[str], timeout: float = 30.0) -> str:
        wanted_set = {wanted} if isinstance(wanted, str) else wanted
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status in wanted_set:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: status {status!r}, wanted {wanted_set} "
                                   f"within {timeout:.1f}s")
            time.sleep(0.05)

    def memsave(self, addr: int, size: int) -> bytes:
        """Guest-physical memory [addr, addr+size) through QMP pmemsave."""
        fd, path = _tempfile(self.workdir, "pmem")
        os.close(fd)
        try:
            self.qmp("pmemsave", val=addr, size=size, filename=path)
            return Path(path).read_bytes()
        finally:
            os.unlink(path)

    def memory_digests(self, ranges: Sequence[tuple[int, int]],
                       chunk: int = 16 << 20) -> dict[str, str]:
        """sha256 of guest-physical memory per *chunk* of each ``(start, length)``
        range, keyed ``"start+length"`` (hex) per chunk."""
        out = {}
        for start, length in ranges:
            for a in range(start, start + length, chunk):
                n = min(chunk, start + length - a)
                out[f"{a:#x}+{n:#x}"] = hashlib.sha256(self.memsave(a, n)).hexdigest()
        return out

    def wait_memory_written(self, addr: int, size: int, timeout: float = 30.0) -> bytes:
        """Wait until guest memory [addr, addr+size) holds a non-zero byte (the
        firmware has run far enough to leave state there); return it."""
        deadline = time.monotonic() + timeout
        while True:
            data = self.memsave(addr, size)
            if any(data):
                return data
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: guest memory {addr:#x}+{size:#x} still all "
                                   f"zero after {timeout:.0f}s")
            time.sleep(0.02)

    def registers(self) -> str:
        """CPU register dump of every vCPU (HMP `info registers -a`)."""
        return self.hmp("info registers -a")

    # -- logs ------------------------------------------------------------------

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def report(self) -> dict[str, str]:
        """Sections for a failure report: log, QMP transcript, console."""
        errors = "".join(f"\n# shutdown: {e}" for e in self.shutdown_errors)
        return {
            f"qemu {self.name} ({_signal_name(self.exitcode)}) log": self.log_tail(200) + errors,
            f"qemu {self.name} qmp": "\n".join(self.transcript[-200:]),
            f"qemu {self.name} console": self.console.tail(200) if self.console else "",
        }

    def __repr__(self) -> str:
        return f"<QemuMachine {self.name} pid={self.pid} {_signal_name(self.exitcode)}>"


def _tempfile(directory: Path, prefix: str) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=prefix, dir=directory)
