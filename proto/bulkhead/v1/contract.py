"""The parts of the contract that are code rather than messages, shared by agent and
controller (which never import each other): the ruleset hash, policy deltas, the rules
for agent ids and labels, and the enrollment token format. See PROTOCOL.md beside this
file."""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from bulkhead.v1 import agent_pb2, ruleset_pb2

AGENT_ID_RULE = (
    "1-63 lowercase letters, digits, '.', '_' or '-', starting and ending with a letter or digit"
)
_AGENT_ID = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")

LABEL_KEY_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.\-/]*"
LABEL_VALUE_PATTERN = r"[A-Za-z0-9._-]{0,63}"
MAX_LABEL_KEY_LENGTH = 63
LABEL_KEY_RULE = (
    f"at most {MAX_LABEL_KEY_LENGTH} letters, digits, '_', '.', '-' and '/', "
    "starting with a letter or digit"
)
LABEL_VALUE_RULE = "up to 63 letters, digits, '.', '_' or '-'"
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)
_LABEL_VALUE = re.compile(LABEL_VALUE_PATTERN)


_HASH_DOMAIN = b"bulkhead.v1 ruleset\0"


def ruleset_hash(ruleset: ruleset_pb2.Ruleset) -> str:
    """The ruleset's hash (PROTOCOL.md, "Revisions and hashes"): sha256 over its skeleton
    (rules, and sets by name only) and then each set's digest, in order. Built from parts
    so the controller can hash thousands of rulesets sharing a set without re-reading it."""
    skeleton = ruleset_pb2.Ruleset(
        sets=[ruleset_pb2.AddressSet(name=s.name) for s in ruleset.sets], rules=ruleset.rules
    )
    return composed_hash(
        skeleton.SerializeToString(deterministic=True), [set_digest(s) for s in ruleset.sets]
    )


def set_digest(address_set: ruleset_pb2.AddressSet) -> bytes:
    """sha256 of one address set's deterministic serialisation (name and elements)."""
    return hashlib.sha256(address_set.SerializeToString(deterministic=True)).digest()


def composed_hash(skeleton: bytes, set_digests: Sequence[bytes]) -> str:
    """ruleset_hash from its parts: the skeleton's serialisation and the sets' digests."""
    digest = hashlib.sha256(_HASH_DOMAIN)
    digest.update(len(skeleton).to_bytes(8, "big"))
    digest.update(skeleton)
    for part in set_digests:
        digest.update(part)
    return digest.hexdigest()


def legacy_ruleset_hash(ruleset: ruleset_pb2.Ruleset) -> str:
    """The hash before 2026-11 (sha256 of the whole serialisation): only for reading an
    agent state file written by an older version."""
    return hashlib.sha256(ruleset.SerializeToString(deterministic=True)).hexdigest()


def host_order(text: str) -> tuple[int, int]:
    """Sort key of AddressSet.hosts: IPv4 before IPv6, then numerically."""
    address = ipaddress.ip_address(text)
    return (address.version, int(address))


def network_order(text: str) -> tuple[int, int, int]:
    """Sort key of AddressSet.networks: IPv4 before IPv6, by first address, by prefix."""
    network = ipaddress.ip_network(text)
    return (network.version, int(network.network_address), network.prefixlen)


class DeltaError(ValueError):
    """A PolicyDelta does not fit the ruleset it is applied to; names the field."""


class DeltaHashMismatch(DeltaError):
    """A PolicyDelta applied cleanly, but the result is not the ruleset it announced."""


def merge_port_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sort and merge overlapping or adjacent ranges: the controller compiles rules this
    way, and the agent's nft sets refuse overlaps whatever arrives."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return tuple(merged)


def delta_result(
    held: ruleset_pb2.Ruleset, held_hash: str, delta: agent_pb2.PolicyDelta
) -> ruleset_pb2.Ruleset:
    """The ruleset DELTA makes of HELD (whose hash is HELD_HASH, "" for nothing held).
    DeltaError when the delta is against another ruleset or does not fit it;
    DeltaHashMismatch when its result does not hash to `delta.hash`."""
    if delta.base_hash != held_hash:
        holding = held_hash[:12] or "nothing"
        raise DeltaError(f"delta is against {delta.base_hash[:12]}, this host holds {holding}")
    ruleset = apply_set_changes(held, delta.sets)
    if ruleset_hash(ruleset) != delta.hash:
        raise DeltaHashMismatch("the delta's result does not match its hash")
    return ruleset


def set_changes(
    old: ruleset_pb2.Ruleset, new: ruleset_pb2.Ruleset
) -> list[agent_pb2.SetChange] | None:
    """The changes that turn OLD into NEW when only set elements differ (same rules, same
    set names in the same order); None when anything else differs."""
    if len(old.sets) != len(new.sets) or old.rules != new.rules:
        return None
    changes = []
    for before, after in zip(old.sets, new.sets, strict=True):
        if before.name != after.name:
            return None
        if before != after:
            changes.append(set_change(before, after))
    return changes


