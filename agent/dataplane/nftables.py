"""The nftables backend: renders a compiled ruleset into the one table `inet bulkhead`.

Every apply is one libnftables batch that adds, deletes and re-creates the table, so
the kernel swaps the whole policy in one transaction whether or not the table existed,
and never touches another table. Peer addresses live only in named sets (four per
address set: hosts and networks per family), so a rule renders to the same nft rules
however many peers it has.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from typing import Protocol as Interface

from agent.dataplane.baseline import Baseline, Endpoint, Mode, PortSpec
from agent.dataplane.fingerprint import ABSENT, compose
from agent.dataplane.libnftables import JsonDocument, NftError, NftRunner
from agent.dataplane.model import (
    DENY_PREFIX,
    NFLOG_GROUP,
    WOULD_DENY_PREFIX,
    AddressGroup,
    CompiledRuleset,
    Direction,
    PolicyRule,
    Protocol,
    load_ruleset,
)
from agent.dataplane.nft_elements import host_updates
from agent.dataplane.nft_ownership import OwnershipError
from bulkhead.v1 import agent_pb2, ruleset_pb2

FAMILY = "inet"
TABLE = "bulkhead"
COMMENT_MAX_BYTES = 128
POLICY_CHAINS = {Direction.INGRESS: "policy_in", Direction.EGRESS: "policy_out"}

ICMP_TYPES = ("destination-unreachable", "time-exceeded", "parameter-problem")
# Errors, path MTU, neighbour discovery and multicast listeners: IPv6 dies without them.
ICMPV6_TYPES = (
    "destination-unreachable",
    "packet-too-big",
    "time-exceeded",
    "parameter-problem",
    "nd-router-solicit",
    "nd-router-advert",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "mld-listener-query",
    "mld-listener-report",
    "mld-listener-done",
    "mld2-listener-report",
)

Expr = dict[str, Any]
_TABLE = {"family": FAMILY, "name": TABLE}
_IN_TABLE = {"family": FAMILY, "table": TABLE}
# (set suffix, nft type, address match protocol, interval set?)
_SET_KINDS = (
    ("v4", "ipv4_addr", "ip", False),
    ("v4net", "ipv4_addr", "ip", True),
    ("v6", "ipv6_addr", "ip6", False),
    ("v6net", "ipv6_addr", "ip6", True),
)


@dataclass(frozen=True)
class TableObjects:
    """The chains and sets an owned table holds now, which a replacing batch deletes."""

    chains: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()


def render(
    ruleset: ruleset_pb2.Ruleset, baseline: Baseline, replacing: TableObjects | None = None
) -> JsonDocument:
    """The complete libnftables JSON document that replaces our table with this policy.

    Without REPLACING the table itself is deleted and created again; an owned table
    (nft_ownership) must stay, so its content is emptied instead: rules flushed, then
    the chains and sets in REPLACING deleted, all in the same transaction."""
    return render_compiled(load_ruleset(ruleset), baseline, replacing)


def render_compiled(
    compiled: CompiledRuleset, baseline: Baseline, replacing: TableObjects | None = None
) -> JsonDocument:
    """render() for a ruleset already checked by load_ruleset."""
    commands: list[JsonDocument] = [{"metainfo": {"json_schema_version": 1}}]
    if replacing is None:
        # add + delete + add: one transaction that works whether or not the table exists.
        commands += [
            {"add": {"table": dict(_TABLE)}},
            {"delete": {"table": dict(_TABLE)}},
            {"add": {"table": dict(_TABLE)}},
        ]
    else:
        commands.append({"flush": {"table": dict(_TABLE)}})
        commands += [{"delete": {"chain": {**_IN_TABLE, "name": c}}} for c in replacing.chains]
        commands += [{"delete": {"set": {**_IN_TABLE, "name": s}}} for s in replacing.sets]
    commands.extend(_set_commands(compiled))
    commands.extend(_chain_commands(baseline.mode))
    commands.extend(_baseline_input(baseline))
    commands.extend(_baseline_output(baseline))
    commands.extend(_policy_rules(compiled, baseline.mode))
    return {"nftables": commands}


_METAINFO = {"metainfo": {"json_schema_version": 1}}


class _Claim(enum.Enum):
    """What claiming the table found."""

    HELD = "held"  # ours (created, taken back, or already held)
    CONVERTED = "converted"  # an unflagged table, now ours and holding guard chains
    UNOWNED = "unowned"  # this kernel cannot own tables


@dataclass(frozen=True)
class _Applied:
    """A loaded policy: its structure (rules, set names, baseline) and its sets' content."""

    structure: tuple[object, ...]
    groups: dict[str, AddressGroup]

    def objects(self) -> TableObjects:
        sets = tuple(set_name(group, suffix) for group in self.groups for suffix, *_ in _SET_KINDS)
        return TableObjects(chains=("input", "output", *POLICY_CHAINS.values()), sets=sets)

    @classmethod
    def of(cls, compiled: CompiledRuleset, baseline: Baseline) -> _Applied:
        names = tuple(group.name for group in compiled.groups)
        return cls((compiled.rules, names, baseline), {g.name: g for g in compiled.groups})


