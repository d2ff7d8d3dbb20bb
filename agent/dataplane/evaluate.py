"""Whether the rendered policy would let a flow be established (pure logic, no kernel).

This mirrors what the nftables rules do to the first packet of a flow: loopback and the
baseline first, then the policy rules in order (first match wins), then the default.
The conntrack cutter asks it about every tracked flow after a policy change.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection
from dataclasses import dataclass

from agent.dataplane.baseline import Baseline, Mode, PortSpec
from agent.dataplane.model import (
    AddressGroup,
    CompiledRuleset,
    Direction,
    PolicyRule,
    Protocol,
    load_ruleset,
)
from bulkhead.v1 import ruleset_pb2

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_PROTOCOL_NUMBERS = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP}


@dataclass(frozen=True)
class Flow:
    """The original direction of a connection; ports are 0 where the protocol has none."""

    protocol: int  # IPPROTO number
    src: str
    sport: int
    dst: str
    dport: int


class PolicyEvaluator:
    """A ruleset and baseline checked once, to judge many flows quickly."""

    def __init__(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
        self._compiled: CompiledRuleset = load_ruleset(ruleset)
        self._baseline = baseline
        self._groups = {group.name: group for group in self._compiled.groups}
        self._host_sets = {
            group.name: frozenset[IPAddress]((*group.v4_hosts, *group.v6_hosts))
            for group in self._compiled.groups
        }

    def is_allowed(self, flow: Flow, local_addresses: Collection[str]) -> bool:
        src = ipaddress.ip_address(flow.src)
        dst = ipaddress.ip_address(flow.dst)
        local = {ipaddress.ip_address(address) for address in local_addresses}
        if self._baseline.mode is Mode.VISIBILITY:
            return True
        if src.is_loopback or dst.is_loopback or (src in local and dst in local):
            return True
        if dst in local:
            return self._ingress_allowed(flow, peer=src)
        if src in local:
            return self._egress_allowed(flow, peer=dst)
        return True  # neither end is ours: forwarded traffic, which the table never filters

    def _ingress_allowed(self, flow: Flow, peer: IPAddress) -> bool:
        if _failsafe_matches(self._baseline.failsafe_inbound, flow):
            return True
        return self._policy_allows(Direction.INGRESS, flow, peer)

    def _egress_allowed(self, flow: Flow, peer: IPAddress) -> bool:
        if _failsafe_matches(self._baseline.failsafe_outbound, flow):
            return True
        for endpoint in self._baseline.controllers:
            if (
                flow.protocol == socket.IPPROTO_TCP
                and ipaddress.ip_address(endpoint.address) == peer
                and endpoint.port == flow.dport
            ):
                return True
        return self._policy_allows(Direction.EGRESS, flow, peer)

    def _policy_allows(self, direction: Direction, flow: Flow, peer: IPAddress) -> bool:
        for rule in self._compiled.rules:
            if rule.direction is direction and self._rule_matches(rule, flow, peer):
                return rule.allow
        return False  # default deny

    def _rule_matches(self, rule: PolicyRule, flow: Flow, peer: IPAddress) -> bool:
        if not _protocol_matches(rule, flow.protocol, peer.version):
            return False
        if rule.ports and not any(first <= flow.dport <= last for first, last in rule.ports):
            return False
        if peer in self._host_sets[rule.peer_set]:
            return True
        return _in_networks(self._groups[rule.peer_set], peer)


def is_allowed(
    ruleset: ruleset_pb2.Ruleset,
    baseline: Baseline,
    flow: Flow,
    local_addresses: Collection[str],
) -> bool:
    """Whether the policy rendered from ruleset and baseline lets this flow be established."""
    return PolicyEvaluator(ruleset, baseline).is_allowed(flow, local_addresses)


def _failsafe_matches(specs: Collection[PortSpec], flow: Flow) -> bool:
    numbers = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
    return any(
        numbers[spec.protocol] == flow.protocol and spec.first <= flow.dport <= spec.last
        for spec in specs
    )


def _protocol_matches(rule: PolicyRule, protocol: int, ip_version: int) -> bool:
    if rule.protocol is Protocol.ANY:
        return True
    if rule.protocol is Protocol.ICMP:
        # An ICMP rule matches ICMP in its IPv4 form and ICMPv6 in its IPv6 form only.
        return protocol == (socket.IPPROTO_ICMP if ip_version == 4 else socket.IPPROTO_ICMPV6)
    return protocol == _PROTOCOL_NUMBERS[rule.protocol]


def _in_networks(group: AddressGroup, peer: IPAddress) -> bool:
    if isinstance(peer, ipaddress.IPv4Address):
        return any(peer in network for network in group.v4_networks)
    return any(peer in network for network in group.v6_networks)
