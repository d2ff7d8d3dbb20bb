"""Render a compiled ruleset into iptables rules and ipsets (pure: no kernel, no root).

The rules mirror the nftables renderer rule for rule: loopback, established/related,
the ICMP/ICMPv6 baseline, invalid (enforce only), failsafe ports, controller endpoints,
the policy rules in order, then the default. Policy rules sit in our two chains
themselves rather than in sub-chains, because a deny rule in visibility mode has to
leave our chains without a verdict (RETURN) and without being counted again by the
default at the end of the chain. Peers are matched through one `hash:net` ipset per
address group and family, so the rules never grow with the number of peers.

Each family gets two copies of our chains, one for the filter table and one for security
(see backend.py for why). They differ only where logging is concerned: the filter copy
sees every packet first and alone carries the NFLOG rules, so a denied or would-deny
packet is logged once, not once per table.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence

from agent.dataplane.baseline import Baseline, Endpoint, Mode, PortSpec
from agent.dataplane.iptables.plan import (
    FAMILIES,
    INPUT_CHAIN,
    OUTPUT_CHAIN,
    Family,
    FamilyRules,
    IpSet,
    IptablesPlan,
    ipset_name,
    save_string,
)
from agent.dataplane.model import (
    DENY_PREFIX,
    NFLOG_GROUP,
    WOULD_DENY_PREFIX,
    AddressGroup,
    CompiledRuleset,
    Direction,
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    PolicyRule,
    Protocol,
    load_ruleset,
)
from agent.dataplane.nftables import ICMP_TYPES, ICMPV6_TYPES
from bulkhead.v1 import ruleset_pb2

# What "allowed" means in our chains: leave them, and let the host's own INPUT/OUTPUT rules
# after our jump decide. ACCEPT would end the built-in chain too, so an allowed packet
# would skip the host's later rules (fail2ban, an operator's DROP); with nftables, an
# accept in our table never overrides another table's drop either. Bulkhead only narrows.
ALLOW = "RETURN"

COMMENT_MAX_BYTES = 255  # XT_MAX_COMMENT_LEN less the terminating NUL
MULTIPORT_MAX = 15  # XT_MULTI_PORTS; a range takes two of them

# iptables-save prints ICMP types as numbers; the names are the nftables renderer's.
_ICMP_NUMBERS = {"destination-unreachable": 3, "time-exceeded": 11, "parameter-problem": 12}
_ICMPV6_NUMBERS = {
    "destination-unreachable": 1,
    "packet-too-big": 2,
    "time-exceeded": 3,
    "parameter-problem": 4,
    "mld-listener-query": 130,
    "mld-listener-report": 131,
    "mld-listener-done": 132,
    "nd-router-solicit": 133,
    "nd-router-advert": 134,
    "nd-neighbor-solicit": 135,
    "nd-neighbor-advert": 136,
    "mld2-listener-report": 143,
}
# A KeyError here at import means nftables.py gained a type this mirror lacks.
ICMP_NUMBERS = tuple(_ICMP_NUMBERS[name] for name in ICMP_TYPES)
ICMPV6_NUMBERS = tuple(_ICMPV6_NUMBERS[name] for name in ICMPV6_TYPES)

_ICMP_PROTOCOL: dict[Family, str] = {4: "icmp", 6: "ipv6-icmp"}
# hash:net cannot hold a /0: it is stored as its two halves.
_WHOLE_SPACE: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[str, str]] = {
    ipaddress.ip_network("0.0.0.0/0"): ("0.0.0.0/1", "128.0.0.0/1"),
    ipaddress.ip_network("::/0"): ("::/1", "8000::/1"),
}


def render_iptables(ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> IptablesPlan:
    """The rules and ipsets that enforce this ruleset; RulesetError if it is invalid."""
    return render_compiled(load_ruleset(ruleset), baseline)


def render_compiled(compiled: CompiledRuleset, baseline: Baseline) -> IptablesPlan:
    """render_iptables() for a ruleset already checked by load_ruleset."""
    v4, v6 = (
        FamilyRules(
            family,
            filter=tuple(_family_rules(compiled, baseline, family, log=True)),
            security=tuple(_family_rules(compiled, baseline, family, log=False)),
        )
        for family in FAMILIES
    )
    ipsets = tuple(_ipset(group, family) for group in compiled.groups for family in FAMILIES)
    return IptablesPlan(v4=v4, v6=v6, ipsets=ipsets)


def _family_rules(
    compiled: CompiledRuleset, baseline: Baseline, family: Family, *, log: bool
) -> Iterator[str]:
    mode = baseline.mode
    yield from _head(INPUT_CHAIN, "-i", family, mode)
    yield from _failsafe(INPUT_CHAIN, baseline.failsafe_inbound)
    yield from _policy_rules(compiled, Direction.INGRESS, family, mode)
    yield from _tail(INPUT_CHAIN, mode, log=log)
    yield from _head(OUTPUT_CHAIN, "-o", family, mode)
    yield from _failsafe(OUTPUT_CHAIN, baseline.failsafe_outbound)
    yield from _controllers(baseline.controllers, family)
    yield from _policy_rules(compiled, Direction.EGRESS, family, mode)
    yield from _tail(OUTPUT_CHAIN, mode, log=log)


def _rule(
    chain: str, matches: Sequence[str], target: Sequence[str], comment: str | None = None
) -> str:
    # Word order is iptables-save's: addresses, interfaces, protocol, matches, target.
    words = ["-A", chain, *matches]
    if comment:
        words += ["-m", "comment", "--comment", save_string(_comment_text(comment))]
    words += ["-j", *target]
    return " ".join(words)


def _comment_text(comment: str) -> str:
    # One restore line per rule: control characters would split or end it.
    printable = "".join(" " if ord(char) < 32 or ord(char) == 127 else char for char in comment)
    return printable.encode()[:COMMENT_MAX_BYTES].decode(errors="ignore")


def _head(chain: str, interface_flag: str, family: Family, mode: Mode) -> Iterator[str]:
    yield _rule(chain, [interface_flag, "lo"], [ALLOW])
    yield _rule(chain, ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"], [ALLOW])
    if family == 4:
        for number in ICMP_NUMBERS:
            yield _rule(chain, ["-p", "icmp", "-m", "icmp", "--icmp-type", str(number)], [ALLOW])
    else:
        for number in ICMPV6_NUMBERS:
            matches = ["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", str(number)]
            yield _rule(chain, matches, [ALLOW])
    if mode is Mode.ENFORCE:
        yield _rule(chain, ["-m", "conntrack", "--ctstate", "INVALID"], ["DROP"])


def _port_text(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}:{last}"


def _failsafe(chain: str, specs: Iterable[PortSpec]) -> Iterator[str]:
    for spec in specs:
        matches = ["-p", spec.protocol, "-m", spec.protocol, "--dport"]
        matches.append(_port_text(spec.first, spec.last))
        yield _rule(chain, matches, [ALLOW], comment=f"failsafe {spec}")


def _controllers(endpoints: Iterable[Endpoint], family: Family) -> Iterator[str]:
    for endpoint in endpoints:
        address = ipaddress.ip_address(endpoint.address)
        if address.version != family:
            continue
        host = f"{address}/{address.max_prefixlen}"
        matches = ["-d", host, "-p", "tcp", "-m", "tcp", "--dport", str(endpoint.port)]
        yield _rule(OUTPUT_CHAIN, matches, [ALLOW], comment="controller")


def _policy_rules(
    compiled: CompiledRuleset, direction: Direction, family: Family, mode: Mode
) -> Iterator[str]:
    chain = INPUT_CHAIN if direction is Direction.INGRESS else OUTPUT_CHAIN
    for rule in compiled.rules:
        if rule.direction is direction:
            yield from _policy_rule(chain, rule, family, mode)


def _policy_rule(chain: str, rule: PolicyRule, family: Family, mode: Mode) -> Iterator[str]:
    side = "src" if rule.direction is Direction.INGRESS else "dst"
    peers = ["-m", "set", "--match-set", ipset_name(rule.peer_set, family), side]
    protocol: list[str] = []
    if rule.protocol is Protocol.ICMP:
        protocol = ["-p", _ICMP_PROTOCOL[family]]
    elif rule.protocol in (Protocol.TCP, Protocol.UDP):
        protocol = ["-p", rule.protocol.value]
    if rule.allow:
        target, comment = ALLOW, rule.label
    elif mode is Mode.ENFORCE:
        target, comment = "DROP", rule.label
    else:
        # Visibility never drops: the deny rule counts the packet and leaves our chains,
        # so no later rule (nor the would-deny default) counts it again.
        target, comment = "RETURN", f"would-deny {rule.label}".strip()
    port_lists = _multiport_lists(rule.ports) if rule.ports else [None]
    for ports in port_lists:
        dports = ["-m", "multiport", "--dports", ports] if ports else []
        yield _rule(chain, [*protocol, *peers, *dports], [target], comment=comment)


def _multiport_lists(ranges: Sequence[tuple[int, int]]) -> list[str]:
    """The merged port ranges as multiport lists of at most MULTIPORT_MAX ports each."""
    lists: list[list[str]] = [[]]
    used = 0
    for first, last in ranges:
        weight = 1 if first == last else 2
        if used + weight > MULTIPORT_MAX:
            lists.append([])
            used = 0
        lists[-1].append(_port_text(first, last))
        used += weight
    return [",".join(ports) for ports in lists]


def _tail(chain: str, mode: Mode, *, log: bool) -> Iterator[str]:
    if mode is Mode.ENFORCE:
        if log:
            nflog = ["NFLOG", "--nflog-prefix", DENY_PREFIX, "--nflog-group", str(NFLOG_GROUP)]
            yield _rule(chain, [], nflog, comment="default-deny")
        yield _rule(chain, [], ["DROP"], comment="default-deny")
        return
    if log:
        nflog = ["NFLOG", "--nflog-prefix", WOULD_DENY_PREFIX, "--nflog-group", str(NFLOG_GROUP)]
        yield _rule(chain, [], nflog, comment="would-deny")
        yield _rule(chain, [], ["RETURN"])
        return
    # Without the log, the would-deny count lives on the RETURN: one counting rule per table.
    yield _rule(chain, [], ["RETURN"], comment="would-deny")


def host_member(host: IPv4Address | IPv6Address) -> str:
    """A host as the member of a `hash:net` set (and as `ipset save` prints it)."""
    return f"{host}/{host.max_prefixlen}"


def network_members(
    networks: Iterable[IPv4Network | IPv6Network],
) -> Iterator[tuple[int, int, str]]:
    """The `hash:net` members of collapsed NETWORKS as (first address, prefix length, text)."""
    for network in networks:
        halves = _WHOLE_SPACE.get(network)
        for net in [ipaddress.ip_network(half) for half in halves] if halves else [network]:
            yield int(net.network_address), net.prefixlen, str(net)


def _ipset(group: AddressGroup, family: Family) -> IpSet:
    hosts = group.v4_hosts if family == 4 else group.v6_hosts
    networks = group.v4_networks if family == 4 else group.v6_networks
    # (address, prefix length, text): sorted and deduplicated, as a host may also be a /32.
    members: set[tuple[int, int, str]] = {
        (int(host), host.max_prefixlen, host_member(host)) for host in hosts
    }
    members.update(network_members(networks))
    return IpSet(
        name=ipset_name(group.name, family),
        family=family,
        members=tuple(text for _, _, text in sorted(members)),
    )
