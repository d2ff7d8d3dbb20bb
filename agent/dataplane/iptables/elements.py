"""ipset member updates for a policy delta: one `ipset restore` that adds and deletes the
members a delta changes, with no set refilled and no rule touched.

The backend keeps what its last apply loaded (LoadedSets): per address group and family,
the set's members, which of them are (collapsed) networks, and which hosts are also one
of those networks (a host and a /32 network are the same member). A delta that fits it
(same rules, set names and baseline; removed elements held, added ones not) becomes lines
for exactly the members that differ. Networks are included: adding or deleting one in a
`hash:net` set costs what a host does, and a changed set's network list is collapsed
again, as a full apply would, so merged and split neighbours come out right.

`ipset restore` is not a transaction: it stops at a failing line and keeps the lines
before it. Every line is therefore `-exist` (idempotent) and checked here first (known
set, room for its members), so only a kernel error or someone else's change to our sets
can fail one; and the lines are ordered so that the kernel never lets through more than
the old policy or the new one, even when it stops half-way (see Effect).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from agent.dataplane.backend import RulesetError
from agent.dataplane.baseline import Baseline, Mode
from agent.dataplane.iptables.ipsets import maxelem_for
from agent.dataplane.iptables.plan import (
    FAMILIES,
    Family,
    IptablesPlan,
    ipset_name,
)
from agent.dataplane.iptables.render import host_member, network_members
from agent.dataplane.model import CompiledRuleset
from bulkhead.v1 import agent_pb2, ruleset_pb2

_HOST_LENGTH: dict[Family, int] = {4: 32, 6: 128}


class Effect(Enum):
    """What more addresses in a set do to what our chains let through.

    Rules are first-match and unchanged by a delta, so covering fewer addresses in every
    set that only allow rules use, and more in every set that only deny rules use, can
    only narrow. The script runs all lines that narrow (or change no coverage) first,
    then those that widen: until the first widening line the kernel lets through at most
    what the old policy did, from then on at most what the new one does (_ordered_lines).
    A set used by both kinds of rule has no safe order: deltas to it are applied whole.
    """

    WIDENS = "widens"  # allow rules only (or none; or visibility mode, which drops nothing)
    NARROWS = "narrows"  # deny rules only, in enforce mode
    MIXED = "mixed"  # allow and deny rules, in enforce mode


@dataclass
class LoadedIpset:
    """One ipset as the last apply (and the element updates since) left it."""

    name: str
    family: Family
    members: set[str]
    networks: frozenset[str]  # the members that are collapsed networks
    shared: set[str]  # host members that are also network members (a host and a /32)
    maxelem: int

    def holds_host(self, member: str) -> bool:
        return (member in self.members and member not in self.networks) or member in self.shared


@dataclass
class LoadedGroup:
    """One address group's two ipsets, its network list as given, and its Effect."""

    ipsets: dict[Family, LoadedIpset]
    networks: tuple[str, ...]
    effect: Effect
    # No host given twice in two spellings: removing one then removes the member.
    hosts_distinct: bool


@dataclass(frozen=True)
class IpsetEdit:
    """What an element update does to one LoadedIpset once the kernel took it."""

    ipset: LoadedIpset
    added: tuple[str, ...]
    deleted: tuple[str, ...]
    networks: frozenset[str]
    shared_added: frozenset[str]
    shared_removed: frozenset[str]


@dataclass(frozen=True)
class ElementUpdate:
    """The `ipset restore` input of one delta ("" if the kernel needs no change), and what
    it does to the LoadedSets (LoadedSets.commit, once the kernel took it)."""

    script: str
    edits: tuple[IpsetEdit, ...]
    networks: Mapping[str, tuple[str, ...]]  # group -> its network list after the delta


def _rules_key(ruleset: ruleset_pb2.Ruleset) -> tuple[bytes, ...]:
    return tuple(rule.SerializeToString(deterministic=True) for rule in ruleset.rules)


def _effects(compiled: CompiledRuleset, mode: Mode) -> dict[str, Effect]:
    effects = {group.name: Effect.WIDENS for group in compiled.groups}
    if mode is Mode.VISIBILITY:
        return effects
    allowing = {rule.peer_set for rule in compiled.rules if rule.allow}
    for rule in compiled.rules:
        if not rule.allow:
            effects[rule.peer_set] = Effect.MIXED if rule.peer_set in allowing else Effect.NARROWS
    return effects


