"""Port specifications of a policy rule: tcp/N, udp/N, tcp/N-M, udp/N-M, icmp, any."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from controller.policy.errors import FieldProblem
from controller.policy.names import describe_value

MAX_PORT = 65535
_PORT = re.compile(r"(tcp|udp)/([0-9]+)(?:-([0-9]+))?")
_FORMS = "expected tcp/N, udp/N, tcp/N-M, udp/N-M, icmp or any"


class PortProtocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"
    ANY = "any"


@dataclass(frozen=True, order=True)
class PortSpec:
    """One entry of a rule's `ports`; first/last are 0 for icmp and any."""

    protocol: PortProtocol
    first: int = 0
    last: int = 0

    def __str__(self) -> str:
        if self.protocol in (PortProtocol.ICMP, PortProtocol.ANY):
            return self.protocol.value
        if self.first == self.last:
            return f"{self.protocol.value}/{self.first}"
        return f"{self.protocol.value}/{self.first}-{self.last}"


def parse_port(text: object) -> PortSpec:
    """Parse one port specification; raises FieldProblem saying what is wrong."""
    if not isinstance(text, str):
        got = describe_value(text)
        raise FieldProblem(f"expected a port like 'tcp/443' as a string, got {got}")
    if text in (PortProtocol.ICMP, PortProtocol.ANY):
        return PortSpec(PortProtocol(text))
    match = _PORT.fullmatch(text)
    if match is None:
        raise FieldProblem(f"{text!r}: {_FORMS}")
    protocol, first_text, last_text = match.groups()
    first = int(first_text)
    last = int(last_text) if last_text is not None else first
    if not (1 <= first <= MAX_PORT and 1 <= last <= MAX_PORT):
        raise FieldProblem(f"{text!r}: port must be 1-{MAX_PORT}")
    if first > last:
        raise FieldProblem(f"{text!r}: range start {first} is above its end {last}")
    return PortSpec(PortProtocol(protocol), first, last)
