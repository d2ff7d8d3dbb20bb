"""The compiled estate: every agent's rules and the address sets they share, kept current
as workloads come, go and change.

A policy rule "from F to T on P" gives two clauses: INGRESS on T's members from F's
addresses, and EGRESS on F's members towards T's addresses. Each distinct peer list (F
or T) is tracked once (each workload knows the lists it is a member of) and, when some
clause reaches it, has an address set: a count of contributors per host, so a host
shared by two members stays while either does. An agent's ruleset is its skeleton (the
rules of the clauses whose local side it is a member of, and the names of their sets)
plus the current version of each of those sets. Sets are shared by every agent that uses
them, never copied per agent.

A workload that joins, leaves, is relabelled or readdressed changes the membership of
the peer lists that match it before or after (found through a label index; only
selector peers are tested one by one), the elements of those lists' sets, and its own
skeleton. Every agent using a changed set has a changed ruleset and nobody else has, so
an update costs what the change touches, not what the estate holds.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from bulkhead.v1 import ruleset_pb2
from bulkhead.v1.contract import composed_hash
from controller.policy.addresses import (
    Address,
    Network,
    address_order,
    is_single_host,
    network_order,
)
from controller.policy.clauses import Clause, Workload, clauses_of, list_key, set_name
from controller.policy.peers import CidrPeer, IPListPeer, LabelsPeer, Peer, SelectorPeer, peer_key
from controller.policy.resources import IPList, Policy


@dataclass(frozen=True, eq=False)
class SetVersion:
    """One content of a shared address set. Immutable (never change `address_set`): the
    agents holding it, and deltas from it, refer to the same object."""

    address_set: ruleset_pb2.AddressSet
    serialized: bytes  # deterministic
    digest: bytes  # contract.set_digest: sha256 of `serialized`

    @classmethod
    def of(cls, address_set: ruleset_pb2.AddressSet) -> SetVersion:
        serialized = address_set.SerializeToString(deterministic=True)
        return cls(address_set, serialized, hashlib.sha256(serialized).digest())


@dataclass(frozen=True, eq=False)
class Skeleton:
    """An agent's rules and the names of the sets they use, without any elements."""

    rules: tuple[ruleset_pb2.Rule, ...]
    set_names: tuple[str, ...]  # sorted
    serialized: bytes  # the Ruleset with each set reduced to its name (contract hash input)
    digest: bytes  # sha256 of `serialized`, its key in the store

    @classmethod
    def of(cls, rules: Sequence[ruleset_pb2.Rule], set_names: Iterable[str]) -> Skeleton:
        names = tuple(sorted(set(set_names)))
        bare = ruleset_pb2.Ruleset(
            sets=[ruleset_pb2.AddressSet(name=name) for name in names], rules=rules
        )
        serialized = bare.SerializeToString(deterministic=True)
        return cls(tuple(rules), names, serialized, hashlib.sha256(serialized).digest())


EMPTY_SKELETON = Skeleton.of((), ())


# The longest element of an address set as serialised: a tag, a length and the text
# ("ffff:...:ffff" is 39 characters; a network adds "/128").
_HOST_BYTES_MAX = 2 + 39
_NET_BYTES_MAX = 2 + 43


class _PeerList:
    """One distinct peer list: the clauses on its members and, if a clause reaches it, its
    address set."""

    def __init__(self, key: str, peers: Sequence[Peer]) -> None:
        self.key = key
        self.peers = tuple(peers)
        self.local_clauses: list[int] = []  # clauses on this list's members
        self.set_name: str | None = None  # set only when some clause's remote side
        self.hosts: Counter[Address] = Counter()  # contributors per host
        self.networks: set[Network] = set()
        self.version: SetVersion | None = None  # None: not built since the last change

    def make_set(self, iplists: Mapping[str, IPList]) -> None:
        """Give the list an address set; its networks and single hosts from CIDRs and IP
        lists are fixed (IP lists changing rebuild the estate)."""
        self.set_name = set_name(self.key)
        for peer in self.peers:
            for network in _static_networks(peer, iplists):
                if is_single_host(network):
                    self.hosts[network.network_address] += 1
                else:
                    self.networks.add(network)

    def size_bound(self) -> int:
        """At least the length of the set serialised: exact once built, else from the
        longest element text (an IPv6 host, a network), without building it."""
        if self.version is not None:
            return len(self.version.serialized)
        name = len(self.set_name or "")
        return name + 3 + len(self.hosts) * _HOST_BYTES_MAX + len(self.networks) * _NET_BYTES_MAX

    def build_version(self) -> SetVersion:
        if self.version is None:
            assert self.set_name is not None
            self.version = SetVersion.of(
                ruleset_pb2.AddressSet(
                    name=self.set_name,
                    hosts=[str(a) for a in sorted(self.hosts, key=address_order)],
                    networks=[str(n) for n in sorted(self.networks, key=network_order)],
                )
            )
        return self.version


