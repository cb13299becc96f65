"""``fastsnap-loader serve --resume`` against a synthetic destination, no QEMU.

The destination is our end of a socket pair.  It answers the loader's
RECV_BITMAP commands (QEMU 10.0 layout: an RP frame ``be16 5, be16 n+1,
str8 idstr``, then outside the frame be64 size, the LE bitmap, be64
0x0123456789abcdef) and POSTCOPY_RESUME with RESUME_ACK, or with hostile
variants, each of which must end the loader with one clear E_* line.
Release and ASan+UBSan builds both run every case.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_fastsnap.native.loader import ASAN_ENV, loader_path
from pytest_fastsnap.snapshot.writer import write_snapshot

RP_SHUT, RP_REQ_PAGES_ID, RP_RECV_BITMAP, RP_RESUME_ACK = 1, 3, 5, 6
CMD_RECV_BITMAP, CMD_POSTCOPY_RESUME = 10, 9
END_MARK = 0x0123456789ABCDEF
PS = 4096
VARIANTS = ["release", "asan"]
# pc.ram: 256 pages, data in every third one; pc.bios: 16 pages, all data.
RAM_PAGES, BIOS_PAGES = 256, 16
RAM_DATA = {i: bytes([i % 251 + 1]) * PS for i in range(0, RAM_PAGES, 3)}
BIOS_DATA = {i: bytes([200 + i]) * PS for i in range(BIOS_PAGES)}


def rp(kind: int, payload: bytes) -> bytes:
    return struct.pack(">HH", kind, len(payload)) + payload


def bitmap_frame(block: str) -> bytes:
    name = block.encode()
    return rp(RP_RECV_BITMAP, bytes([len(name)]) + name)


def bitmap_size(pages: int) -> int:
    return ((pages + 7) // 8 + 7) // 8 * 8


def bitmap(block: str, pages: int, present: set[int], *, size: int | None = None,
           end: int = END_MARK) -> bytes:
    bits = bytearray(bitmap_size(pages))
    for p in present:
        bits[p // 8] |= 1 << (p % 8)
    return (bitmap_frame(block) + struct.pack(">Q", bitmap_size(pages) if size is None else size)
            + bytes(bits) + struct.pack(">Q", end))


def request(block: str, page: int) -> bytes:
    name = block.encode()
    return rp(RP_REQ_PAGES_ID, struct.pack(">QIB", page * PS, PS, len(name)) + name)


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    return write_snapshot(tmp_path / "s.img", "pc-q35-10.0",
                          [("pc.ram", RAM_PAGES * PS, RAM_DATA),
                           ("pc.bios", BIOS_PAGES * PS, BIOS_DATA)])


def serve_resume(snapshot: Path, variant: str, answer: Callable[[socket.socket, bytearray,
                                                                 threading.Condition], None],
                 extra: tuple[str, ...] = ("--resume",)) -> tuple[int, str, dict[str, object],
                                                                  bytes]:
    """Run ``serve --resume`` on a socket pair; *answer(sock, received, cond)*
    plays the destination in a thread (``received`` grows as the loader
    writes; ``cond`` is notified on growth).  Returns (exit code, stderr,
    --json stats, every byte the loader sent)."""
    ours, theirs = socket.socketpair()
    received = bytearray()
    cond = threading.Condition()

    def drain() -> None:
        with contextlib.suppress(OSError):
            while chunk := ours.recv(1 << 20):
                with cond:
                    received.extend(chunk)
                    cond.notify_all()
        with cond:
            cond.notify_all()

    reader = threading.Thread(target=drain, daemon=True)
    player = threading.Thread(target=answer, args=(ours, received, cond), daemon=True)
    try:
        reader.start()
        player.start()
        env = {**os.environ, **(ASAN_ENV if variant == "asan" else {})}
        res = subprocess.run([str(loader_path(variant)), "serve", str(snapshot), "--to",
                              f"fd:{theirs.fileno()}", "--json", "--io-timeout", "20",
                              "--shut-timeout", "20", *extra],
                             pass_fds=(theirs.fileno(),), capture_output=True, text=True,
                             timeout=120, env=env, check=False)
    finally:
        theirs.close()
        with contextlib.suppress(OSError):
            ours.shutdown(socket.SHUT_RDWR)
        reader.join(timeout=10)
        player.join(timeout=10)
        ours.close()
    stats: dict[str, object] = json.loads(res.stdout) if res.stdout.strip() else {}
    return res.returncode, res.stderr, stats, bytes(received)


def wait_for(received: bytearray, cond: threading.Condition, needle: bytes) -> bool:
    with cond:
        return cond.wait_for(lambda: needle in received, timeout=30)


def reply(data: bytes, *, close: bool = False) -> Callable[..., None]:
    def answer(sock: socket.socket, received: bytearray, cond: threading.Condition) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            if close:
                sock.shutdown(socket.SHUT_WR)
    return answer


def parse_pages(stream: bytes) -> list[tuple[str, int, bool]]:
    """(block, page, has_data) of every page record in the loader's resumed
    stream: RECV_BITMAP and RESUME commands, then ram PART/END sections."""
    out: list[tuple[str, int, bool]] = []
    pos, block = 0, ""
    while pos < len(stream):
        kind = stream[pos]
        if kind == 0x08:    # command
            _, length = struct.unpack_from(">HH", stream, pos + 1)
            pos += 5 + length
        elif kind in (0x02, 0x03):  # PART/END of the ram section
            pos += 5
            while True:
                (v,) = struct.unpack_from(">Q", stream, pos)
                pos += 8
                flags, addr = v & 0xFFF, v & ~0xFFF
                if flags & 0x10:    # EOS, then the footer
                    assert stream[pos] == 0x7E
                    pos += 5
                    break
                if not flags & 0x20:
                    n = stream[pos]
                    block = stream[pos + 1:pos + 1 + n].decode()
                    pos += 1 + n
                if flags & 0x08:
                    out.append((block, addr // PS, True))
                    pos += PS
                elif flags & 0x02:
                    out.append((block, addr // PS, False))
                    pos += 1
                else:
                    raise AssertionError(f"record flags {flags:#x} at {pos}")
        elif kind == 0x00:  # EOF
            pos += 1
            assert pos == len(stream), "bytes after EOF"
        else:
            raise AssertionError(f"top-level byte {kind:#x} at {pos}")
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_sends_exactly_the_missing_pages(snap: Path, variant: str) -> None:
    """The loader asks for both blocks' bitmaps, then resumes; a request that
    arrived before the ACK is served before any eager page; pages the
    destination has are never sent (also when requested); every data page
    it lacks is sent once; the stream ends with END and EOF."""
    ram_present = set(range(0, 64)) | {99, 255}
    bios_present = {0, 5, 15}
    missing_requested = next(p for p in range(120, RAM_PAGES, 3) if p not in ram_present)

    def answer(sock: socket.socket, received: bytearray, cond: threading.Condition) -> None:
        assert wait_for(received, cond, b"\x08\x00\x0a\x00\x08\x07pc.bios")
        sock.sendall(bitmap("pc.bios", BIOS_PAGES, bios_present)
                     + bitmap("pc.ram", RAM_PAGES, ram_present))
        assert wait_for(received, cond, struct.pack(">BHH", 8, CMD_POSTCOPY_RESUME, 0))
        sock.sendall(request("pc.ram", 10)                  # present: must be ignored
                     + request("pc.ram", missing_requested)
                     + rp(RP_RESUME_ACK, struct.pack(">I", 1)))
        assert wait_for(received, cond, b"\x00")
        sock.sendall(rp(RP_SHUT, struct.pack(">I", 0)))

    rc, err, stats, stream = serve_resume(snap, variant, answer)
    assert rc == 0, err
    assert stats["resume"] is True and stats["ok"] is True, stats
    present = len(ram_present) + len(bios_present)
    assert stats["pages_present"] == present, stats
    assert stats["double_sends"] == 0
    pages = parse_pages(stream)
    sent = [(b, p) for b, p, _ in pages]
    assert len(sent) == len(set(sent)), "a page was sent twice"
    have = {("pc.ram", p) for p in ram_present} | {("pc.bios", p) for p in bios_present}
    assert not have & set(sent), f"sent pages the destination has: {sorted(have & set(sent))}"
    want = ({("pc.ram", p) for p in RAM_DATA} | {("pc.bios", p) for p in BIOS_DATA}) - have
    assert {(b, p) for b, p, data in pages if data} == want
    assert pages[0] == ("pc.ram", missing_requested, missing_requested in RAM_DATA), pages[:3]
    assert stats["requests_duplicate"] == 1 and stats["requests_served"] == 1, stats


HOSTILE = {
    # name: (destination's answer, error name, words the message must hold)
    "wrong-size": (reply(bitmap("pc.ram", RAM_PAGES, set(), size=bitmap_size(RAM_PAGES) + 8)),
                   "E_DEST_PROTOCOL", "says 40 bytes; its 256 pages need 32"),
    "size-zero": (reply(bitmap("pc.bios", BIOS_PAGES, set(), size=0)),
                  "E_DEST_PROTOCOL", "says 0 bytes"),
    "no-end-mark": (reply(bitmap("pc.ram", RAM_PAGES, {1}, end=0xDEADBEEF)),
                    "E_DEST_PROTOCOL", "not the end mark"),
    "unknown-block": (reply(bitmap("pc.nosuch", 8, set())),
                      "E_DEST_PROTOCOL", "RECV_BITMAP for block \"pc.nosuch\", which the "
                      "snapshot does not have"),
    "name-length": (reply(rp(RP_RECV_BITMAP, b"\x09pc.ram")),
                    "E_DEST_PROTOCOL", "does not hold one block name"),
    "empty-frame": (reply(rp(RP_RECV_BITMAP, b"")),
                    "E_DEST_PROTOCOL", "does not hold one block name"),
    "twice": (reply(bitmap("pc.bios", BIOS_PAGES, set()) + bitmap("pc.bios", BIOS_PAGES, set())),
              "E_DEST_PROTOCOL", "second RECV_BITMAP for block pc.bios"),
    "truncated-bitmap": (reply(bitmap("pc.ram", RAM_PAGES, set())[:-20], close=True),
                         "E_DEST_GONE", "ended inside the RECV_BITMAP of block pc.ram "
                         "(inside the bitmap)"),
    "truncated-size": (reply(bitmap_frame("pc.ram") + b"\x00\x00\x00", close=True),
                       "E_DEST_GONE", "(before its size)"),
    "truncated-end-mark": (reply(bitmap("pc.ram", RAM_PAGES, set())[:-3], close=True),
                           "E_DEST_GONE", "(before its end mark)"),
    "ack-before-resume": (reply(rp(RP_RESUME_ACK, struct.pack(">I", 1))),
                          "E_DEST_PROTOCOL", "RESUME_ACK before POSTCOPY_RESUME"),
    "closed-at-once": (reply(b"", close=True), "E_DEST_GONE", "return path closed"),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_recovery_answer_is_one_clear_error(snap: Path, variant: str, case: str) -> None:
    answer, name, words = HOSTILE[case]
    rc, err, stats, _ = serve_resume(snap, variant, answer)
    assert rc == 1, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fastsnap-loader serve: {name}: "), err
    assert words in lines[0], err
    assert stats["error_name"] == name and stats["double_sends"] == 0, stats


@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_resume_ack_value(snap: Path, variant: str) -> None:
    def answer(sock: socket.socket, received: bytearray, cond: threading.Condition) -> None:
        assert wait_for(received, cond, b"\x07pc.bios")
        sock.sendall(bitmap("pc.ram", RAM_PAGES, set()) + bitmap("pc.bios", BIOS_PAGES, set()))
        assert wait_for(received, cond, struct.pack(">BHH", 8, CMD_POSTCOPY_RESUME, 0))
        sock.sendall(rp(RP_RESUME_ACK, struct.pack(">I", 2)))

    rc, err, _, _ = serve_resume(snap, variant, answer)
    assert rc == 1 and "E_DEST_PROTOCOL: RESUME_ACK value 2 (1 expected)" in err, err


@pytest.mark.parametrize("variant", VARIANTS)
def test_bitmap_outside_a_resume_is_refused(snap: Path, variant: str) -> None:
    """A RECV_BITMAP the loader never asked for (a normal serve) is a protocol error."""
    rc, err, _, _ = serve_resume(snap, variant, reply(bitmap("pc.ram", RAM_PAGES, set())),
                                     extra=())
    assert rc == 1 and "E_DEST_PROTOCOL" in err and "not a --resume run" in err, err


@pytest.mark.parametrize("variant", VARIANTS)
def test_silent_destination_times_out(snap: Path, variant: str) -> None:
    """No answer to RECV_BITMAP (not paused, or migrate-recover not listening on
    --to): E_TIMEOUT after --io-timeout, naming what it waited for."""
    def answer(sock: socket.socket, received: bytearray, cond: threading.Condition) -> None:
        wait_for(received, cond, b"\x07pc.bios")    # read it, say nothing

    rc, err, _, _ = serve_resume(snap, variant, answer, extra=("--resume", "--io-timeout", "0.5"))
    assert rc == 1, err
    assert "E_TIMEOUT: no RECV_BITMAP for every block from the destination within" in err, err


# ---- --resume --preempt: the destination's preempt channel again ------------------

RP_PONG, CMD_PING = 2, 2
PREEMPT_PING = struct.pack(">BHHI", 8, CMD_PING, 4, 2)


def preempt_records(stream: bytes) -> list[tuple[str, int, bool, bool]]:
    """(block, page, has_data, named) of each bare ram record on a preempt
    channel (``named``: the record carries its block id, no CONTINUE)."""
    out, pos, block = [], 0, ""
    while pos < len(stream):
        (v,) = struct.unpack_from(">Q", stream, pos)
        pos += 8
        flags, named = v & 0xFFF, not v & 0x20
        if named:
            n = stream[pos]
            block = stream[pos + 1:pos + 1 + n].decode()
            pos += 1 + n
        assert flags & 0x0A, f"record flags {flags:#x}"
        out.append((block, (v & ~0xFFF) // PS, bool(flags & 0x08), named))
        pos += PS if flags & 0x08 else 1
    return out


class PreemptDestination:
    """A unix listener playing a paused postcopy-preempt destination for one
    ``serve --resume --preempt``: main connection, bitmaps, then the preempt
    connection, PING/PONG, POSTCOPY_RESUME, RESUME_ACK, a re-sent request."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.listener.settimeout(20)
        self.main: socket.socket | None = None
        self.pre: socket.socket | None = None
        self.received, self.pre_received = bytearray(), bytearray()
        self.cond = threading.Condition()
        self.early_preempt = False
        self.closed: set[int] = set()   # ids of the buffers whose connection ended
        self.threads: list[threading.Thread] = []

    def _drain(self, s: socket.socket, into: bytearray) -> None:
        with contextlib.suppress(OSError):
            while chunk := s.recv(1 << 20):
                with self.cond:
                    into.extend(chunk)
                    self.cond.notify_all()
        with self.cond:
            self.closed.add(id(into))
            self.cond.notify_all()

    def _accept(self, into: bytearray) -> socket.socket:
        s, _ = self.listener.accept()
        t = threading.Thread(target=self._drain, args=(s, into), daemon=True)
        t.start()
        self.threads.append(t)
        return s

    def wait(self, into: bytearray, needle: bytes) -> bool:
        with self.cond:
            self.cond.wait_for(lambda: needle in into or id(into) in self.closed, timeout=30)
            return needle in into

    def play(self, present: set[int], request_page: int, *, drop_preempt: bool = False,
             pong: bool = True) -> None:
        self.main = self._accept(self.received)
        assert self.wait(self.received, b"\x07pc.bios")
        self.listener.settimeout(0.3)       # no second connection before the bitmaps
        with contextlib.suppress(TimeoutError, OSError):
            self.listener.accept()[0].close()
            self.early_preempt = True
        self.listener.settimeout(20)
        self.main.sendall(bitmap("pc.ram", RAM_PAGES, present)
                          + bitmap("pc.bios", BIOS_PAGES, set()))
        self.pre = self._accept(self.pre_received)
        if drop_preempt:    # a destination without postcopy-preempt: "...; ignoring"
            self.pre.shutdown(socket.SHUT_RDWR)
        assert self.wait(self.received, PREEMPT_PING)
        if not pong:
            return
        self.main.sendall(rp(RP_PONG, struct.pack(">I", 2)))
        if not self.wait(self.received, struct.pack(">BHH", 8, CMD_POSTCOPY_RESUME, 0)):
            return
        self.main.sendall(rp(RP_RESUME_ACK, struct.pack(">I", 1))
                          + request("pc.ram", 10) + request("pc.ram", request_page))
        assert self.wait(self.received, b"\x03")   # END of the ram section, then EOF
        with self.cond:
            self.cond.wait_for(lambda: self.received.endswith(b"\x00"), timeout=30)
        self.main.sendall(rp(RP_SHUT, struct.pack(">I", 0)))

    def close(self) -> None:
        for s in (self.main, self.pre, self.listener):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        for t in self.threads:
            t.join(timeout=10)