@dataclass
class LoadedSets:
    """What the last apply loaded, as far as element updates need it."""

    rules: tuple[bytes, ...]
    names: tuple[str, ...]
    baseline: Baseline
    groups: dict[str, LoadedGroup]

    @classmethod
    def of(
        cls,
        ruleset: ruleset_pb2.Ruleset,
        compiled: CompiledRuleset,
        plan: IptablesPlan,
        baseline: Baseline,
    ) -> LoadedSets:
        """From an apply: RULESET, as load_ruleset checked it (COMPILED) and rendered (PLAN)."""
        effects = _effects(compiled, baseline.mode)
        planned = {ipset.name: ipset for ipset in plan.ipsets}
        groups: dict[str, LoadedGroup] = {}
        for address_set, group in zip(ruleset.sets, compiled.groups, strict=True):
            ipsets: dict[Family, LoadedIpset] = {}
            for family in FAMILIES:
                ipset = planned[ipset_name(group.name, family)]
                hosts = group.v4_hosts if family == 4 else group.v6_hosts
                items = list(
                    network_members(group.v4_networks if family == 4 else group.v6_networks)
                )
                single = {text for _, length, text in items if length == _HOST_LENGTH[family]}
                # Rare (a /32 network), so the hosts are turned to text only then.
                shared = single & {host_member(host) for host in hosts} if single else set()
                ipsets[family] = LoadedIpset(
                    name=ipset.name,
                    family=family,
                    members=set(ipset.members),
                    networks=frozenset(text for *_, text in items),
                    shared=shared,
                    maxelem=maxelem_for(len(ipset.members)),
                )
            distinct = len(address_set.hosts) == len(group.v4_hosts) + len(group.v6_hosts)
            groups[group.name] = LoadedGroup(
                ipsets, tuple(address_set.networks), effects[group.name], distinct
            )
        names = tuple(group.name for group in compiled.groups)
        return cls(_rules_key(ruleset), names, baseline, groups)

    def fits(self, result: ruleset_pb2.Ruleset, baseline: Baseline) -> bool:
        """Whether RESULT with BASELINE differs from what is loaded in set elements only."""
        return (
            baseline == self.baseline
            and tuple(address_set.name for address_set in result.sets) == self.names
            and _rules_key(result) == self.rules
        )

    def update(
        self,
        changes: Sequence[agent_pb2.SetChange],
        result: ruleset_pb2.Ruleset,
        baseline: Baseline,
    ) -> ElementUpdate | None:
        """The element update that makes the kernel hold RESULT, or None when only a full
        apply can: RESULT does not fit (rules, set names or baseline differ), a change
        names an unknown set or one set twice, removes what is not held or adds what is,
        touches a MIXED set, or would overfill a set. RulesetError names a change that
        is not an address or network."""
        if not self.fits(result, baseline):
            return None
        narrowing: list[str] = []
        widening: list[str] = []
        edits: list[IpsetEdit] = []
        networks: dict[str, tuple[str, ...]] = {}
        seen: set[str] = set()
        for number, change in enumerate(changes):
            group = self.groups.get(change.name)
            if group is None or change.name in seen:
                return None
            seen.add(change.name)
            field = f"delta.sets[{number}]"
            added = _host_members(f"{field}.add_hosts", change.add_hosts)
            removed = _host_members(f"{field}.remove_hosts", change.remove_hosts)
            hosts_change = bool(change.add_hosts or change.remove_hosts)
            networks_change = bool(change.add_networks or change.remove_networks)
            if (hosts_change and not group.hosts_distinct) or (
                group.effect is Effect.MIXED and (hosts_change or networks_change)
            ):
                return None
            after = group.networks
            if networks_change:
                changed = _networks_after(field, group.networks, change)
                if changed is None:
                    return None
                after = networks[change.name] = changed
            collapsed = _network_members(after) if networks_change else None
            for family in FAMILIES:
                ipset = group.ipsets[family]
                edit = _edit(
                    ipset,
                    removed[family],
                    added[family],
                    collapsed[family] if collapsed is not None else ipset.networks,
                )
                # At most: every addition made before any deletion.
                if edit is None or len(ipset.members) + len(edit.added) > ipset.maxelem:
                    return None
                first, then = _ordered_lines(edit, group.effect)
                narrowing += first
                widening += then
                edits.append(edit)
        script = "".join(line + "\n" for line in narrowing + widening)
        return ElementUpdate(script, tuple(edits), networks)

    def commit(self, update: ElementUpdate) -> None:
        """Record UPDATE as loaded (the kernel took its script)."""
        for edit in update.edits:
            ipset = edit.ipset
            ipset.members.difference_update(edit.deleted)
            ipset.members.update(edit.added)
            ipset.shared.difference_update(edit.shared_removed)
            ipset.shared.update(edit.shared_added)
            ipset.networks = edit.networks
        for name, texts in update.networks.items():
            self.groups[name].networks = texts


def _host_members(field: str, texts: Sequence[str]) -> dict[Family, list[str]]:
    members: dict[Family, list[str]] = {4: [], 6: []}
    for index, text in enumerate(texts):
        try:
            host = ipaddress.ip_address(text)
        except ValueError:
            raise RulesetError(f"{field}[{index}]: {text!r} is not a host address") from None
        members[4 if host.version == 4 else 6].append(host_member(host))
    return members


