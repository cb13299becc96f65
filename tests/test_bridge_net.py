"""The bridge's transports without QEMU: ``--to`` is parsed strictly by the
loader and by the Python side alike (one E_USAGE line, exit 2, the same
reason), a TCP destination that is not there is E_CONNECT, and against a
synthetic TCP destination the preempt channel is opened second, only after
PONG 1, and carries bare ``ram`` records (per-channel CONTINUE, zero pages
as ZERO) for exactly the requested pages.  Release and ASan+UBSan builds."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_fastsnap.native.loader import ASAN_ENV, loader_path
from pytest_fastsnap.restore.transport import parse_transport, tcp_uri
from pytest_fastsnap.snapshot.writer import write_snapshot

RP_SHUT, RP_PONG, RP_REQ_PAGES_ID, RP_REQ_PAGES = 1, 2, 3, 4
PAGE, ZERO, CONT = 0x08, 0x02, 0x20

# --to value -> what the one error line must say (both readers)
BAD_TO = {
    "tcp:1.2.3:80": "'1.2.3' is not an IPv4 address",
    "tcp:256.1.1.1:80": "'256.1.1.1' is not an IPv4 address",
    "tcp:[::1]:99999": "port '99999' is not a decimal number",
    "tcp:::1:80": "an IPv6 address needs brackets",
    "tcp:[::1]80": "expected ':PORT' after ']'",
    "tcp:[::1:80": "'[' without ']'",
    "tcp:[zz]:80": "'zz' is not an IPv6 address",
    "tcp::80": "HOST is empty",
    "tcp:host": "expected tcp:HOST:PORT",
    "tcp:h:080": "port '080' is not a decimal number",
    "tcp:h:0x50": "port '0x50' is not a decimal number",
    "tcp:h:": "port '' is not a decimal number",
    "tcp:h:-1": "port '-1' is not a decimal number",
    "tcp:a..b:1": "'a..b' is not a host name or address",
    "tcp:-a:1": "'-a' is not a host name or address",
    "tcp:a_b:1": "'a_b' is not a host name or address",
}


def env(variant: str) -> dict[str, str]:
    return {**os.environ, **(ASAN_ENV if variant == "asan" else {})}


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 MiB pc.ram: data in every page but every 5th (zero)."""
    pages = {i: struct.pack("<I", i) * 1024 for i in range(1024) if i % 5}
    return write_snapshot(tmp_path_factory.mktemp("net") / "s.img", "pc",
                          [("pc.ram", 4 << 20, pages)])


@pytest.mark.parametrize("variant", ["release", "asan"])
@pytest.mark.parametrize("to", list(BAD_TO))
def test_bad_to_is_one_usage_line(snap: Path, variant: str, to: str) -> None:
    res = subprocess.run([str(loader_path(variant)), "serve", str(snap), "--to", to],
                         capture_output=True, text=True, timeout=30, env=env(variant),
                         check=False)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "E_USAGE" in lines[0] and BAD_TO[to] in lines[0], lines
    with pytest.raises(ValueError, match=BAD_TO[to].replace("[", r"\[").replace("(", r"\(")):
        parse_transport(to)


@pytest.mark.parametrize("to, kind", [("tcp:127.0.0.1:4444", "tcp"), ("tcp:[::1]:1", "tcp"),
                                      ("tcp:localhost:65535", "tcp"), ("unix", "unix"),
                                      ("fd", "fd"), ("tcp", "tcp")])
def test_good_to(to: str, kind: str) -> None:
    t = parse_transport(to)
    assert t.kind == kind
    if to.startswith("tcp:"):
        assert t.uri() == to


