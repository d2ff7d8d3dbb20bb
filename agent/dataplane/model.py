"""The compiled ruleset, checked and normalised for the renderers and the evaluator.

`load_ruleset` is the one place a wire `Ruleset` is validated: every backend renders,
and the evaluator judges flows from, the same checked model, so they cannot disagree on
what a rule means. Invalid input raises RulesetError naming the field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from agent.dataplane.backend import RulesetError
from bulkhead.v1 import ruleset_pb2
from bulkhead.v1.contract import merge_port_ranges

# Both backends send the packets default-deny drops (or, in visibility mode, would drop)
# to this NFLOG group with one of these prefixes; agent/observe reads them as denied flows.
NFLOG_GROUP = 1001
DENY_PREFIX = "bulkhead-deny"
WOULD_DENY_PREFIX = "bulkhead-would-deny"

SET_NAME = re.compile(r"[a-z][a-z0-9_]{0,30}")

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network
IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address
_Network = TypeVar("_Network", IPv4Network, IPv6Network)


class Direction(Enum):
    INGRESS = "ingress"
    EGRESS = "egress"


class Protocol(Enum):
    ANY = "any"
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"


_DIRECTIONS = {
    ruleset_pb2.DIRECTION_INGRESS: Direction.INGRESS,
    ruleset_pb2.DIRECTION_EGRESS: Direction.EGRESS,
}
_PROTOCOLS = {
    ruleset_pb2.PROTOCOL_ANY: Protocol.ANY,
    ruleset_pb2.PROTOCOL_TCP: Protocol.TCP,
    ruleset_pb2.PROTOCOL_UDP: Protocol.UDP,
    ruleset_pb2.PROTOCOL_ICMP: Protocol.ICMP,
}
_ACTIONS = {ruleset_pb2.ACTION_ALLOW: True, ruleset_pb2.ACTION_DENY: False}


@dataclass(frozen=True)
class AddressGroup:
    """One AddressSet split by family and by host/network; networks are collapsed."""

    name: str
    v4_hosts: tuple[IPv4Address, ...]
    v4_networks: tuple[IPv4Network, ...]
    v6_hosts: tuple[IPv6Address, ...]
    v6_networks: tuple[IPv6Network, ...]


@dataclass(frozen=True)
class PolicyRule:
    """One checked Rule; ports are sorted, merged, inclusive ranges (empty: any port)."""

    direction: Direction
    protocol: Protocol
    ports: tuple[tuple[int, int], ...]
    peer_set: str
    allow: bool
    policy: str
    rule_id: str

    @property
    def label(self) -> str:
        """Rule id and policy name, for comments and messages."""
        return f"{self.rule_id} {self.policy}".strip()


@dataclass(frozen=True)
class CompiledRuleset:
    groups: tuple[AddressGroup, ...]
    rules: tuple[PolicyRule, ...]


def load_ruleset(ruleset: ruleset_pb2.Ruleset) -> CompiledRuleset:
    """Check and normalise a wire ruleset; RulesetError names the first bad field."""
    groups: list[AddressGroup] = []
    for index, address_set in enumerate(ruleset.sets):
        groups.append(_load_group(f"sets[{index}]", address_set))
    names = [group.name for group in groups]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise RulesetError(f"sets[{index}].name: {name!r} is used by another set")
    known = set(names)
    rules = tuple(
        _load_rule(f"rules[{index}]", rule, known) for index, rule in enumerate(ruleset.rules)
    )
    return CompiledRuleset(groups=tuple(groups), rules=rules)


def _load_group(field: str, address_set: ruleset_pb2.AddressSet) -> AddressGroup:
    if not SET_NAME.fullmatch(address_set.name):
        raise RulesetError(f"{field}.name: {address_set.name!r} does not match {SET_NAME.pattern}")
    v4_hosts: set[IPv4Address] = set()
    v6_hosts: set[IPv6Address] = set()
    for index, text in enumerate(address_set.hosts):
        try:
            host = ipaddress.ip_address(text)
        except ValueError:
            raise RulesetError(f"{field}.hosts[{index}]: {text!r} is not a host address") from None
        if isinstance(host, IPv4Address):
            v4_hosts.add(host)
        else:
            v6_hosts.add(host)
    v4_networks: list[IPv4Network] = []
    v6_networks: list[IPv6Network] = []
    for index, text in enumerate(address_set.networks):
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise RulesetError(f"{field}.networks[{index}]: {text!r}: {exc}") from None
        if isinstance(network, IPv4Network):
            v4_networks.append(network)
        else:
            v6_networks.append(network)
    return AddressGroup(
        name=address_set.name,
        v4_hosts=tuple(sorted(v4_hosts, key=int)),
        v4_networks=_collapse(v4_networks),
        v6_hosts=tuple(sorted(v6_hosts, key=int)),
        v6_networks=_collapse(v6_networks),
    )


def _collapse(networks: Iterable[_Network]) -> tuple[_Network, ...]:
    # Interval sets refuse overlapping elements, and sets from several IP lists overlap.
    return tuple(ipaddress.collapse_addresses(networks))


def _load_rule(field: str, rule: ruleset_pb2.Rule, known_sets: set[str]) -> PolicyRule:
    direction = _DIRECTIONS.get(rule.direction)
    if direction is None:
        raise RulesetError(f"{field}.direction: must be ingress or egress")
    protocol = _PROTOCOLS.get(rule.protocol)
    if protocol is None:
        raise RulesetError(f"{field}.protocol: must be any, tcp, udp or icmp")
    allow = _ACTIONS.get(rule.action)
    if allow is None:
        raise RulesetError(f"{field}.action: must be allow or deny")
    if rule.peer_set not in known_sets:
        raise RulesetError(f"{field}.peer_set: {rule.peer_set!r} is not a set of this ruleset")
    if rule.ports and protocol not in (Protocol.TCP, Protocol.UDP):
        raise RulesetError(f"{field}.ports: only tcp and udp rules take ports")
    ranges: list[tuple[int, int]] = []
    for index, port_range in enumerate(rule.ports):
        first, last = port_range.first, port_range.last
        if not 1 <= first <= last <= 65535:
            raise RulesetError(
                f"{field}.ports[{index}]: {first}-{last} is not a range within 1-65535"
            )
        ranges.append((first, last))
    return PolicyRule(
        direction=direction,
        protocol=protocol,
        ports=merge_port_ranges(ranges),
        peer_set=rule.peer_set,
        allow=allow,
        policy=rule.policy,
        rule_id=rule.id,
    )
