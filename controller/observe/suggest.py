"""Least-privilege Policy documents suggested from observed flows.

Only flows that were allowed or would be denied become rules: a flow the dataplane
denied shows what was refused, not what the workloads need. Each end of a flow is named
by its labels restricted to the `group_by` keys; an end that has none of them is named by
its addresses (`cidr` /32 or /128). Rules with the same `from` and `to` are merged, and
there is one Policy per destination group, so each document reads "who may reach X".
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from controller.observe.model import Endpoint, FlowRow, endpoint_key, latest_labels
from controller.policy.names import (
    MAX_NAME_LENGTH,
    RESERVED_PEER_KEYS,
    label_key_problem,
    label_value_problem,
)
from controller.policy.resources import API_VERSION
from controller.policy.selector import selector_from_labels

__all__ = ["SUGGESTED_NAME_PREFIX", "suggest_policies", "to_yaml"]

SUGGESTED_NAME_PREFIX = "suggested"
_SUGGESTED_VERDICTS = frozenset({"allowed", "would-deny"})
_PROTOCOL_ORDER = {"tcp": 0, "udp": 1, "icmp": 2}
_DOCUMENT_KEY_ORDER = ("apiVersion", "kind", "metadata", "spec")
_NOT_IN_NAMES = re.compile(r"[^a-z0-9]+")

Peer = dict[str, str]


@dataclass(frozen=True)
class _Side:
    """One end of a suggested rule: the peers that name it and words for a policy name."""

    key: str  # canonical text of the peers; equal peers, equal sides
    peers: tuple[tuple[tuple[str, str], ...], ...]  # each peer's items, in document order
    name_parts: tuple[str, ...]

    def peer_documents(self) -> Peer | list[Peer]:
        # Fresh dicts on every call: YAML would turn shared objects into anchors.
        documents = [dict(items) for items in self.peers]
        return documents[0] if len(documents) == 1 else documents


def suggest_policies(rows: Sequence[FlowRow], group_by: Sequence[str]) -> list[dict[str, Any]]:
    """Policy documents (as `bulkhead apply -f` reads them) allowing what `rows` show.

    `group_by` lists the label keys that name a group of workloads (e.g. ["app", "role"]).
    An end with only some of the keys is named by a selector that also requires the
    others to be absent, so the rule does not widen to the groups that have them.
    Flows within one workload, and flows with no known workload on either end, are
    skipped: there is nothing to program for them. Raises ValueError for a bad key.
    """
    keys = _check_group_by(group_by)
    relevant = [row for row in rows if row.verdict in _SUGGESTED_VERDICTS and _across(row)]
    labels = latest_labels(relevant)
    addresses = _workload_addresses(relevant)

    sides: dict[str, _Side] = {}
    ports: dict[str, dict[str, set[tuple[str, int]]]] = {}  # destination -> source -> ports
    for row in relevant:
        source, destination = (
            _remember(sides, _side(end, labels[endpoint_key(end)], keys, addresses))
            for end in (row.source, row.destination)
        )
        by_source = ports.setdefault(destination.key, {})
        by_source.setdefault(source.key, set()).add((row.protocol, row.port))

    documents: list[dict[str, Any]] = []
    taken: set[str] = set()
    for destination_key in sorted(ports):
        destination = sides[destination_key]
        rules = [
            {
                "from": sides[source_key].peer_documents(),
                "to": destination.peer_documents(),
                "ports": _port_texts(observed),
            }
            for source_key, observed in sorted(ports[destination_key].items())
        ]
        documents.append(
            {
                "apiVersion": API_VERSION,
                "kind": "Policy",
                "metadata": {"name": _policy_name(destination.name_parts, taken)},
                "spec": {"rules": rules},
            }
        )
    return documents


def _across(row: FlowRow) -> bool:
    """Whether the flow has a managed end and is not a workload talking to itself."""
    source, destination = row.source.workload, row.destination.workload
    return bool(source or destination) and source != destination


def _check_group_by(group_by: Sequence[str]) -> tuple[str, ...]:
    if isinstance(group_by, str):
        raise ValueError(f"group_by: expected a list of label keys, got the string {group_by!r}")
    keys: list[str] = []
    for key in group_by:
        problem = label_key_problem(key)
        if problem is None and key in RESERVED_PEER_KEYS:
            problem = f"{key!r} is reserved (selector, iplist, cidr) and cannot be a label key"
        if problem is not None:
            raise ValueError(f"group_by: {problem}")
        if key not in keys:
            keys.append(key)
    return tuple(keys)


def _workload_addresses(rows: Sequence[FlowRow]) -> dict[str, set[str]]:
    addresses: dict[str, set[str]] = {}
    for row in rows:
        for end in (row.source, row.destination):
            if end.workload:
                addresses.setdefault(end.workload, set()).add(end.address)
    return addresses


def _side(
    end: Endpoint,
    labels: Mapping[str, str],
    keys: tuple[str, ...],
    addresses: Mapping[str, set[str]],
) -> _Side:
    chosen = {key: labels[key] for key in keys if key in labels}
    # A value a label peer cannot hold cannot name a group; fall back to the addresses.
    if chosen and all(label_value_problem(value) is None for value in chosen.values()):
        missing = [key for key in keys if key not in chosen]
        if missing:
            # Written by hand rather than canonically, to read "app == 'db' && !has(role)".
            parts = [selector_from_labels(chosen).canonical()]
            parts += [f"!has({key})" for key in missing]
            peers: tuple[tuple[tuple[str, str], ...], ...] = ((("selector", " && ".join(parts)),),)
        else:
            peers = (tuple(chosen.items()),)
        return _make_side(peers, tuple(chosen.values()))
    if end.workload:
        hosts = sorted(addresses[end.workload], key=_address_order)
        return _make_side(tuple((("cidr", _host_network(a)),) for a in hosts), (end.workload,))
    return _make_side(((("cidr", _host_network(end.address)),),), (end.address,))


def _make_side(
    peers: tuple[tuple[tuple[str, str], ...], ...], name_parts: tuple[str, ...]
) -> _Side:
    key = json.dumps([dict(items) for items in peers], sort_keys=True)
    return _Side(key, peers, name_parts)


def _remember(sides: dict[str, _Side], side: _Side) -> _Side:
    # Two ends can be named by the same peers (two unlabelled workloads sharing an
    # address); the smallest name keeps the result independent of the row order.
    known = sides.get(side.key)
    if known is None or side.name_parts < known.name_parts:
        sides[side.key] = side
        return side
    return known


def _address_order(text: str) -> tuple[int, int]:
    address = ipaddress.ip_address(text)
    return (address.version, int(address))


def _host_network(text: str) -> str:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        # A zone (fe80::1%eth0) has no place in a network; the address itself does.
        address = ipaddress.IPv6Address(int(address))
    return str(ipaddress.ip_network(address))


def _port_texts(observed: set[tuple[str, int]]) -> list[str]:
    ordered = sorted(observed, key=lambda item: (_PROTOCOL_ORDER[item[0]], item[1]))
    return [protocol if protocol == "icmp" else f"{protocol}/{port}" for protocol, port in ordered]


def _policy_name(parts: tuple[str, ...], taken: set[str]) -> str:
    """`suggested-<parts>` as a valid resource name not yet in `taken` (then added to it)."""
    words = _NOT_IN_NAMES.sub("-", "-".join(parts).lower()).strip("-")
    stem = f"{SUGGESTED_NAME_PREFIX}-{words}" if words else SUGGESTED_NAME_PREFIX
    stem = stem[:MAX_NAME_LENGTH].rstrip("-")
    name, number = stem, 2
    while name in taken:
        suffix = f"-{number}"
        name = stem[: MAX_NAME_LENGTH - len(suffix)].rstrip("-") + suffix
        number += 1
    taken.add(name)
    return name


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        # Anchors and aliases are valid YAML but make a policy hard to read.
        return True


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML (`---` before each document) that `bulkhead apply -f` reads.

    Top-level keys come in the order apiVersion, kind, metadata, spec (others after,
    sorted); leaf mappings and lists are written inline, like `from: {app: web}`.
    """
    ordered = [
        {key: doc[key] for key in _DOCUMENT_KEY_ORDER if key in doc}
        | {key: doc[key] for key in sorted(doc) if key not in _DOCUMENT_KEY_ORDER}
        for doc in docs
    ]
    return yaml.dump_all(
        ordered,
        Dumper=_Dumper,
        explicit_start=True,
        sort_keys=False,
        default_flow_style=None,
        allow_unicode=True,
        width=100,
    )