def test_preempt_over_fd_refused(snap: Path) -> None:
    res = subprocess.run([str(loader_path()), "serve", str(snap), "--to", "fd:0", "--preempt"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 2 and "E_USAGE" in res.stderr and "second connection" in res.stderr


@pytest.mark.parametrize("variant", ["release", "asan"])
def test_preempt_connection_dropped_is_refused(snap: Path, variant: str) -> None:
    """A destination without postcopy-preempt drops the second connection: the
    loader says so (E_CONNECT, exit 1) before sending the package."""
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    proc = subprocess.Popen([str(loader_path(variant)), "serve", str(snap), "--to",
                             f"tcp:127.0.0.1:{port}", "--preempt"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(variant))
    drained = bytearray()
    try:
        lsock.settimeout(20)
        main, _ = lsock.accept()
        threading.Thread(target=lambda: _drain(main, drained), daemon=True).start()
        main.sendall(rp(RP_PONG, struct.pack(">I", 1)))
        pre, _ = lsock.accept()
        pre.close()                                     # as QEMU: "...; ignoring"
        time.sleep(0.2)
        main.sendall(rp(RP_PONG, struct.pack(">I", 2)))
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, err
        assert err.count("\n") == 1 and "E_CONNECT" in err and "postcopy-preempt" in err, err
        assert b"\x08\x00\x07\x00\x04" not in drained, "package sent after all"
        main.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lsock.close()


def test_nobody_listening_is_connect_error(snap: Path) -> None:
    with socket.socket() as s:      # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = subprocess.run([str(loader_path()), "serve", str(snap), "--to",
                          f"tcp:127.0.0.1:{port}", "--connect-timeout", "0.3"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 1, res.stderr
    assert "E_CONNECT" in res.stderr and "Connection refused" in res.stderr


def test_connect_timeout_bounds_a_destination_that_never_answers(snap: Path) -> None:
    """A listener whose accept queue is full drops further SYNs, as a filtered
    host does: the loader gives up after --connect-timeout with E_CONNECT
    instead of sitting in the kernel's SYN retries (about two minutes)."""
    with socket.socket() as lsock, socket.socket() as filler:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        port = lsock.getsockname()[1]
        filler.connect(("127.0.0.1", port))      # fills the queue; never accepted
        res = subprocess.run([str(loader_path()), "serve", str(snap), "--to",
                              f"tcp:127.0.0.1:{port}", "--connect-timeout", "1"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1, res.stderr
    assert "E_CONNECT" in res.stderr and "timed out" in res.stderr, res.stderr


def rp(kind: int, payload: bytes) -> bytes:
    return struct.pack(">HH", kind, len(payload)) + payload


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"channel closed after {len(buf)} of {n} bytes"
        buf += chunk
    return buf


@dataclass
class SyntheticDestination:
    """A TCP listener playing a postcopy-preempt destination for one loader."""

    proc: subprocess.Popen[str]
    main: socket.socket
    pre: socket.socket
    drained: bytearray

    def request(self, msg: bytes) -> None:
        self.main.sendall(msg)

    def finish(self) -> dict[str, object]:
        """PONG 3 (package loaded), wait for END + EOF, SHUT 0; the loader's stats."""
        self.main.sendall(rp(RP_PONG, struct.pack(">I", 3)))
        _wait_eof(self.drained, self.proc)
        self.main.sendall(rp(RP_SHUT, struct.pack(">I", 0)))
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        stats: dict[str, object] = json.loads(out)
        return stats


@contextlib.contextmanager
def synthetic_destination(snap: Path, host: str, variant: str, *extra: str
                          ) -> Iterator[SyntheticDestination]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lsock = socket.socket(family, socket.SOCK_STREAM)
    try:
        lsock.bind((host, 0))
    except OSError as err:
        lsock.close()
        pytest.skip(f"cannot listen on {host}: {err}")
    lsock.listen(4)
    port = lsock.getsockname()[1]
    proc = subprocess.Popen([str(loader_path(variant)), "serve", str(snap), "--to",
                             tcp_uri(host, port), "--preempt", "--json",
                             "--max-bandwidth", "1", "--shut-timeout", "30", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(variant))
    socks = [lsock]
    drained = bytearray()
    try:
        lsock.settimeout(20)
        main, _ = lsock.accept()
        socks.append(main)
        threading.Thread(target=lambda: _drain(main, drained), daemon=True).start()
        lsock.settimeout(0.5)   # no second connection before the PONG
        with pytest.raises(TimeoutError):
            lsock.accept()
        main.sendall(rp(RP_PONG, struct.pack(">I", 1)))
        lsock.settimeout(20)
        pre, _ = lsock.accept()
        socks.append(pre)
        main.sendall(rp(RP_PONG, struct.pack(">I", 2)))   # PING 2 follows the connection
        # requests come once the package is out (as from QEMU: faults start at LISTEN)
        deadline = time.monotonic() + 20
        while b"\x08\x00\x07\x00\x04" not in drained and time.monotonic() < deadline:
            time.sleep(0.01)
        yield SyntheticDestination(proc, main, pre, drained)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        print("loader:", proc.communicate(timeout=30))
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("variant", ["release", "asan"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_preempt_channel_framing(snap: Path, variant: str, host: str) -> None:
    name = b"pc.ram"
    with synthetic_destination(snap, host, variant) as dst:
        pre = dst.pre
        # a data page near the top (the 1 MiB/s stream is far from it)
        dst.request(rp(RP_REQ_PAGES_ID, struct.pack(">QIB", 1001 * 4096, 4096, 6) + name))
        assert recv_exact(pre, 8) == struct.pack(">Q", 1001 * 4096 | PAGE)
        assert recv_exact(pre, 7) == b"\x06" + name
        assert recv_exact(pre, 4096) == struct.pack("<I", 1001) * 1024
        # same block again: CONTINUE, no idstr
        dst.request(rp(RP_REQ_PAGES, struct.pack(">QI", 1002 * 4096, 4096)))
        assert recv_exact(pre, 8) == struct.pack(">Q", 1002 * 4096 | PAGE | CONT)
        assert recv_exact(pre, 4096) == struct.pack("<I", 1002) * 1024
        # a zero page: a ZERO record
        dst.request(rp(RP_REQ_PAGES, struct.pack(">QI", 1000 * 4096, 4096)))
        assert recv_exact(pre, 9) == struct.pack(">Q", 1000 * 4096 | ZERO | CONT) + b"\x00"
        # a duplicate is not answered
        dst.request(rp(RP_REQ_PAGES, struct.pack(">QI", 1001 * 4096, 4096)))
        stats = dst.finish()
        assert stats["transport"] == "tcp"
        pre_stats = stats["preempt"]
        assert isinstance(pre_stats, dict)
        assert pre_stats["pages_on_request"] == 3, stats
        assert pre_stats["requests_duplicate"] == 1, stats
        # the serving time split: one pread() and one send() sample per served
        # request (none for the duplicate), each part of the request's latency
        for part in ("read_us", "send_us"):
            assert pre_stats[part]["count"] == 3, (part, stats)
            assert 0 < pre_stats[part]["max"] <= stats["latency_us"]["max"], (part, stats)
        assert stats["double_sends"] == 0
        assert stats["pages_data"] == stats["file_pages_set"] == 1024 - 205
        pre.settimeout(5)
        assert pre.recv(1) == b"", "bytes after the requested pages (no EOS expected)"


@pytest.mark.parametrize("variant", ["release", "asan"])
def test_preempt_sends_whole_host_pages(tmp_path: Path, variant: str) -> None:
    """--host-page-size pc.ram=2M with --preempt: one request is answered on the
    preempt channel with all 512 target pages of its host page, consecutively
    (QEMU assembles a huge page per channel), zero pages as ZERO records."""
    pages = {i: struct.pack("<I", i) * 1024 for i in range(2048) if i % 3}
    snap = write_snapshot(tmp_path / "h.img", "pc", [("pc.ram", 8 << 20, pages)])
    with synthetic_destination(snap, "127.0.0.1", variant,
                               "--host-page-size", "pc.ram=2M") as dst:
        dst.request(rp(RP_REQ_PAGES_ID, struct.pack(">QIB", 1536 * 4096, 2 << 20, 6)
                       + b"pc.ram"))
        for i, page in enumerate(range(1536, 2048)):
            flags = (PAGE if page % 3 else ZERO) | (CONT if i else 0)
            assert recv_exact(dst.pre, 8) == struct.pack(">Q", page * 4096 | flags)
            if not i:
                assert recv_exact(dst.pre, 7) == b"\x06pc.ram"
            want = struct.pack("<I", page) * 1024 if page % 3 else b"\x00"
            assert recv_exact(dst.pre, len(want)) == want
        stats = dst.finish()
        pre_stats = stats["preempt"]
        assert isinstance(pre_stats, dict) and pre_stats["pages_on_request"] == 512, stats
        assert stats["double_sends"] == 0


def _drain(s: socket.socket, into: bytearray) -> None:
    with contextlib.suppress(OSError):
        while chunk := s.recv(1 << 20):
            into.extend(chunk)


def _wait_eof(drained: bytearray, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    """Wait until the main stream ends (END section + EOF byte, nothing more for
    0.3 s): the loader then waits for SHUT."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline and proc.poll() is None:
        if len(drained) != last:
            last, since = len(drained), time.monotonic()
        elif drained.endswith(b"\x00") and time.monotonic() - since > 0.3:
            return
        time.sleep(0.05)
    raise AssertionError(f"main stream did not end ({len(drained)} bytes)")


@pytest.mark.parametrize("variant", ["release", "asan"])
def test_preempt_channel_closed_later_fails_the_restore(snap: Path, variant: str) -> None:
    """The preempt connection dropped after PONG 2 (a late "...; ignoring"): the
    first request finds it closed, and the loader fails instead of putting the
    page on a channel nobody reads (then sending EOF, after which the
    destination would read that page as zeros)."""
    with synthetic_destination(snap, "127.0.0.1", variant) as dst:
        dst.pre.close()
        time.sleep(0.2)
        dst.request(rp(RP_REQ_PAGES_ID, struct.pack(">QIB", 1001 * 4096, 4096, 6) + b"pc.ram"))
        _out, err = dst.proc.communicate(timeout=60)
        assert dst.proc.returncode == 1, err
        assert "E_DEST_GONE" in err and "postcopy-preempt capability on" in err, err
        assert err.count("\n") == 1, err



def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("variant", ["release", "asan"])
@pytest.mark.parametrize("listen_late", [False, True], ids=["bind+listen", "listen-later"])
def test_loader_started_first_connects_when_the_socket_appears(snap: Path, tmp_path: Path,
                                                               listen_late: bool,
                                                               variant: str) -> None:
    """The strategy starts the loader before ``migrate-incoming``: it must
    wait for a unix socket that does not exist yet (an inotify watch on the
    directory) and for one bound but not yet listening (ECONNREFUSED), then
    connect.  The wait is not a busy loop: under a quarter of the wall time
    in CPU, as the kernel counts it."""
    path = tmp_path / "late.sock"
    proc = subprocess.Popen([str(loader_path(variant)), "serve", str(snap),
                             "--to", f"unix:{path}", "--connect-timeout", "20"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env(variant))
    try:
        time.sleep(1.0)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert _cpu_seconds(proc.pid) < 0.25 + (0.5 if variant == "asan" else 0.0)
        with socket.socket(socket.AF_UNIX) as lsock:
            lsock.bind(str(path))
            if listen_late:
                time.sleep(0.3)
            lsock.listen(1)
            lsock.settimeout(10)
            conn, _ = lsock.accept()       # socket.timeout here: the loader never came
            conn.close()
        proc.wait(timeout=30)
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "E_CONNECT" not in err, err     # it connected; what failed came after
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_unix_socket_in_a_missing_directory_times_out(snap: Path, tmp_path: Path) -> None:
    """No directory to watch: the loader falls back to polling, still gives up
    after --connect-timeout with E_CONNECT naming the path, without spinning."""
    path = tmp_path / "no-such-dir" / "x.sock"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    res = subprocess.run([str(loader_path()), "serve", str(snap), "--to", f"unix:{path}",
                          "--connect-timeout", "1"], capture_output=True, text=True,
                         timeout=30, check=False)
    wall = time.monotonic() - t
    assert res.returncode == 1, res.stderr
    assert "E_CONNECT" in res.stderr and str(path) in res.stderr, res.stderr
    assert wall >= 1.0, wall       # it waited the timeout out, it did not give up at once
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert cpu < 0.5 * wall, cpu