def _static_networks(peer: Peer, iplists: Mapping[str, IPList]) -> list[Network]:
    if isinstance(peer, CidrPeer):
        return [peer.network]
    if isinstance(peer, IPListPeer):
        # An unknown name resolves to nothing; the store refuses such policies.
        iplist = iplists.get(peer.name)
        return list(iplist.spec.cidrs) if iplist else []
    selector = peer.selector  # label and selector peers also match IP lists by their labels
    return [
        network
        for iplist in iplists.values()
        if selector.matches(iplist.metadata.labels)
        for network in iplist.spec.cidrs
    ]


class _HostChanges:
    """Hosts whose contributor count crossed zero during one update, with their presence
    before it: a set whose hosts all ended as they began has not changed."""

    def __init__(self) -> None:
        self._before: dict[str, dict[Address, bool]] = {}

    def crossed(self, peer_list: _PeerList, host: Address, was_present: bool) -> None:
        self._before.setdefault(peer_list.key, {}).setdefault(host, was_present)

    def changed(self, lists: Mapping[str, _PeerList]) -> list[_PeerList]:
        found = []
        for key, before in self._before.items():
            peer_list = lists[key]
            if any((peer_list.hosts[host] > 0) != was for host, was in before.items()):
                found.append(peer_list)
        return found


