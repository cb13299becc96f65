"""The bridge (``fastsnap-loader serve``) against a synthetic destination, no QEMU.

The destination is a Python socket pair end: it drains the migration stream
and writes return-path messages the loader must treat as hostile input.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from pytest_fastsnap.native.loader import ASAN_ENV, loader_path
from pytest_fastsnap.snapshot.writer import write_snapshot

RP_SHUT, RP_PONG, RP_REQ_PAGES_ID = 1, 2, 3
PING_PACKAGE_LOADED = 3


def rp_message(kind: int, payload: bytes) -> bytes:
    return struct.pack(">HH", kind, len(payload)) + payload


def request(block: str, start: int, length: int) -> bytes:
    name = block.encode()
    return rp_message(RP_REQ_PAGES_ID,
                      struct.pack(">QIB", start, length, len(name)) + name)


def serve_synthetic(snapshot: Path, replies: bytes, variant: str = "release",
                    timeout: float = 60, extra: tuple[str, ...] = ()) -> dict[str, object]:
    """Run ``serve`` on one end of a socket pair; the other end sends *replies*
    at once and drains everything the loader writes.  Returns the --json stats."""
    ours, theirs = socket.socketpair()
    received = bytearray()

    def drain() -> None:
        with contextlib.suppress(OSError):  # the loader may exit and the pair be closed
            while chunk := ours.recv(1 << 20):
                received.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    try:
        ours.sendall(replies)
        reader.start()
        env = dict(ASAN_ENV) if variant == "asan" else {}
        res = subprocess.run([str(loader_path(variant)), "serve", str(snapshot), "--to",
                              f"fd:{theirs.fileno()}", "--json", "--shut-timeout", "20",
                              *extra],
                             pass_fds=(theirs.fileno(),), capture_output=True, text=True,
                             timeout=timeout, env={**os.environ, **env}, check=False)
    finally:
        theirs.close()
        ours.shutdown(socket.SHUT_RDWR)
        reader.join(timeout=10)
        ours.close()
    assert res.returncode == 0, res.stderr
    stats: dict[str, object] = json.loads(res.stdout)
    stats["stream_bytes"] = len(received)
    return stats


@pytest.mark.parametrize("variant", ["release", "asan"])
def test_request_length_near_4g_is_served_not_dropped(tmp_path: Path, variant: str) -> None:
    """A REQ_PAGES length of 0xffffffff over a 4 GiB block: rounding it up to
    pages in 32 bits wrapped to zero pages and the request vanished."""
    size = 4 << 30
    snap = write_snapshot(tmp_path / "big.img", "pc-q35-10.0", [("pc.ram", size, {})])
    replies = (request("pc.ram", 0, 0xFFFFFFFF)
               + rp_message(RP_PONG, struct.pack(">I", PING_PACKAGE_LOADED))
               + rp_message(RP_SHUT, struct.pack(">I", 0)))
    stats = serve_synthetic(snap, replies, variant, timeout=180)
    assert stats["requests"] == 1
    assert stats["requests_duplicate"] == 0, stats
    assert stats["pages_on_request"] == size // 4096, stats
    assert stats["double_sends"] == 0


@pytest.mark.parametrize("variant", ["release", "asan"])
def test_non_ascii_block_id_is_valid_json(tmp_path: Path, variant: str) -> None:
    """Block ids and machine names are bytes (Latin-1 in the Python reader):
    the bridge wrote bytes >= 0x80 raw, which is not UTF-8 and so not JSON."""
    block_id, machine = "ram\xe9\xff\x7f", "pc-\xb5"
    snap = write_snapshot(tmp_path / "s.img", machine, [(block_id, bytes(8192))])
    res = subprocess.run([str(loader_path(variant)), "serve", str(snap), "--describe"],
                         capture_output=True, timeout=30, check=False,
                         env={**os.environ, **(ASAN_ENV if variant == "asan" else {})})
    assert res.returncode == 0, res.stderr
    assert res.stdout.isascii(), res.stdout
    described = json.loads(res.stdout)
    assert described["machine"] == machine
    assert [b["id"] for b in described["blocks"]] == [block_id]
    # The local loader's inspect goes through the same writer and agrees.
    res = subprocess.run([str(loader_path(variant)), "inspect", str(snap), "--json"],
                         capture_output=True, timeout=30, check=False,
                         env={**os.environ, **(ASAN_ENV if variant == "asan" else {})})
    assert json.loads(res.stdout)["blocks"][0]["id"] == block_id


@pytest.mark.parametrize("variant", ["release", "asan"])
def test_host_page_request_is_served_whole(tmp_path: Path, variant: str) -> None:
    """With --host-page-size pc.ram=2M a one-page request is answered with its
    whole host page (512 target pages, zero ones included), each page once."""
    pages = {i: i.to_bytes(4, "little") * 1024 for i in range(0, 1024, 3)}
    snap = write_snapshot(tmp_path / "s.img", "pc", [("pc.ram", 4 << 20, pages)])
    replies = (request("pc.ram", 700 * 4096, 4096)
               + rp_message(RP_PONG, struct.pack(">I", PING_PACKAGE_LOADED))
               + rp_message(RP_SHUT, struct.pack(">I", 0)))
    stats = serve_synthetic(snap, replies, variant, extra=("--host-page-size", "pc.ram=2M"))
    assert stats["requests"] == 1 and stats["double_sends"] == 0
    assert stats["pages_on_request"] in (0, 512), stats   # 0: the eager stream got there first
    assert stats["pages_data"] == len(pages)
    assert stats["pages_data"] + stats["pages_zero"] == 1024   # zero pages of host pages too


@pytest.mark.parametrize("value", ["nosuch=2M", "pc.ram=3M", "pc.ram=1K", "pc.ram"])
def test_host_page_size_refused(tmp_path: Path, value: str) -> None:
    snap = write_snapshot(tmp_path / "s.img", "pc", [("pc.ram", bytes(4 << 20))])
    res = subprocess.run([str(loader_path()), "serve", str(snap), "--describe",
                          "--host-page-size", value], capture_output=True, text=True,
                         timeout=30, check=False)
    assert res.returncode == 2, res.stderr
    assert "E_USAGE" in res.stderr and "--host-page-size" in res.stderr
