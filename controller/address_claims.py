"""Which of the addresses an agent reports it may hold.

An agent's addresses go verbatim into every peer's address sets, so a host that lies
about them would borrow another workload's access. A reported address is a claim; it is
accepted (compiled) only when it is

* a workload address: global unicast or a private range, never unspecified, loopback,
  link-local, multicast, reserved, broadcast, "this network" (0.0.0.0/8) or v4-mapped;
* inside the agent's allowed ranges, when the operator set any (token or
  `bulkhead agent addresses`);
* not held by another live agent. The first holder keeps it: a host that starts claiming
  a neighbour's address gains nothing, and the neighbour loses nothing. An address held by
  an agent that is offline or revoked passes to the new claimant.

Pure functions; the controller keeps the index of who holds what (controller/fleet_claims).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from controller.policy.addresses import Address, Network

DEFAULT_MAX_AGENT_ADDRESSES = 64
MAX_ALLOWED_RANGES = 64

_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, used inside clouds


def address_kind_problem(address: Address) -> str | None:
    """Why ADDRESS can never be a workload address, or None."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return "carries a scope; send the bare address"
        if address.ipv4_mapped is not None:
            return "is IPv4-mapped; report the IPv4 address itself"
    if address.is_unspecified:
        return "is unspecified"
    if address.is_loopback:
        return "is loopback"
    if address.is_link_local:
        return "is link-local; peers cannot use it"
    if address.is_multicast:
        return "is multicast"
    if isinstance(address, ipaddress.IPv4Address) and address in _THIS_NETWORK:
        return "is in 0.0.0.0/8 ('this network')"
    if address.is_reserved:
        return "is reserved or broadcast"
    if not (address.is_global or address.is_private or address in _SHARED):
        return "is not a global unicast or private address"
    return None


@functools.lru_cache(maxsize=1 << 16)
def classify(text: str) -> tuple[Address, str, str | None]:
    """TEXT as an address, its canonical text, and why it can never be a workload address
    (or None); ValueError if it is not an address. Cached: every reconnect of every agent
    asks about the same addresses again, and Python's is_private tests some 15 networks
    (a reconnect's hello: 88 -> 37 us of CPU). 65,536 entries of about 300 bytes: the
    addresses of 32,000 two-address agents in at most 20 MB; invalid text is not cached."""
    address = ipaddress.ip_address(text)
    return address, str(address), address_kind_problem(address)


def parse_ranges(texts: Sequence[str], field_name: str) -> tuple[list[Network], list[str]]:
    """Allowed ranges as networks, and a problem per bad entry (naming FIELD_NAME[i])."""
    problems: list[str] = []
    if len(texts) > MAX_ALLOWED_RANGES:
        return [], [f"{field_name}: {len(texts)} ranges; at most {MAX_ALLOWED_RANGES}"]
    networks: list[Network] = []
    for index, text in enumerate(texts):
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError:
            problems.append(f"{field_name}[{index}]: {text!r} is not a CIDR with host bits zero")
    return networks, problems


def canonical_ranges(networks: Sequence[Network]) -> list[str]:
    """Ranges as stored: canonical text, sorted, without duplicates."""
    unique = sorted(set(networks), key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    return [str(n) for n in unique]


def in_ranges(address: Address, ranges: Sequence[Network]) -> bool:
    return not ranges or any(address.version == n.version and address in n for n in ranges)


@dataclass(frozen=True)
class Claim:
    """The outcome for one agent's report: accepted addresses (canonical, sorted) and the
    refused ones with the reason."""

    accepted: tuple[str, ...]
    refused: dict[str, str] = field(default_factory=dict)
    # Addresses taken from a holder that is no longer live: address -> that holder.
    taken_over: dict[str, str] = field(default_factory=dict)


def resolve(
    agent_id: str,
    reported: Sequence[str],
    allowed: Sequence[Network],
    holder: Callable[[str], tuple[str, bool] | None],
) -> Claim:
    """Decide AGENT_ID's claims. HOLDER(address) gives the other agent holding it, if
    any, and whether that agent is live. REPORTED must be valid address texts."""
    accepted: list[tuple[Address, str]] = []
    refused: dict[str, str] = {}
    taken: dict[str, str] = {}
    seen: set[str] = set()
    for text in reported:
        address, canonical, problem = classify(text)
        if canonical in seen:  # "2001:DB8::1" and "2001:db8::1" are one address
            continue
        seen.add(canonical)
        if problem is None and not in_ranges(address, allowed):
            shown = ", ".join(str(n) for n in allowed)
            problem = f"outside the agent's allowed ranges ({shown})"
        if problem is None:
            held = holder(canonical)
            if held is not None and held[0] != agent_id:
                if held[1]:
                    problem = f"held by agent {held[0]}"
                else:
                    taken[canonical] = held[0]
        if problem is not None:
            refused[canonical] = problem
        else:
            accepted.append((address, canonical))
    accepted.sort(key=lambda item: (item[0].version, int(item[0])))
    return Claim(tuple(c for _, c in accepted), refused, taken)
