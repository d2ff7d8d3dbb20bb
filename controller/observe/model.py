"""Observed flows as the controller stores them, resolved to workloads.

A FlowRow is one aggregated flow: who connected (`source`) to whom (`destination`, the
listening side) on which service port, with what verdict, how often and when. Both ends
are Endpoints: the workload an address belongs to (or none), its labels and the process.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "PROTOCOLS",
    "VERDICTS",
    "Endpoint",
    "EndpointKey",
    "FlowRow",
    "endpoint_key",
    "endpoint_name",
    "latest_labels",
]

PROTOCOLS = ("tcp", "udp", "icmp")
VERDICTS = ("allowed", "denied", "would-deny")
_MAX_PORT = 65535

# ("workload", agent id) or ("address", IP text): what one endpoint of the map stands for.
EndpointKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One side of a flow.

    `address` is normalised (compressed IPv6, IPv4-mapped IPv6 as IPv4) so the same host
    reported in two spellings is one endpoint. `labels` is a read-only copy and takes no
    part in hashing.
    """

    workload: str  # agent id, "" when the address belongs to no known workload
    address: str  # IP text
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    process: str = ""  # process name on this side, "" when unknown

    def __post_init__(self) -> None:
        try:
            parsed = ipaddress.ip_address(self.address)
        except ValueError:
            raise ValueError(
                f"Endpoint.address: {self.address!r} is not an IPv4 or IPv6 address"
            ) from None
        if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
            # Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d.
            parsed = parsed.ipv4_mapped
        object.__setattr__(self, "address", str(parsed))
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))


@dataclass(frozen=True, slots=True)
class FlowRow:
    """One aggregated flow from `source` (the connecting side) to `destination`."""

    source: Endpoint
    destination: Endpoint
    port: int  # destination (service) port; 0 for icmp
    protocol: str  # "tcp" | "udp" | "icmp"
    verdict: str  # "allowed" | "denied" | "would-deny"
    count: int
    first_seen: float  # unix seconds
    last_seen: float

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"FlowRow.protocol: {self.protocol!r} is not one of {', '.join(PROTOCOLS)}"
            )
        if self.verdict not in VERDICTS:
            raise ValueError(
                f"FlowRow.verdict: {self.verdict!r} is not one of {', '.join(VERDICTS)}"
            )
        if self.protocol == "icmp" and self.port != 0:
            raise ValueError(f"FlowRow.port: icmp flows have port 0, got {self.port}")
        if self.protocol != "icmp" and not 1 <= self.port <= _MAX_PORT:
            raise ValueError(
                f"FlowRow.port: {self.protocol} port must be 1-{_MAX_PORT}, got {self.port}"
            )
        if self.count < 0:
            raise ValueError(f"FlowRow.count: must not be negative, got {self.count}")
        for name in ("first_seen", "last_seen"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(
                    f"FlowRow.{name}: must be a finite time, got {getattr(self, name)}"
                )


def endpoint_name(e: Endpoint) -> str:
    """The workload id, or the address when the endpoint belongs to no known workload."""
    return e.workload or e.address


def endpoint_key(e: Endpoint) -> EndpointKey:
    """What the endpoint stands for: its workload, or its bare address when unknown."""
    return ("workload", e.workload) if e.workload else ("address", e.address)


def latest_labels(rows: Iterable[FlowRow]) -> dict[EndpointKey, Mapping[str, str]]:
    """Each endpoint's labels as of its most recently seen flow.

    Rows may carry different labels for one workload when they were relabelled between
    flows; the latest wins, and ties are broken by the label text so the result does not
    depend on the order of `rows`.
    """
    best: dict[EndpointKey, tuple[float, tuple[tuple[str, str], ...]]] = {}
    for row in rows:
        for end in (row.source, row.destination):
            candidate = (row.last_seen, tuple(sorted(end.labels.items())))
            key = endpoint_key(end)
            if key not in best or candidate > best[key]:
                best[key] = candidate
    return {key: MappingProxyType(dict(items)) for key, (_, items) in best.items()}