def element_changes(before: dict[str, AddressGroup], after: CompiledRuleset) -> list[JsonDocument]:
    """Commands that turn BEFORE's set elements into AFTER's (same sets): deletions first,
    then additions, in one batch. Hash sets make each one cheap at any size."""
    deletions: list[JsonDocument] = []
    additions: list[JsonDocument] = []
    for group in after.groups:
        old = before[group.name]
        for suffix, *_ in _SET_KINDS:
            was = {_element_key(e): e for e in _elements(old, suffix)}
            now = {_element_key(e): e for e in _elements(group, suffix)}
            target = {**_IN_TABLE, "name": set_name(group.name, suffix)}
            gone = [was[k] for k in sorted(was.keys() - now.keys())]
            new = [now[k] for k in sorted(now.keys() - was.keys())]
            if gone:
                deletions.append({"delete": {"element": {**target, "elem": gone}}})
            if new:
                additions.append({"add": {"element": {**target, "elem": new}}})
    return deletions + additions


def _element_key(element: Any) -> str:
    return element if isinstance(element, str) else json.dumps(element, sort_keys=True)


class TableOwner(Interface):
    """A runner that can also own the table (LibNftables; see nft_ownership)."""

    def claim_table(self, name: str, *, replace: bool = False) -> None: ...

    def table_flags(self, name: str) -> int | None: ...

    def json_cmd(self, document: JsonDocument, *, terse: bool = False) -> JsonDocument: ...


