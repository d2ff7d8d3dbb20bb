"""Policies as clauses: which members get which rules towards which peer list.

Each rule "from F to T on P" compiles to two clauses: INGRESS on the members of T from the
addresses of F, and EGRESS on the members of F towards the addresses of T. IP lists and
CIDRs have no agent, so only the managed side of such a rule is ever programmed. A
clause's rules name their address set after the remote peer list's text, not its
addresses: when a workload is relabelled or readdressed, elements change, names do not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from bulkhead.v1 import ruleset_pb2
from bulkhead.v1.contract import merge_port_ranges
from controller.policy.addresses import Address, parse_host
from controller.policy.peers import IPListPeer, Peer, peer_key
from controller.policy.ports import PortProtocol, PortSpec
from controller.policy.resources import Policy

SET_NAME_PREFIX = "p_"
_HASH_CHARS = 12

_Protocol = ruleset_pb2.Protocol
_Direction = ruleset_pb2.Direction
_PortGroup = tuple[_Protocol, tuple[tuple[int, int], ...]]


@dataclass(frozen=True)
class Workload:
    """A managed host as the compiler sees it; `addresses` are plain host addresses."""

    agent_id: str
    labels: Mapping[str, str]
    addresses: tuple[str, ...]
    # Parsed here, once: a failure names the address before anything is compiled.
    hosts: frozenset[Address] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hosts", frozenset(parse_host(a) for a in self.addresses))


@dataclass(frozen=True)
class Clause:
    """The RULES that every member of LOCAL gets, towards the addresses of REMOTE, which
    fill the set SET_NAME."""

    local: tuple[Peer, ...]
    remote: tuple[Peer, ...]
    set_name: str
    rules: tuple[ruleset_pb2.Rule, ...]


def clauses_of(policies: Sequence[Policy]) -> list[Clause]:
    """Every clause of POLICIES, in rule order: by the order given (the caller sorts them
    by name), rule index, direction (ingress first), protocol."""
    clauses = []
    for policy in policies:
        for rule in policy.spec.rules:
            groups = _port_groups(rule.ports)
            for direction, local, remote in (
                (ruleset_pb2.DIRECTION_INGRESS, rule.to, rule.from_),
                (ruleset_pb2.DIRECTION_EGRESS, rule.from_, rule.to),
            ):
                name = set_name(list_key(remote))
                rules = tuple(
                    _make_rule(policy.metadata.name, direction, group, name) for group in groups
                )
                clauses.append(Clause(tuple(local), tuple(remote), name, rules))
    return clauses


def list_key(peers: Iterable[Peer]) -> str:
    """Canonical text of a peer list (the union of its peers): equal lists, equal keys."""
    return "[" + ",".join(sorted({peer_key(peer) for peer in peers})) + "]"


def set_name(key: str) -> str:
    """The name of the address set of the peer list with text KEY."""
    return SET_NAME_PREFIX + _short_hash(key.encode())


def referenced_iplists(policy: Policy) -> set[str]:
    """Names of the IP lists the policy's peers name (the store checks that they exist)."""
    return {
        peer.name
        for rule in policy.spec.rules
        for peer in (*rule.from_, *rule.to)
        if isinstance(peer, IPListPeer)
    }


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:_HASH_CHARS]


def _port_groups(ports: Iterable[PortSpec]) -> list[_PortGroup]:
    """One (protocol, port ranges) per protocol, in Protocol enum order."""
    by_protocol: dict[PortProtocol, list[tuple[int, int]]] = {}
    for spec in ports:
        by_protocol.setdefault(spec.protocol, []).append((spec.first, spec.last))
    if PortProtocol.ANY in by_protocol:
        return [(ruleset_pb2.PROTOCOL_ANY, ())]  # every protocol and port: nothing else to add
    groups: list[_PortGroup] = []
    for protocol, wire in (
        (PortProtocol.TCP, ruleset_pb2.PROTOCOL_TCP),
        (PortProtocol.UDP, ruleset_pb2.PROTOCOL_UDP),
        (PortProtocol.ICMP, ruleset_pb2.PROTOCOL_ICMP),
    ):
        if protocol in by_protocol:
            ranges = () if protocol == PortProtocol.ICMP else by_protocol[protocol]
            groups.append((wire, merge_port_ranges(ranges)))
    return groups


def _make_rule(
    policy: str, direction: _Direction, group: _PortGroup, peer_set: str
) -> ruleset_pb2.Rule:
    protocol, ranges = group
    rule = ruleset_pb2.Rule(
        direction=direction,
        protocol=protocol,
        ports=[ruleset_pb2.PortRange(first=first, last=last) for first, last in ranges],
        peer_set=peer_set,
        action=ruleset_pb2.ACTION_ALLOW,
        policy=policy,
    )
    rule.id = _short_hash(rule.SerializeToString(deterministic=True))
    return rule
