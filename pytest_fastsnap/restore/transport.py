"""How the loader bridge reaches its destination QEMU: ``unix``, ``fd`` or
``tcp:HOST:PORT`` (the destination listens, the loader connects).

    parse_transport("tcp:127.0.0.1:0")   # Transport("tcp", "127.0.0.1", 0)
    tcp_uri("::1", 4444)                 # "tcp:[::1]:4444", QEMU's and the loader's syntax

HOST is an IPv4 address, an IPv6 address in brackets or a host name (the
same rules as the loader's ``--to``, ``src/bridge_net.c``); PORT is decimal
0..65535, 0 meaning "any free port" (the destination picks it and
:func:`listening_port` reads it back; the loader always gets the real one).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_fastsnap.qemu.machine import QemuMachine

KINDS = ("unix", "fd", "tcp")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class Transport:
    kind: str               # "unix", "fd" or "tcp"
    host: str = ""          # tcp: without brackets
    port: int = 0           # tcp: 0 = any free port

    def uri(self, port: int | None = None) -> str:
        """The tcp URI for QEMU and the loader (``tcp:[::1]:N`` for IPv6)."""
        return tcp_uri(self.host, self.port if port is None else port)


def _valid_host(host: str) -> bool:
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return 0 < len(host) <= 253 and all(_LABEL.fullmatch(p) for p in host.split("."))


def parse_tcp(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[V6]:PORT``) -> (host, port); ValueError names the problem."""
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0:
            raise ValueError(f"tcp:{spec}: '[' without ']' around the IPv6 address "
                             "(tcp:[::1]:PORT)")
        host, rest = spec[1:close], spec[close + 1:]
        if not rest.startswith(":"):
            raise ValueError(f"tcp:{spec}: expected ':PORT' after ']' (tcp:[ADDR]:PORT)")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"tcp:{spec}: {host!r} is not an IPv6 address") from None
        port = rest[1:]
    else:
        host, sep, port = spec.rpartition(":")
        if not sep:
            raise ValueError(f"tcp:{spec}: expected tcp:HOST:PORT")
        if ":" in host:
            raise ValueError(f"tcp:{spec}: an IPv6 address needs brackets: tcp:[ADDR]:PORT")
        if not host:
            raise ValueError(f"tcp:{spec}: HOST is empty (tcp:HOST:PORT)")
        if not _valid_host(host):
            what = "an IPv4 address" if re.fullmatch(r"[0-9.]+", host) else \
                "a host name or address"
            raise ValueError(f"tcp:{spec}: {host!r} is not {what}")
    if not re.fullmatch(r"0|[1-9][0-9]{0,4}", port) or int(port) > 65535:
        raise ValueError(f"tcp:{spec}: port {port!r} is not a decimal number 0..65535")
    return host, int(port)


def parse_transport(value: str) -> Transport:
    """``unix``, ``fd``, ``tcp`` (= ``tcp:127.0.0.1:0``) or ``tcp:HOST:PORT``."""
    if value in ("unix", "fd"):
        return Transport(value)
    if value == "tcp":
        return Transport("tcp", "127.0.0.1", 0)
    if value.startswith("tcp:"):
        host, port = parse_tcp(value[4:])
        return Transport("tcp", host, port)
    raise ValueError(f"transport {value!r}: one of unix, fd, tcp, tcp:HOST:PORT")


def tcp_uri(host: str, port: int) -> str:
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def listening_port(vm: QemuMachine) -> int:
    """The TCP port a destination listens on after ``migrate-incoming tcp:H:0``
    (``query-migrate``'s ``socket-address``)."""
    info = vm.qmp("query-migrate")
    for addr in info.get("socket-address", []):
        if addr.get("type") == "inet" and addr.get("port"):
            return int(addr["port"])
    raise RuntimeError(f"destination reports no listening TCP port: {info}")