class NftablesBackend:
    """The Backend for nftables; `apply` is the only writer of the table.

    With an OWNER, every apply first makes sure the table is ours (owner + persist flags,
    created, taken back after a restart, or converted from an unflagged table) and then
    replaces its content; on a kernel without the flags it falls back to replacing the
    unowned table, and tamper repair (agent/tamper.py) is the only protection left."""

    def __init__(self, runner: NftRunner, owner: TableOwner | None = None) -> None:
        self._runner = runner
        self._owner = owner
        # What the last apply left in the kernel, for element-only updates.
        self._applied: _Applied | None = None

    @property
    def owns_table(self) -> bool:
        """Whether applies keep the table owned (False once the kernel said it cannot)."""
        return self._owner is not None

    def apply(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
        """Load the policy. In an owned table, where nobody else can have changed what we
        loaded, only set elements change when nothing else did (a peer joined, left or
        moved); otherwise, and for a re-apply of the same policy (a repair), the whole
        table's content is replaced."""
        compiled = load_ruleset(ruleset)  # a bad ruleset fails before the kernel is asked
        applied = _Applied.of(compiled, baseline)
        previous, self._applied = self._applied, None
        if self._owner is not None and previous and previous.structure == applied.structure:
            changes = element_changes(previous.groups, compiled)
            if changes:
                try:
                    self._runner.json_cmd({"nftables": [_METAINFO, *changes]})
                    self._applied = applied
                    return
                except NftError:
                    pass  # not what we last loaded after all: replace everything
        replacing = None
        claim = self._claim(self._owner) if self._owner is not None else _Claim.UNOWNED
        if claim is _Claim.HELD and previous is not None:
            replacing = previous.objects()  # what we loaded last is what it holds
        elif claim is not _Claim.UNOWNED and self._owner is not None:
            replacing = self._objects(self._owner)  # after a restart or a conversion: ask
        self._runner.json_cmd(render_compiled(compiled, baseline, replacing))
        self._applied = applied

    def update_elements(
        self,
        changes: Sequence[agent_pb2.SetChange],
        result: ruleset_pb2.Ruleset,
        baseline: Baseline,
    ) -> bool:
        """Add and remove a delta's hosts in the sets of the policy loaded last, without
        reloading it (one batch). False, with nothing changed, when that is not possible:
        the table is not owned (someone may have changed it), another baseline, networks
        change, or the kernel refused the batch."""
        applied = self._applied
        if self._owner is None or applied is None or applied.structure[-1] != baseline:
            return False
        updates = host_updates(applied.groups, changes)
        if updates is None:
            return False
        commands, groups = updates
        if commands:
            try:
                self._runner.json_cmd({"nftables": [_METAINFO, *commands]})
            except NftError:
                return False  # one batch: the kernel holds what it held
        self._applied = _Applied(applied.structure, groups)
        return True

    def remove(self) -> None:
        self._applied = None
        if not self.is_present():
            return
        # `delete table` alone: an owned or orphaned persistent table refuses a flagless
        # `add table`. The kernel lets only the owner (or anyone, once the owner is gone)
        # delete an owned table.
        try:
            self._runner.json_cmd({"nftables": [{"delete": {"table": dict(_TABLE)}}]})
        except NftError as exc:
            if "Operation not permitted" in str(exc):
                raise NftError(
                    f"table {FAMILY} {TABLE} is owned by a running bulkhead-agent; stop the agent"
                    " first"
                ) from exc
            raise

    def _claim(self, owner: TableOwner) -> _Claim:
        try:
            owner.claim_table(TABLE)
            return _Claim.HELD
        except OwnershipError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
        if self.is_present():
            # An unflagged table (an older agent's, or the kernel cannot flag tables):
            # replace it by an owned one in one transaction, guarded until filled.
            try:
                owner.claim_table(TABLE, replace=True)
                return _Claim.CONVERTED
            except OwnershipError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
        self._owner = None  # this kernel has no owned tables: plain replacement from now on
        return _Claim.UNOWNED

    def _objects(self, owner: TableOwner) -> TableObjects:
        # Terse: sets without their elements, which may be 100k long.
        listing = owner.json_cmd({"nftables": [{"list": {"table": dict(_TABLE)}}]}, terse=True)
        found: dict[str, list[str]] = {"chain": [], "set": []}
        for item in listing.get("nftables", []):
            for kind, names in found.items():
                if kind in item:
                    names.append(item[kind]["name"])
        return TableObjects(tuple(found["chain"]), tuple(found["set"]))

    def is_present(self) -> bool:
        if self._owner is not None:
            # Not through a listing: nft 1.0.6 prints an orphaned table as broken JSON.
            return self._owner.table_flags(TABLE) is not None
        listing = self._runner.json_cmd({"nftables": [{"list": {"tables": None}}]})
        return any(
            item.get("table", {}).get("family") == FAMILY
            and item.get("table", {}).get("name") == TABLE
            for item in listing.get("nftables", [])
        )

    def state_fingerprint(self) -> str:
        """Our table as the kernel holds it, counters left out (see fingerprint.py)."""
        try:
            listing = self._runner.json_cmd({"nftables": [{"list": {"table": dict(_TABLE)}}]})
        except NftError:
            if not self.is_present():
                return ABSENT
            raise
        return compose(table_components(listing))


# What changes without anyone touching the table: counters count, quotas fill up.
_VOLATILE = {"counter": ("packets", "bytes"), "quota": ("used",)}


def table_components(listing: JsonDocument) -> dict[str, object]:
    """`list table` output as fingerprint components: the table, each chain with its rules
    in order, each set with its elements. Handles stay in: a rule deleted and added back
    is a change."""
    components: dict[str, list[object]] = {}
    for item in listing.get("nftables", []):
        for kind, body in _stable(item).items():
            if kind == "metainfo":
                continue
            if kind == "table":
                name = f"table {FAMILY} {TABLE}"
            elif kind == "rule":
                name = f"chain {body.get('chain')}"
            else:
                name = f"{kind} {body.get('name')}"
            components.setdefault(name, []).append(_set_content(body) if kind == "set" else body)
    return dict(components)


def _stable(value: Any) -> Any:
    """VALUE without its counter values, recursively."""
    if isinstance(value, list):
        return [_stable(item) for item in value]
    if not isinstance(value, dict):
        return value
    stable: dict[str, Any] = {}
    for key, item in value.items():
        content = _stable(item)
        if key in _VOLATILE and isinstance(content, dict):
            content = {k: v for k, v in content.items() if k not in _VOLATILE[key]}
        stable[key] = content
    return stable


def _set_content(body: dict[str, Any]) -> dict[str, Any]:
    # Elements are a set: the kernel's listing order is no change. A dynamic set is filled
    # by the packet path, so only its definition is ours.
    content = {key: value for key, value in body.items() if key != "elem"}
    if "dynamic" not in body.get("flags", []):
        content["elem"] = sorted(body.get("elem", []), key=lambda e: json.dumps(e, sort_keys=True))
    return content


def set_name(group: str, suffix: str) -> str:
    """The nft set holding one family/kind of an address set, e.g. web_v4net."""
    return f"{group}_{suffix}"


def _set_commands(compiled: CompiledRuleset) -> Iterable[JsonDocument]:
    for group in compiled.groups:
        for suffix, nft_type, _, interval in _SET_KINDS:
            definition: JsonDocument = {
                **_IN_TABLE,
                "name": set_name(group.name, suffix),
                "type": nft_type,
            }
            if interval:
                definition["flags"] = ["interval"]
            elements = _elements(group, suffix)
            if elements:
                definition["elem"] = elements
            yield {"add": {"set": definition}}


def _elements(group: AddressGroup, suffix: str) -> list[Any]:
    if suffix == "v4":
        return [str(host) for host in group.v4_hosts]
    if suffix == "v6":
        return [str(host) for host in group.v6_hosts]
    networks = group.v4_networks if suffix == "v4net" else group.v6_networks
    return [
        {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}} for net in networks
    ]


