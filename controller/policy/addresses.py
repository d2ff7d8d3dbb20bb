"""IP networks and host addresses: parsing with operator-facing errors, and a stable order."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from controller.policy.errors import FieldProblem
from controller.policy.names import not_a_string

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


def parse_network(text: object) -> Network:
    """A CIDR ("203.0.113.0/24", "2001:db8::/48"; a bare address is a /32 or /128).

    Host bits must be zero: "10.0.0.1/24" is refused rather than silently widened.
    """
    if not isinstance(text, str):
        raise FieldProblem(not_a_string(text, "network"))
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        widened = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise FieldProblem(f"{text!r} is not a valid IPv4 or IPv6 network") from None
    raise FieldProblem(f"{text!r} has host bits set; the network is '{widened}'")


def parse_host(text: str) -> Address:
    """One host address without prefix length; ValueError if it is not one."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 host address") from None


def is_single_host(network: Network) -> bool:
    """A /32 or /128 is one host, which belongs in a hash set rather than an interval set."""
    return network.prefixlen == network.max_prefixlen


def address_order(address: Address) -> tuple[int, int]:
    """Sort key: IPv4 before IPv6, then numerically."""
    return (address.version, int(address))


def network_order(network: Network) -> tuple[int, int, int]:
    """Sort key: IPv4 before IPv6, then by first address, then by prefix length."""
    return (network.version, int(network.network_address), network.prefixlen)