def _networks_after(
    field: str, before: tuple[str, ...], change: agent_pb2.SetChange
) -> tuple[str, ...] | None:
    """The network list after CHANGE, strictly as apply_set_changes makes it (removed ones
    held, added ones not); None if the change does not fit BEFORE."""
    for index, text in enumerate(change.add_networks):
        try:
            ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise RulesetError(f"{field}.add_networks[{index}]: {text!r}: {exc}") from None
    gone = set(change.remove_networks)
    if len(gone) != len(change.remove_networks) or not gone <= set(before):
        return None
    kept = [text for text in before if text not in gone]
    if len(set(change.add_networks)) != len(change.add_networks):
        return None
    if set(change.add_networks) & set(kept):
        return None
    return (*kept, *change.add_networks)


def _network_members(texts: Iterable[str]) -> dict[Family, frozenset[str]]:
    """The hash:net members of a network list, per family, collapsed as load_ruleset does."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for text in texts:
        network = ipaddress.ip_network(text, strict=True)
        if isinstance(network, ipaddress.IPv4Network):
            v4.append(network)
        else:
            v6.append(network)
    return {
        4: frozenset(text for *_, text in network_members(ipaddress.collapse_addresses(v4))),
        6: frozenset(text for *_, text in network_members(ipaddress.collapse_addresses(v6))),
    }


def _edit(
    ipset: LoadedIpset, removed: list[str], added: list[str], networks: frozenset[str]
) -> IpsetEdit | None:
    """The members to add and delete for these host changes and network members after;
    None if the host changes do not fit what the set holds."""
    gone, new = set(removed), set(added)
    if len(gone) != len(removed) or len(new) != len(added):
        return None  # a host twice, perhaps in two spellings
    if not all(ipset.holds_host(member) for member in gone):
        return None
    if any(ipset.holds_host(member) and member not in gone for member in new):
        return None
    additions: list[str] = []
    deletions: list[str] = []
    shared_added: set[str] = set()
    shared_removed: set[str] = set()
    for member in sorted(gone | new | (ipset.networks ^ networks)):
        host = member in new or (member not in gone and ipset.holds_host(member))
        network = member in networks
        present = member in ipset.members
        if (host or network) and not present:
            additions.append(member)
        elif present and not (host or network):
            deletions.append(member)
        if host and network:
            shared_added.add(member)
        elif member in ipset.shared:
            shared_removed.add(member)
    return IpsetEdit(
        ipset,
        tuple(additions),
        tuple(deletions),
        networks,
        frozenset(shared_added),
        frozenset(shared_removed),
    )


def _ordered_lines(edit: IpsetEdit, effect: Effect) -> tuple[list[str], list[str]]:
    """One set's `ipset restore` lines: those to run in the narrowing part, and those to
    run in the widening part, of the script.

    A deny set takes all additions, then all deletions. An allow set takes, in order:
    additions inside an old member (covering nothing new), deletions reaching outside
    every new member (narrowing), the other additions, then deletions inside a new member
    (by then covering nothing lost). hash:net members are prefixes, so two that overlap
    are nested: an address both policies let through never loses its last covering
    member on the way, e.g. 198.18.4.0/24 goes in before 198.18.4.0/25 goes out.
    """
    ipset = edit.ipset
    adds = [f"add -exist {ipset.name} {member}" for member in edit.added]
    dels = [f"del -exist {ipset.name} {member}" for member in edit.deleted]
    if effect is Effect.NARROWS:
        return adds, dels
    deleted, added = set(edit.deleted), set(edit.added)
    lengths = {_prefix_length(m) for m in ipset.networks | edit.networks} | {
        _HOST_LENGTH[ipset.family]
    }

    def before(member: str) -> bool:
        return member in ipset.members

    def after(member: str) -> bool:
        return (member in ipset.members and member not in deleted) or member in added

    early_adds = [_covered(m, before, lengths) for m in edit.added]
    late_dels = [_covered(m, after, lengths) for m in edit.deleted]
    first = [line for line, early in zip(adds, early_adds, strict=True) if early]
    first += [line for line, late in zip(dels, late_dels, strict=True) if not late]
    then = [line for line, early in zip(adds, early_adds, strict=True) if not early]
    then += [line for line, late in zip(dels, late_dels, strict=True) if late]
    return first, then


def _prefix_length(member: str) -> int:
    return int(member.rpartition("/")[2])


def _covered(member: str, holds: Callable[[str], bool], lengths: Iterable[int]) -> bool:
    """Whether a member other than MEMBER itself, of the set HOLDS tells, contains it."""
    network = ipaddress.ip_network(member)
    return any(
        holds(str(network.supernet(new_prefix=length)))
        for length in lengths
        if length < network.prefixlen
    )
