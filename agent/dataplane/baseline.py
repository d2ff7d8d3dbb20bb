"""The local baseline that keeps a host reachable whatever the policy says.

The baseline is agent configuration, not controller policy: the enforcement mode, the
failsafe ports (ssh by default) and the controller endpoints the agent must reach.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pydantic import TypeAdapter

MIN_PORT = 1
MAX_PORT = 65535


class Mode(StrEnum):
    """How a workload treats traffic no rule allows."""

    ENFORCE = "enforce"
    VISIBILITY = "visibility"


@dataclass(frozen=True)
class PortSpec:
    """An inclusive destination port range of one transport protocol."""

    protocol: Literal["tcp", "udp"]
    first: int
    last: int

    def __post_init__(self) -> None:
        if self.protocol not in ("tcp", "udp"):
            raise ValueError(f"protocol: {self.protocol!r} is not 'tcp' or 'udp'")
        for name, port in (("first", self.first), ("last", self.last)):
            if not MIN_PORT <= port <= MAX_PORT:
                raise ValueError(f"{name}: port {port} is outside {MIN_PORT}-{MAX_PORT}")
        if self.first > self.last:
            raise ValueError(f"first: port range {self.first}-{self.last} is reversed")

    def __str__(self) -> str:
        if self.first == self.last:
            return f"{self.protocol}/{self.first}"
        return f"{self.protocol}/{self.first}-{self.last}"


def parse_port_spec(text: str) -> PortSpec:
    """Parse "tcp/22", "udp/53" or "tcp/8000-8100"; ValueError names the problem."""
    protocol, slash, ports = text.strip().partition("/")
    if not slash:
        raise ValueError(f"port spec {text!r}: expected PROTOCOL/PORT, e.g. tcp/22")
    protocol = protocol.lower()
    if protocol not in ("tcp", "udp"):
        raise ValueError(f"port spec {text!r}: protocol {protocol!r} is not tcp or udp")
    first_text, dash, last_text = ports.partition("-")
    numbers = [first_text, last_text] if dash else [first_text]
    for number in numbers:
        if not number.isdigit():
            raise ValueError(f"port spec {text!r}: {number!r} is not a port number")
    first, last = int(numbers[0]), int(numbers[-1])
    try:
        return PortSpec("tcp" if protocol == "tcp" else "udp", first, last)
    except ValueError as exc:
        raise ValueError(f"port spec {text!r}: {exc}") from None


@dataclass(frozen=True)
class Endpoint:
    """A controller address (IPv4 or IPv6 literal) and TCP port the agent dials."""

    address: str
    port: int

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise ValueError(f"address: {self.address!r} is not an IP address") from None
        if not MIN_PORT <= self.port <= MAX_PORT:
            raise ValueError(f"port: {self.port} is outside {MIN_PORT}-{MAX_PORT}")


@dataclass(frozen=True)
class Baseline:
    """What a managed host always allows, and whether it drops the rest."""

    mode: Mode
    failsafe_inbound: tuple[PortSpec, ...] = ()
    failsafe_outbound: tuple[PortSpec, ...] = ()
    controllers: tuple[Endpoint, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.mode, Mode):
            raise ValueError(f"mode: {self.mode!r} is not one of enforce, visibility")


@cache
def _adapter() -> TypeAdapter[Baseline]:
    # pydantic only on this path (the CLI tools that take a baseline as JSON): a module
    # once loaded stays resident, and the agent would carry pydantic for nothing.
    from pydantic import TypeAdapter

    return TypeAdapter(Baseline)


def baseline_to_json(baseline: Baseline) -> str:
    """The baseline as a JSON object (mode, failsafe_inbound, failsafe_outbound, controllers)."""
    return _adapter().dump_json(baseline).decode()


def baseline_from_json(text: str | bytes) -> Baseline:
    """Parse baseline_to_json's output; ValueError (pydantic's) names each bad field."""
    return _adapter().validate_json(text)
