"""Labels to per-agent rulesets: the one place where selectors become addresses.

Each rule "from F to T on P" is compiled into both ends: an EGRESS rule on every
workload matching F towards the addresses of T, and an INGRESS rule on every workload
matching T from the addresses of F. IP lists and CIDRs have no agent, so only the
managed side of such a rule is programmed.

Each distinct peer is resolved once (label peers through a label index, selectors by
one scan of the workloads) and each distinct peer list once, then shared by every rule
and agent using it: the work grows with policies x matching workloads, not agents x
policies x workloads.
Its address set is named after a hash of the peer list's text, not of its addresses:
when a workload is relabelled or readdressed, set elements change, rule names don't.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from bulkhead.v1 import ruleset_pb2
from controller.policy.addresses import (
    Address,
    Network,
    address_order,
    is_single_host,
    network_order,
    parse_host,
)
from controller.policy.peers import (
    CidrPeer,
    IPListPeer,
    LabelsPeer,
    Peer,
    SelectorPeer,
    peer_key,
)
from controller.policy.ports import PortProtocol, PortSpec
from controller.policy.resources import IPList, Policy

SET_NAME_PREFIX = "p_"
_FEW = 4  # compiling at most 1/_FEW of the agents: test membership per agent
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

    def __post_init__(self) -> None:
        for address in self.addresses:
            parse_host(address)  # fail here, naming the address, rather than mid-compile


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


@dataclass
class _Addresses:
    members: set[str] = field(default_factory=set)  # agent ids of matching workloads
    hosts: set[Address] = field(default_factory=set)
    networks: set[Network] = field(default_factory=set)

    def add_network(self, network: Network) -> None:
        if is_single_host(network):
            self.hosts.add(network.network_address)
        else:
            self.networks.add(network)

    def update(self, other: _Addresses) -> None:
        self.members |= other.members
        self.hosts |= other.hosts
        self.networks |= other.networks


@dataclass(frozen=True)
class _PeerSet:
    members: frozenset[str]
    address_set: ruleset_pb2.AddressSet


class _Inventory:
    """Workloads and IP lists, indexed so each peer is resolved once."""

    def __init__(self, workloads: Iterable[Workload], iplists: Iterable[IPList]) -> None:
        self._workloads: dict[str, Workload] = {}
        self._hosts: dict[str, list[Address]] = {}
        self._by_label: dict[tuple[str, str], set[str]] = {}
        for workload in workloads:
            if workload.agent_id in self._workloads:
                raise ValueError(f"workload {workload.agent_id!r} is given twice")
            self._workloads[workload.agent_id] = workload
            # Parsed on first use (host_addresses): most workloads never need it in an
            # incremental compile.
            for pair in workload.labels.items():
                self._by_label.setdefault(pair, set()).add(workload.agent_id)
        self._iplists: dict[str, IPList] = {}
        for iplist in iplists:
            if iplist.metadata.name in self._iplists:
                raise ValueError(f"IP list {iplist.metadata.name!r} is given twice")
            self._iplists[iplist.metadata.name] = iplist
        self._peers: dict[str, _Addresses] = {}
        self._peer_sets: dict[str, _PeerSet] = {}

    @property
    def agent_ids(self) -> list[str]:
        return sorted(self._workloads)

    def _host_addresses(self, agent_id: str) -> list[Address]:
        hosts = self._hosts.get(agent_id)
        if hosts is None:
            hosts = [parse_host(a) for a in self._workloads[agent_id].addresses]
            self._hosts[agent_id] = hosts
        return hosts

    def labels_of(self, agent_id: str) -> Mapping[str, str]:
        return self._workloads[agent_id].labels

    def members(self, peers: Sequence[Peer]) -> frozenset[str]:
        """Agent ids of the workloads a peer list matches (no address set is built)."""
        found: set[str] = set()
        for peer in peers:
            if isinstance(peer, LabelsPeer | SelectorPeer):
                found |= self._peer(peer).members
        return frozenset(found)

    def peer_set(self, peers: Sequence[Peer]) -> _PeerSet:
        """Members and address set of a peer list (the union of its peers), memoised."""
        keys = sorted({peer_key(peer): peer for peer in peers}.items())
        spec = "[" + ",".join(key for key, _ in keys) + "]"
        cached = self._peer_sets.get(spec)
        if cached is not None:
            return cached
        union = _Addresses()
        for _, peer in keys:
            union.update(self._peer(peer))
        address_set = ruleset_pb2.AddressSet(
            name=SET_NAME_PREFIX + _short_hash(spec.encode()),
            hosts=[str(a) for a in sorted(union.hosts, key=address_order)],
            networks=[str(n) for n in sorted(union.networks, key=network_order)],
        )
        resolved = _PeerSet(frozenset(union.members), address_set)
        self._peer_sets[spec] = resolved
        return resolved

    def _peer(self, peer: Peer) -> _Addresses:
        key = peer_key(peer)
        resolved = self._peers.get(key)
        if resolved is None:
            resolved = self._resolve(peer)
            self._peers[key] = resolved
        return resolved

    def _resolve(self, peer: Peer) -> _Addresses:
        found = _Addresses()
        if isinstance(peer, CidrPeer):
            found.add_network(peer.network)
            return found
        if isinstance(peer, IPListPeer):
            # An unknown name resolves to nothing; the store refuses such policies.
            iplist = self._iplists.get(peer.name)
            for network in iplist.spec.cidrs if iplist else ():
                found.add_network(network)
            return found
        if isinstance(peer, LabelsPeer):
            found.members = self._members_with_labels(peer.labels)
        else:
            found.members = {
                agent_id
                for agent_id, workload in self._workloads.items()
                if peer.selector.matches(workload.labels)
            }
        for agent_id in found.members:
            found.hosts.update(self._host_addresses(agent_id))
        selector = peer.selector
        for iplist in self._iplists.values():
            if selector.matches(iplist.metadata.labels):
                for network in iplist.spec.cidrs:
                    found.add_network(network)
        return found

    def _members_with_labels(self, labels: Sequence[tuple[str, str]]) -> set[str]:
        # Intersect the label index, smallest first: cost follows the matches, not the fleet.
        if not labels:
            return set(self._workloads)
        candidates = sorted((self._by_label.get(pair, set()) for pair in labels), key=len)
        return set(candidates[0]).intersection(*candidates[1:])


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return tuple(merged)


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
            groups.append((wire, _merge_ranges(ranges)))
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


@dataclass
class _AgentRules:
    rules: dict[str, ruleset_pb2.Rule] = field(default_factory=dict)  # by id, in order
    sets: dict[str, ruleset_pb2.AddressSet] = field(default_factory=dict)

    def add(self, rule: ruleset_pb2.Rule, address_set: ruleset_pb2.AddressSet) -> None:
        self.rules.setdefault(rule.id, rule)  # the same rule twice in one policy: keep one
        self.sets.setdefault(address_set.name, address_set)

    def ruleset(self) -> ruleset_pb2.Ruleset:
        sets = [self.sets[name] for name in sorted(self.sets)]
        return ruleset_pb2.Ruleset(sets=sets, rules=list(self.rules.values()))


def compile_rulesets(
    workloads: Iterable[Workload],
    iplists: Iterable[IPList],
    policies: Iterable[Policy],
    *,
    only: Iterable[str] | None = None,
) -> dict[str, ruleset_pb2.Ruleset]:
    """The Ruleset of every workload (empty when no policy touches it), by agent id; with
    ONLY, of those workloads alone (a rule none of them is on costs no address set).

    Deterministic: the same inputs in any order give the same rulesets. Rules are ordered
    by policy name, rule index, direction (ingress first) and protocol.
    """
    inventory = _Inventory(workloads, iplists)
    wanted = set(inventory.agent_ids) if only is None else set(only) & set(inventory.agent_ids)
    by_agent = {agent_id: _AgentRules() for agent_id in sorted(wanted)}
    # Compiling a few agents: test their labels against each rule's peers rather than
    # resolving every peer over the whole fleet.
    per_agent = only is not None and len(wanted) * _FEW <= len(inventory.agent_ids)
    ordered = sorted(policies, key=lambda policy: policy.metadata.name)
    for previous, policy in itertools.pairwise(ordered):
        if previous.metadata.name == policy.metadata.name:
            raise ValueError(f"policy {policy.metadata.name!r} is given twice")
    for policy in ordered:
        for rule in policy.spec.rules:
            groups = _port_groups(rule.ports)
            for direction, local, remote in (
                (ruleset_pb2.DIRECTION_INGRESS, rule.to, rule.from_),
                (ruleset_pb2.DIRECTION_EGRESS, rule.from_, rule.to),
            ):
                agents: set[str] | frozenset[str]
                if per_agent:
                    agents = {a for a in wanted if matches(local, inventory.labels_of(a))}
                else:
                    agents = inventory.members(local) & wanted
                if not agents:
                    continue
                address_set = inventory.peer_set(remote).address_set
                compiled = [
                    _make_rule(policy.metadata.name, direction, group, address_set.name)
                    for group in groups
                ]
                for agent_id in agents:
                    for compiled_rule in compiled:
                        by_agent[agent_id].add(compiled_rule, address_set)
    return {agent_id: rules.ruleset() for agent_id, rules in by_agent.items()}


def affected_agents(
    before: Iterable[Workload],
    after: Iterable[Workload],
    iplists: Iterable[IPList],
    policies: Iterable[Policy],
    changed: Iterable[str],
) -> set[str]:
    """The agents whose rulesets can differ when the workloads CHANGED (by agent id; added,
    removed, relabelled or readdressed) went from BEFORE to AFTER: those workloads
    themselves, and every workload on the other side of a rule one of them is on, before
    or after. Everyone else's ruleset is the same, so only these need compiling."""
    changed = set(changed)
    iplists = list(iplists)
    before, after = list(before), list(after)
    labels = [w.labels for w in (*before, *after) if w.agent_id in changed]
    inventories: list[_Inventory] = []  # built only if some rule touches a changed workload
    affected = set(changed)
    for policy in policies:
        for rule in policy.spec.rules:
            for side, other in ((rule.from_, rule.to), (rule.to, rule.from_)):
                if any(matches(side, workload_labels) for workload_labels in labels):
                    if not inventories:
                        inventories = [_Inventory(before, iplists), _Inventory(after, iplists)]
                    for inventory in inventories:
                        affected |= inventory.members(other)
    return affected


def matches(peers: Sequence[Peer], labels: Mapping[str, str]) -> bool:
    """Whether a workload with LABELS is one of PEERS' members (label and selector peers)."""
    for peer in peers:
        if isinstance(peer, LabelsPeer):
            if all(labels.get(key) == value for key, value in peer.labels):
                return True
        elif isinstance(peer, SelectorPeer) and peer.selector.matches(labels):
            return True
    return False
