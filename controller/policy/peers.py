"""Peers of a policy rule: what `from` and `to` name.

A peer is a mapping: label equality (`{app: api, env: prod}`), or exactly one of the
reserved keys `selector`, `iplist`, `cidr`. Label and selector peers match workloads
and IP lists by their labels; `iplist` names one IP list; `cidr` is a literal network.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from controller.policy.addresses import Network, parse_network
from controller.policy.errors import FieldProblem, SelectorError
from controller.policy.names import (
    RESERVED_PEER_KEYS,
    describe_value,
    not_a_string,
    parse_labels,
    parse_name,
)
from controller.policy.selector import Selector, parse_selector, selector_from_labels

_FORMS = "{app: web}, {selector: ...}, {iplist: name} or {cidr: 198.18.0.0/24}"


@dataclass(frozen=True)
class LabelsPeer:
    labels: tuple[tuple[str, str], ...]  # sorted (key, value) pairs; all must match

    @property
    def selector(self) -> Selector:
        return selector_from_labels(dict(self.labels))

    def to_json(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class SelectorPeer:
    selector: Selector

    def to_json(self) -> dict[str, str]:
        return {"selector": self.selector.canonical()}


@dataclass(frozen=True)
class IPListPeer:
    name: str

    def to_json(self) -> dict[str, str]:
        return {"iplist": self.name}


@dataclass(frozen=True)
class CidrPeer:
    network: Network

    def to_json(self) -> dict[str, str]:
        return {"cidr": str(self.network)}


Peer = LabelsPeer | SelectorPeer | IPListPeer | CidrPeer


def peer_key(peer: Peer) -> str:
    """Canonical text of a peer: equal peers, equal keys."""
    return json.dumps(peer.to_json(), sort_keys=True, separators=(",", ":"))


def parse_peer(raw: object) -> Peer:
    """Validate one peer mapping; FieldProblem.key names the entry that is wrong."""
    if not isinstance(raw, Mapping):
        raise FieldProblem(f"expected a peer mapping like {_FORMS}, got {describe_value(raw)}")
    if not raw:
        raise FieldProblem("empty peer: give labels to match, or one of selector, iplist, cidr")
    reserved = sorted(key for key in raw if key in RESERVED_PEER_KEYS)
    if not reserved:
        return LabelsPeer(tuple(sorted(parse_labels(raw).items())))
    if len(reserved) > 1:
        raise FieldProblem(
            f"a peer takes only one of selector, iplist, cidr; found {' and '.join(reserved)}",
            key=reserved[1],
        )
    (reserved_key,) = reserved
    others = sorted(str(key) for key in raw if key != reserved_key)
    if others:
        raise FieldProblem(
            f"labels cannot be combined with '{reserved_key}' in one peer; "
            "list them as separate peers or use a selector",
            key=others[0],
        )
    try:
        return _parse_reserved(reserved_key, raw[reserved_key])
    except FieldProblem as problem:
        raise FieldProblem(problem.message, key=reserved_key) from None


def _parse_reserved(key: str, value: object) -> Peer:
    if key == "cidr":
        return CidrPeer(parse_network(value))
    if key == "iplist":
        return IPListPeer(parse_name(value))
    if not isinstance(value, str):
        raise FieldProblem(not_a_string(value, "selector"))
    try:
        return SelectorPeer(parse_selector(value))
    except SelectorError as error:
        # Shortened: a selector refused for its size would otherwise be echoed whole.
        raise FieldProblem(f"{describe_value(value)}: {error}") from None
