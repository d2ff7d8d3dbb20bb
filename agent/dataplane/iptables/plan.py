"""What the iptables backend loads: our chains' rules per family and table, and the ipsets
they match.

Rules are kept as the exact lines `iptables-legacy-save` prints for them, so the plan is
what goes into `iptables-legacy-restore`, what the golden files hold, and what a test
compares with the kernel's own listing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

Family = Literal[4, 6]
FAMILIES: tuple[Family, Family] = (4, 6)

CHAIN_PREFIX = "BULKHEAD-"
INPUT_CHAIN = "BULKHEAD-INPUT"
OUTPUT_CHAIN = "BULKHEAD-OUTPUT"
OUR_CHAINS = (INPUT_CHAIN, OUTPUT_CHAIN)

Table = Literal["filter", "security"]
# Each table holds a full copy of our chains, in this order: filter's INPUT and OUTPUT run
# before security's at the same hooks (priority 0, then 50), so filter's copy sees every
# packet first and is the only one that logs (NFLOG) what it denies. Both run after nat's
# OUTPUT, so both see a locally redirected (DNAT) packet's real destination, as the
# nftables table at priority 0 does; mangle, before nat, would not.
TABLES: tuple[Table, Table] = ("filter", "security")
LOGGING_TABLE: Table = "filter"
# Built-in chain -> our chain it jumps to, from its first rule.
HOOKS = {"INPUT": INPUT_CHAIN, "OUTPUT": OUTPUT_CHAIN}

SET_PREFIXES: dict[Family, str] = {4: "bh4-", 6: "bh6-"}
IPSET_NAME_MAX = 31  # IPSET_MAXNAMELEN (32) less the terminating NUL
TEMPORARY_SUFFIX = "-new"
_HASHED_GROUP_CHARS = 14

# Characters xtables_save_string leaves unquoted; it backslash-escapes these inside quotes.
_BARE = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ESCAPED = frozenset("\"\\'")


@dataclass(frozen=True)
class IpSet:
    """One `hash:net` ipset: a peer group's addresses of one family, as networks."""

    name: str
    family: Family
    members: tuple[str, ...]

    @property
    def temporary_name(self) -> str:
        """The set filled before it is swapped in under `name`."""
        return self.name + TEMPORARY_SUFFIX

    @property
    def ipset_family(self) -> str:
        return "inet" if self.family == 4 else "inet6"


@dataclass(frozen=True)
class FamilyRules:
    """Our chains' rules in one family's filter and security tables, as iptables-save lines.

    The two copies are the same rules but for logging: only filter's holds NFLOG rules.
    """

    family: Family
    filter: tuple[str, ...]
    security: tuple[str, ...]

    def table(self, table: Table) -> tuple[str, ...]:
        return self.security if table == "security" else self.filter

    def chain_rules(self, chain: str, table: Table = LOGGING_TABLE) -> tuple[str, ...]:
        return tuple(rule for rule in self.table(table) if rule.startswith(f"-A {chain} "))


@dataclass(frozen=True)
class IptablesPlan:
    """Everything one apply loads: rules for both families and the ipsets they use."""

    v4: FamilyRules
    v6: FamilyRules
    ipsets: tuple[IpSet, ...]

    def family(self, family: Family) -> FamilyRules:
        return self.v4 if family == 4 else self.v6


def ipset_name(group: str, family: Family) -> str:
    """The ipset of one address group and family, e.g. bh4-web.

    Long group names are shortened with a digest so that the temporary `<name>-new` set
    also fits ipset's 31 characters; a digest name holds a '-', which group names cannot,
    so it never collides with a plain one.
    """
    name = SET_PREFIXES[family] + group
    if len(name) + len(TEMPORARY_SUFFIX) <= IPSET_NAME_MAX:
        return name
    digest = hashlib.sha256(group.encode()).hexdigest()[:8]
    return f"{SET_PREFIXES[family]}{group[:_HASHED_GROUP_CHARS]}-{digest}"


def is_our_set(name: str) -> bool:
    return name.startswith(tuple(SET_PREFIXES.values()))


def jump_rule(builtin: str) -> str:
    """The one rule, first in a built-in chain, that sends its packets through ours."""
    return f"-A {builtin} -j {HOOKS[builtin]}"


def save_string(value: str) -> str:
    """A word quoted the way iptables-save prints it (and iptables-restore reads it)."""
    if value and all(char in _BARE for char in value):
        return value
    escaped = "".join("\\" + char if char in _ESCAPED else char for char in value)
    return f'"{escaped}"'