def serve_resume_preempt(snapshot: Path, tmp_path: Path, variant: str, **play: object
                         ) -> tuple[int, str, dict[str, object], PreemptDestination]:
    dest = PreemptDestination(tmp_path / "recover.sock")
    player = threading.Thread(target=dest.play, kwargs=play, daemon=True)
    player.start()
    try:
        env = {**os.environ, **(ASAN_ENV if variant == "asan" else {})}
        res = subprocess.run([str(loader_path(variant)), "serve", str(snapshot), "--to",
                              f"unix:{tmp_path / 'recover.sock'}", "--json", "--resume",
                              "--preempt", "--io-timeout", "2", "--shut-timeout", "20"],
                             capture_output=True, text=True, timeout=120, env=env, check=False)
        player.join(timeout=30)
    finally:
        dest.close()
    stats: dict[str, object] = json.loads(res.stdout) if res.stdout.strip() else {}
    return res.returncode, res.stderr, stats, dest


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_reopens_the_preempt_channel(snap: Path, tmp_path: Path, variant: str) -> None:
    """`serve --resume --preempt`: the main connection first, RECV_BITMAPs
    answered before any second connection; then the preempt connection and
    its PING before POSTCOPY_RESUME (QEMU's resume handler waits for the
    channel); the request re-sent after RESUME_ACK is answered on the preempt
    channel, whose first record names its block; a requested page the
    destination has goes nowhere; across both channels each missing page
    goes once and no present page at all."""
    present = set(range(0, 64)) | {99}
    page = next(p for p in range(120, RAM_PAGES, 3) if p not in present)
    rc, err, stats, dest = serve_resume_preempt(snap, tmp_path, variant, present=present,
                                                request_page=page)
    assert rc == 0, err
    assert not dest.early_preempt, "the preempt connection came before the bitmaps"
    main = bytes(dest.received)
    assert main.index(PREEMPT_PING) < main.index(struct.pack(">BHH", 8, CMD_POSTCOPY_RESUME, 0))
    pre = preempt_records(bytes(dest.pre_received))
    assert pre and pre[0][:3] == ("pc.ram", page, page in RAM_DATA) and pre[0][3], pre[:2]
    on_main = [(b, p) for b, p, _ in parse_pages(main)]
    sent = on_main + [(b, p) for b, p, _, _ in pre]
    assert len(sent) == len(set(sent)), "a page was sent twice"
    assert not {("pc.ram", p) for p in present} & set(sent)
    want = ({("pc.ram", p) for p in RAM_DATA} | {("pc.bios", p) for p in BIOS_DATA}) \
        - {("pc.ram", p) for p in present}
    data = {(b, p) for b, p, d in parse_pages(main) if d} | {(b, p) for b, p, d, _ in pre if d}
    assert data == want
    assert stats["ok"] and stats["double_sends"] == 0, stats
    pre_stats = stats["preempt"]
    assert isinstance(pre_stats, dict) and pre_stats["requests_served"] == 1, pre_stats
    assert pre_stats["requests_duplicate"] == 1, pre_stats   # the present page 10
    assert isinstance(stats["time_preempt_resumed_s"], float) and \
        0 < stats["time_preempt_resumed_s"] <= stats["time_resume_ack_s"], stats


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case, name, words", [
    ("drop-preempt", "E_CONNECT", "postcopy-preempt capability on"),
    ("no-pong", "E_TIMEOUT", "no PONG from the destination"),
])
def test_hostile_preempt_resume_is_one_clear_error(snap: Path, tmp_path: Path, variant: str,
                                                   case: str, name: str, words: str) -> None:
    """A resumed destination that drops the new preempt connection (it has no
    postcopy-preempt), or never answers the PING after it: one E_* line,
    exit 1, and POSTCOPY_RESUME is never sent."""
    rc, err, stats, dest = serve_resume_preempt(
        snap, tmp_path, variant, present=set(), request_page=1,
        drop_preempt=case == "drop-preempt", pong=case != "no-pong")
    assert rc == 1, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastsnap-loader serve: {name}: "), err
    assert words in lines[0], err
    assert struct.pack(">BHH", 8, CMD_POSTCOPY_RESUME, 0) not in bytes(dest.received)
    assert stats["error_name"] == name, stats