def _chain_commands(mode: Mode) -> Iterable[JsonDocument]:
    policy = "drop" if mode is Mode.ENFORCE else "accept"
    for hook in ("input", "output"):
        yield {
            "add": {
                "chain": {
                    **_IN_TABLE,
                    "name": hook,
                    "type": "filter",
                    "hook": hook,
                    "prio": 0,
                    "policy": policy,
                }
            }
        }
    for chain in POLICY_CHAINS.values():
        yield {"add": {"chain": {**_IN_TABLE, "name": chain}}}


def _rule(chain: str, expr: list[Expr], comment: str | None = None) -> JsonDocument:
    rule: JsonDocument = {**_IN_TABLE, "chain": chain, "expr": expr}
    if comment:
        # nft refuses longer comments; cut on a character boundary.
        rule["comment"] = comment.encode()[:COMMENT_MAX_BYTES].decode(errors="ignore")
    return {"add": {"rule": rule}}


def _match(left: Expr, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": field}}


def _verdict(verdict: str) -> Expr:
    return {verdict: None}


def _ports(ranges: Iterable[tuple[int, int]]) -> Any:
    values: list[Any] = [
        first if first == last else {"range": [first, last]} for first, last in ranges
    ]
    return values[0] if len(values) == 1 else {"set": values}


def _common_head(chain: str, loopback_key: str, mode: Mode) -> list[JsonDocument]:
    rules = [
        _rule(chain, [_match({"meta": {"key": loopback_key}}, "lo"), _verdict("accept")]),
        _rule(
            chain,
            [
                _match({"ct": {"key": "state"}}, ["established", "related"], op="in"),
                _verdict("accept"),
            ],
        ),
        _rule(
            chain,
            [_match(_payload("icmp", "type"), {"set": list(ICMP_TYPES)}), _verdict("accept")],
        ),
        _rule(
            chain,
            [_match(_payload("icmpv6", "type"), {"set": list(ICMPV6_TYPES)}), _verdict("accept")],
        ),
    ]
    if mode is Mode.ENFORCE:
        rules.append(
            _rule(
                chain,
                [_match({"ct": {"key": "state"}}, "invalid", op="in"), _verdict("drop")],
            )
        )
    return rules


def _failsafe(chain: str, specs: Iterable[PortSpec]) -> list[JsonDocument]:
    return [
        _rule(
            chain,
            [
                _match(_payload(spec.protocol, "dport"), _ports([(spec.first, spec.last)])),
                _verdict("accept"),
            ],
            comment=f"failsafe {spec}",
        )
        for spec in specs
    ]


def _controller(endpoint: Endpoint) -> JsonDocument:
    address = ipaddress.ip_address(endpoint.address)
    family = "ip" if address.version == 4 else "ip6"
    return _rule(
        "output",
        [
            _match(_payload(family, "daddr"), str(address)),
            _match(_payload("tcp", "dport"), endpoint.port),
            _verdict("accept"),
        ],
        comment="controller",
    )


def _tail(chain: str, direction: Direction, mode: Mode) -> list[JsonDocument]:
    if mode is Mode.ENFORCE:
        log = {"log": {"group": NFLOG_GROUP, "prefix": DENY_PREFIX}}
        default = _rule(chain, [{"counter": None}, log, _verdict("drop")], comment="default-deny")
    else:
        log = {"log": {"group": NFLOG_GROUP, "prefix": WOULD_DENY_PREFIX}}
        default = _rule(chain, [{"counter": None}, log], comment="would-deny")
    return [_rule(chain, [{"jump": {"target": POLICY_CHAINS[direction]}}]), default]


def _baseline_input(baseline: Baseline) -> list[JsonDocument]:
    return [
        *_common_head("input", "iif", baseline.mode),
        *_failsafe("input", baseline.failsafe_inbound),
        *_tail("input", Direction.INGRESS, baseline.mode),
    ]


def _baseline_output(baseline: Baseline) -> list[JsonDocument]:
    return [
        *_common_head("output", "oif", baseline.mode),
        *_failsafe("output", baseline.failsafe_outbound),
        *(_controller(endpoint) for endpoint in baseline.controllers),
        *_tail("output", Direction.EGRESS, baseline.mode),
    ]


def _policy_rules(compiled: CompiledRuleset, mode: Mode) -> Iterable[JsonDocument]:
    for rule in compiled.rules:
        for suffix, _, family, _ in _SET_KINDS:
            yield _policy_rule(rule, suffix, family, mode)


def _policy_rule(rule: PolicyRule, suffix: str, family: str, mode: Mode) -> JsonDocument:
    field = "saddr" if rule.direction is Direction.INGRESS else "daddr"
    expr = [_match(_payload(family, field), "@" + set_name(rule.peer_set, suffix))]
    if rule.protocol is Protocol.ICMP:
        expr.append(_match({"meta": {"key": "l4proto"}}, "icmp" if family == "ip" else "ipv6-icmp"))
    elif rule.protocol in (Protocol.TCP, Protocol.UDP):
        if rule.ports:
            expr.append(_match(_payload(rule.protocol.value, "dport"), _ports(rule.ports)))
        else:
            expr.append(_match({"meta": {"key": "l4proto"}}, rule.protocol.value))
    expr.append({"counter": None})
    if rule.allow:
        expr.append(_verdict("accept"))
        return _rule(POLICY_CHAINS[rule.direction], expr, comment=rule.label)
    if mode is Mode.ENFORCE:
        expr.append(_verdict("drop"))
        return _rule(POLICY_CHAINS[rule.direction], expr, comment=rule.label)
    # Visibility never drops: a deny rule counts and stops evaluation, so the packet is
    # counted once, by the rule that would have dropped it, and by no later rule.
    expr.append(_verdict("accept"))
    return _rule(POLICY_CHAINS[rule.direction], expr, comment=f"would-deny {rule.label}")
