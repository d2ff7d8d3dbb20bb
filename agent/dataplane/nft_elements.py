"""nftables set element updates for a policy delta, straight from its host changes.

A delta that only adds and removes host addresses (a peer joined, left, moved) needs no
policy reload: each host goes into or out of its family's hash set, all in one batch.
Networks are left to a full apply: interval sets hold collapsed networks, so one CIDR
added or removed can merge with or split its neighbours.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, IPv6Address

from agent.dataplane.backend import RulesetError
from agent.dataplane.libnftables import JsonDocument
from agent.dataplane.model import AddressGroup
from bulkhead.v1 import agent_pb2

FAMILY = "inet"
TABLE = "bulkhead"


def host_updates(
    groups: Mapping[str, AddressGroup], changes: Sequence[agent_pb2.SetChange]
) -> tuple[list[JsonDocument], dict[str, AddressGroup]] | None:
    """The commands that make the sets of GROUPS hold what CHANGES say (deletions first,
    then additions: one batch), and the groups after them. None when only a full apply
    can do it: networks change, or a set is not among GROUPS."""
    if any(change.add_networks or change.remove_networks for change in changes):
        return None
    after = dict(groups)
    deletions: list[JsonDocument] = []
    additions: list[JsonDocument] = []
    for number, change in enumerate(changes):
        group = after.get(change.name)
        if group is None:
            return None
        field = f"delta.sets[{number}]"
        added = _hosts(f"{field}.add_hosts", change.add_hosts)
        removed = _hosts(f"{field}.remove_hosts", change.remove_hosts)
        for family, suffix in ((IPv4Address, "v4"), (IPv6Address, "v6")):
            name = f"{change.name}_{suffix}"
            gone = [str(a) for a in removed if isinstance(a, family)]
            new = [str(a) for a in added if isinstance(a, family)]
            if gone:
                deletions.append(_element("delete", name, gone))
            if new:
                additions.append(_element("add", name, new))
        after[change.name] = _changed(group, added, removed)
    return deletions + additions, after


def _hosts(field: str, texts: Sequence[str]) -> list[IPv4Address | IPv6Address]:
    hosts = []
    for index, text in enumerate(texts):
        try:
            hosts.append(ipaddress.ip_address(text))
        except ValueError:
            raise RulesetError(f"{field}[{index}]: {text!r} is not a host address") from None
    return hosts


def _element(verb: str, set_name: str, elements: list[str]) -> JsonDocument:
    return {
        verb: {"element": {"family": FAMILY, "table": TABLE, "name": set_name, "elem": elements}}
    }


def _changed(
    group: AddressGroup,
    added: Sequence[IPv4Address | IPv6Address],
    removed: Sequence[IPv4Address | IPv6Address],
) -> AddressGroup:
    gone = set(removed)
    v4 = {a for a in group.v4_hosts if a not in gone}
    v6 = {a for a in group.v6_hosts if a not in gone}
    v4.update(a for a in added if isinstance(a, IPv4Address))
    v6.update(a for a in added if isinstance(a, IPv6Address))
    # As load_ruleset sorts them, so the next diff against these groups is exact.
    return dataclasses.replace(
        group, v4_hosts=tuple(sorted(v4, key=int)), v6_hosts=tuple(sorted(v6, key=int))
    )
