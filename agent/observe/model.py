"""The records observation produces: processes, live connections and aggregated flows."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Direction(enum.Enum):
    INBOUND = "inbound"  # to a local listening port
    OUTBOUND = "outbound"  # from this host to a peer's port
    LISTEN = "listen"  # a listening (TCP) or unconnected (UDP) socket


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    DENIED = "denied"
    WOULD_DENY = "would-deny"  # visibility mode: recorded, not dropped


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    name: str
    exe: str
    cmdline: tuple[str, ...]
    user: str
    start_time: float  # unix seconds
    unit: str  # systemd unit from the process's cgroup, "" when it runs in none


@dataclass(frozen=True, slots=True)
class Connection:
    """One socket of the host's socket tables, with the process that owns it."""

    protocol: str  # "tcp" | "udp"
    state: str  # kernel state name: LISTEN, ESTABLISHED, SYN_SENT, ... ("UNCONN" for udp)
    local_ip: str
    local_port: int
    peer_ip: str  # "" for listening sockets
    peer_port: int  # 0 for listening sockets
    direction: Direction
    inode: int
    uid: int
    process: ProcessInfo | None  # None when no process holds it any more (or it is hidden)

    @property
    def service_port(self) -> int:
        """The port that names the service: ours for inbound and listening, the peer's otherwise."""
        return self.peer_port if self.direction is Direction.OUTBOUND else self.local_port