class Estate:
    """Compiled policies over a set of workloads; `update` keeps it current."""

    def __init__(
        self, workloads: Iterable[Workload], iplists: Iterable[IPList], policies: Iterable[Policy]
    ) -> None:
        self._iplists: dict[str, IPList] = {}
        for iplist in iplists:
            if iplist.metadata.name in self._iplists:
                raise ValueError(f"IP list {iplist.metadata.name!r} is given twice")
            self._iplists[iplist.metadata.name] = iplist
        ordered = sorted(policies, key=lambda policy: policy.metadata.name)
        for previous, policy in itertools.pairwise(ordered):
            if previous.metadata.name == policy.metadata.name:
                raise ValueError(f"policy {policy.metadata.name!r} is given twice")
        self._clauses: list[Clause] = clauses_of(ordered)
        self._lists: dict[str, _PeerList] = {}
        self._by_set: dict[str, _PeerList] = {}
        for number, clause in enumerate(self._clauses):
            self._list(clause.local).local_clauses.append(number)
            remote = self._list(clause.remote)
            if remote.set_name is None:
                remote.make_set(self._iplists)
                assert remote.set_name is not None
                self._by_set[remote.set_name] = remote
        # Where to look for the lists a workload's labels may match.
        self._by_pair: dict[tuple[str, str], list[tuple[LabelsPeer, list[_PeerList]]]] = {}
        self._selectors: list[tuple[SelectorPeer, list[_PeerList]]] = []
        self._index_peers()
        self._workloads: dict[str, Workload] = {}
        self._memberships: dict[str, frozenset[str]] = {}  # agent id -> list keys
        self._skeletons: dict[str, Skeleton] = {}
        self._interned: dict[tuple[int, ...], Skeleton] = {(): EMPTY_SKELETON}
        # Every agent with the same rules uses the same set versions: looked up once per
        # skeleton (by digest) until some set changes, not once per agent sent to.
        self._versions: dict[bytes, tuple[SetVersion, ...]] = {}
        self._users: dict[str, set[str]] = {name: set() for name in self._by_set}
        added: dict[str, Workload] = {}
        for workload in workloads:
            if workload.agent_id in added:
                raise ValueError(f"workload {workload.agent_id!r} is given twice")
            added[workload.agent_id] = workload
        self.update(added)

    # -- queries ------------------------------------------------------------------------

    @property
    def agent_ids(self) -> list[str]:
        return sorted(self._workloads)

    def workloads(self) -> list[Workload]:
        return list(self._workloads.values())

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._workloads

    def skeleton(self, agent_id: str) -> Skeleton:
        return self._skeletons.get(agent_id, EMPTY_SKELETON)

    def workload(self, agent_id: str) -> Workload | None:
        return self._workloads.get(agent_id)

    def size(self, agent_id: str) -> int:
        """About the length of the agent's ruleset serialised (a snapshot's payload)."""
        versions = self.versions(agent_id)
        return len(self.skeleton(agent_id).serialized) + sum(len(v.serialized) for v in versions)

    def size_bound(self, agent_id: str) -> int:
        """At least size(AGENT_ID), without building the sets that changed: a check of
        every agent a change reaches costs the number of their sets, not their elements."""
        skeleton = self.skeleton(agent_id)
        return len(skeleton.serialized) + sum(
            self._by_set[name].size_bound() for name in skeleton.set_names
        )

    def set_version(self, name: str) -> SetVersion:
        return self._by_set[name].build_version()

    def versions(self, agent_id: str) -> tuple[SetVersion, ...]:
        """The current version of each set the agent's rules use, in skeleton order (the
        same tuple for every agent with the same rules, until a set changes)."""
        skeleton = self.skeleton(agent_id)
        found = self._versions.get(skeleton.digest)
        if found is None:
            found = tuple(self.set_version(name) for name in skeleton.set_names)
            self._versions[skeleton.digest] = found
        return found

    def hash(self, agent_id: str) -> str:
        """contract.ruleset_hash of the agent's ruleset, from its parts."""
        versions = self.versions(agent_id)
        return composed_hash(self.skeleton(agent_id).serialized, [v.digest for v in versions])

    def ruleset(self, agent_id: str) -> ruleset_pb2.Ruleset:
        """The agent's complete ruleset (a new message; empty when no policy touches it)."""
        skeleton = self.skeleton(agent_id)
        sets = [version.address_set for version in self.versions(agent_id)]
        return ruleset_pb2.Ruleset(sets=sets, rules=skeleton.rules)

    # -- changes ------------------------------------------------------------------------

    def update(self, changes: Mapping[str, Workload | None]) -> set[str]:
        """Apply CHANGES (agent id -> its workload now, None: gone) and return the agents
        whose ruleset changed: the changed workloads whose own rules or sets changed, and
        every agent using a set that gained or lost a host."""
        for agent_id, workload in changes.items():  # before anything changes
            if workload is not None and workload.agent_id != agent_id:
                raise ValueError(f"workload {workload.agent_id!r} is given as {agent_id!r}")
        hosts_changed = _HostChanges()
        touched: dict[str, Skeleton] = {}
        for agent_id, workload in changes.items():
            touched[agent_id] = self.skeleton(agent_id)
            self._move(agent_id, workload, hosts_changed)
        changed_sets = hosts_changed.changed(self._lists)
        result: set[str] = set()
        if changed_sets:
            self._versions.clear()
        for peer_list in changed_sets:
            peer_list.version = None
            assert peer_list.set_name is not None
            result |= self._users[peer_list.set_name]
        changed_names = {peer_list.set_name for peer_list in changed_sets}
        for agent_id, before in touched.items():
            skeleton = self._rebuild_skeleton(agent_id)
            if skeleton.serialized != before.serialized or changed_names & set(skeleton.set_names):
                result.add(agent_id)
        return result

    def _move(self, agent_id: str, workload: Workload | None, hosts: _HostChanges) -> None:
        """Take AGENT_ID out of the lists it leaves and its old hosts out of their sets;
        put it and its new hosts into the lists it now matches."""
        old_lists = self._memberships.get(agent_id, frozenset())
        old = self._workloads.get(agent_id)
        old_hosts = old.hosts if old is not None else frozenset()
        if workload is None:
            new_lists: frozenset[str] = frozenset()
            new_hosts: frozenset[Address] = frozenset()
            self._workloads.pop(agent_id, None)
            self._memberships.pop(agent_id, None)
        else:
            new_lists = frozenset(self._matching_lists(workload.labels))
            new_hosts = workload.hosts
            self._workloads[agent_id] = workload
            self._memberships[agent_id] = new_lists
        for key in old_lists | new_lists:
            peer_list = self._lists[key]
            before = old_hosts if key in old_lists else frozenset()
            after = new_hosts if key in new_lists else frozenset()
            if peer_list.set_name is None or before == after:
                continue
            for host in before - after:
                peer_list.hosts[host] -= 1
                if not peer_list.hosts[host]:
                    del peer_list.hosts[host]
                    hosts.crossed(peer_list, host, True)
            for host in after - before:
                peer_list.hosts[host] += 1
                if peer_list.hosts[host] == 1:
                    hosts.crossed(peer_list, host, False)

    def _matching_lists(self, labels: Mapping[str, str]) -> set[str]:
        found: set[str] = set()
        for pair in labels.items():
            for peer, lists in self._by_pair.get(pair, ()):
                if all(labels.get(key) == value for key, value in peer.labels):
                    found.update(peer_list.key for peer_list in lists)
        for selector_peer, lists in self._selectors:
            if selector_peer.selector.matches(labels):
                found.update(peer_list.key for peer_list in lists)
        return found

    def _rebuild_skeleton(self, agent_id: str) -> Skeleton:
        old = self._skeletons.pop(agent_id, EMPTY_SKELETON)
        numbers = sorted(
            number
            for key in self._memberships.get(agent_id, ())
            for number in self._lists[key].local_clauses
        )
        skeleton = self._interned.get(tuple(numbers))
        if skeleton is None:
            rules: dict[str, ruleset_pb2.Rule] = {}  # by id: the same rule twice, kept once
            for number in numbers:
                for rule in self._clauses[number].rules:
                    rules.setdefault(rule.id, rule)
            names = (self._clauses[number].set_name for number in numbers)
            skeleton = Skeleton.of(list(rules.values()), names)
            self._interned[tuple(numbers)] = skeleton
        if skeleton is not EMPTY_SKELETON:
            self._skeletons[agent_id] = skeleton
        for name in set(old.set_names) - set(skeleton.set_names):
            self._users[name].discard(agent_id)
        for name in skeleton.set_names:
            self._users[name].add(agent_id)
        return skeleton

    # -- building -----------------------------------------------------------------------

    def _list(self, peers: Sequence[Peer]) -> _PeerList:
        key = list_key(peers)
        found = self._lists.get(key)
        if found is None:
            found = self._lists[key] = _PeerList(key, peers)
        return found

    def _index_peers(self) -> None:
        labels_peers: dict[str, tuple[LabelsPeer, list[_PeerList]]] = {}
        selector_peers: dict[str, tuple[SelectorPeer, list[_PeerList]]] = {}
        for peer_list in self._lists.values():
            for peer in peer_list.peers:
                if isinstance(peer, LabelsPeer):
                    labels_peers.setdefault(peer_key(peer), (peer, []))[1].append(peer_list)
                elif isinstance(peer, SelectorPeer):
                    selector_peers.setdefault(peer_key(peer), (peer, []))[1].append(peer_list)
        for labels_peer, lists in labels_peers.values():
            # Indexed by one of its pairs: a workload without that pair cannot match it.
            self._by_pair.setdefault(labels_peer.labels[0], []).append((labels_peer, lists))
        self._selectors = list(selector_peers.values())


def compile_rulesets(
    workloads: Iterable[Workload], iplists: Iterable[IPList], policies: Iterable[Policy]
) -> dict[str, ruleset_pb2.Ruleset]:
    """The complete Ruleset of every workload (empty when no policy touches it), by agent
    id. Deterministic: the same inputs in any order give the same rulesets; rules are
    ordered by policy name, rule index, direction (ingress first) and protocol."""
    estate = Estate(workloads, iplists, policies)
    return {agent_id: estate.ruleset(agent_id) for agent_id in estate.agent_ids}