def set_change(
    before: ruleset_pb2.AddressSet, after: ruleset_pb2.AddressSet
) -> agent_pb2.SetChange:
    """What turns set BEFORE into AFTER (same name), elements in AddressSet order."""
    hosts_before, hosts_after = set(before.hosts), set(after.hosts)
    networks_before, networks_after = set(before.networks), set(after.networks)
    return agent_pb2.SetChange(
        name=after.name,
        add_hosts=[h for h in after.hosts if h not in hosts_before],
        remove_hosts=[h for h in before.hosts if h not in hosts_after],
        add_networks=[n for n in after.networks if n not in networks_before],
        remove_networks=[n for n in before.networks if n not in networks_after],
    )


def apply_set_changes(
    ruleset: ruleset_pb2.Ruleset, changes: Sequence[agent_pb2.SetChange]
) -> ruleset_pb2.Ruleset:
    """RULESET with CHANGES applied, elements kept in AddressSet order (a new message).

    Strict, so a delta against some other ruleset fails here rather than half-fits:
    every named set must exist, at most one change per set, removed elements must be
    present and added ones absent. Cost follows the changed sets, not the whole ruleset.
    """
    result = ruleset_pb2.Ruleset()
    result.CopyFrom(ruleset)
    index = {address_set.name: i for i, address_set in enumerate(result.sets)}
    seen: set[str] = set()
    for number, change in enumerate(changes):
        field = f"delta.sets[{number}]"
        position = index.get(change.name)
        if position is None:
            raise DeltaError(f"{field}.name: {change.name!r} is not a set of the base ruleset")
        if change.name in seen:
            raise DeltaError(f"{field}.name: {change.name!r} is changed twice")
        seen.add(change.name)
        target = result.sets[position]
        hosts = _changed(
            f"{field}.*_hosts", list(target.hosts), change.add_hosts, change.remove_hosts,
            host_order,
        )  # fmt: skip
        networks = _changed(
            f"{field}.*_networks", list(target.networks), change.add_networks,
            change.remove_networks, network_order,
        )  # fmt: skip
        target.hosts[:] = hosts
        target.networks[:] = networks
    return result


def _changed(
    field: str,
    elements: list[str],
    add: Sequence[str],
    remove: Sequence[str],
    order: Callable[[str], tuple[int, ...]],
) -> list[str]:
    present = set(elements)
    missing = [e for e in remove if e not in present]
    if missing:
        raise DeltaError(f"{field}: removes {missing[0]!r}, which the set does not hold")
    gone = set(remove)
    if len(gone) != len(remove):
        raise DeltaError(f"{field}: removes an element twice")
    kept = [e for e in elements if e not in gone] if gone else elements
    remaining = present - gone
    try:
        for element in add:
            if element in remaining:
                raise DeltaError(f"{field}: adds {element!r}, which the set already holds")
            remaining.add(element)
            bisect.insort(kept, element, key=order)
    except ValueError as exc:
        if isinstance(exc, DeltaError):
            raise
        raise DeltaError(f"{field}: {exc}") from exc
    return kept


def is_valid_agent_id(text: str) -> bool:
    return _AGENT_ID.fullmatch(text) is not None


def is_valid_label_key(text: str) -> bool:
    return len(text) <= MAX_LABEL_KEY_LENGTH and _LABEL_KEY.fullmatch(text) is not None


def is_valid_label_value(text: str) -> bool:
    return _LABEL_VALUE.fullmatch(text) is not None


# Enrollment tokens: <id>.<secret>.<ca fingerprint>. The id (12 lowercase hex) names the
# token in the controller's store, which keeps only the sha256 of the secret (32 random
# bytes, base64url without padding: 43 characters); the fingerprint (sha256 of the CA
# certificate's DER, lowercase hex) lets the agent pin the CA before it trusts anything.
TOKEN_ID_PATTERN = re.compile(r"[0-9a-f]{12}")
TOKEN_SECRET_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")
FINGERPRINT_PATTERN = re.compile(r"[0-9a-f]{64}")


class TokenFormatError(ValueError):
    """The text is not an enrollment token; the message names the part (never the secret)."""


class EnrollmentToken(NamedTuple):
    token_id: str
    secret: str
    ca_fingerprint: str


def parse_token(text: str) -> EnrollmentToken:
    """Split and check a token; errors never echo the secret."""
    parts = text.strip().split(".")
    if len(parts) != 3:
        raise TokenFormatError(
            "enrollment token must be <id>.<secret>.<ca-fingerprint>, "
            f"found {len(parts)} part(s) separated by '.'"
        )
    token_id, secret, fingerprint = parts
    if TOKEN_ID_PATTERN.fullmatch(token_id) is None:
        raise TokenFormatError(
            "enrollment token id (first part) must be 12 lowercase hex characters"
        )
    if TOKEN_SECRET_PATTERN.fullmatch(secret) is None:
        raise TokenFormatError(
            "enrollment token secret (second part) must be 43 base64url characters"
        )
    if FINGERPRINT_PATTERN.fullmatch(fingerprint) is None:
        raise TokenFormatError(
            "enrollment token CA fingerprint (third part) must be 64 lowercase hex characters"
        )
    return EnrollmentToken(token_id, secret, fingerprint)
