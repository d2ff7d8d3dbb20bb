"""The iptables renderer: golden rules and ipsets, shape, invariants, refusal of bad input."""

from __future__ import annotations

import difflib
import ipaddress
import itertools
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from agent.dataplane.backend import RulesetError
from agent.dataplane.baseline import Baseline, Mode, baseline_from_json, parse_port_spec
from agent.dataplane.iptables import IptablesPlan, ipset_name, render_iptables
from agent.dataplane.iptables.plan import IPSET_NAME_MAX, TABLES, Family, FamilyRules, save_string
from bulkhead.v1 import ruleset_pb2 as pb

INPUTS = Path(__file__).resolve().parents[1] / "golden" / "nftables"
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "iptables"
CASES = sorted(path.name.removesuffix(".input.json") for path in INPUTS.glob("*.input.json"))
ENFORCE = Baseline(Mode.ENFORCE, failsafe_inbound=(parse_port_spec("tcp/22"),))
VISIBILITY = Baseline(Mode.VISIBILITY)
STANDARD_TARGETS = {"ACCEPT", "DROP", "RETURN", "NFLOG"}
FAMILY_PREFIXES: list[tuple[Family, str]] = [(4, "bh4-"), (6, "bh6-")]


def load_case(name: str) -> tuple[pb.Ruleset, Baseline]:
    document = json.loads((INPUTS / f"{name}.input.json").read_text())
    ruleset = json_format.ParseDict(document["ruleset"], pb.Ruleset())
    return ruleset, baseline_from_json(json.dumps(document["baseline"]))


def ipsets_text(plan: IptablesPlan) -> str:
    lines: list[str] = []
    for ipset in plan.ipsets:
        lines.append(f"create {ipset.name} hash:net family {ipset.ipset_family}")
        lines.extend(f"add {ipset.name} {member}" for member in ipset.members)
    return "".join(line + "\n" for line in lines)


def rules_text(rules: FamilyRules) -> str:
    """Both tables' copies, each under its name as iptables-save heads it."""
    lines = [line for table in TABLES for line in (f"*{table}", *rules.table(table))]
    return "".join(line + "\n" for line in lines)


def golden_texts(case: str) -> dict[str, str]:
    plan = render_iptables(*load_case(case))
    return {
        f"{case}.v4.rules": rules_text(plan.v4),
        f"{case}.v6.rules": rules_text(plan.v6),
        f"{case}.ipsets": ipsets_text(plan),
    }


def words(rule: str) -> list[str]:
    return shlex.split(rule)


def target(rule: str) -> str:
    parts = words(rule)
    return parts[parts.index("-j") + 1]


def comment(rule: str) -> str | None:
    parts = words(rule)
    return parts[parts.index("--comment") + 1] if "--comment" in parts else None


def test_there_are_golden_cases() -> None:
    assert {"empty_enforce", "web_db", "networks_ports", "visibility"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_render_matches_golden(case: str) -> None:
    for name, actual in golden_texts(case).items():
        golden = GOLDEN / name
        if os.environ.get("BULKHEAD_UPDATE_GOLDEN") == "1":
            GOLDEN.mkdir(exist_ok=True)
            golden.write_text(actual)
        expected = golden.read_text() if golden.exists() else ""
        if actual != expected:
            diff = difflib.unified_diff(
                expected.splitlines(), actual.splitlines(), str(golden), "rendered", lineterm=""
            )
            pytest.fail(
                f"{name} differs from golden (BULKHEAD_UPDATE_GOLDEN=1 regenerates):\n"
                + "\n".join(diff)
            )


@pytest.mark.parametrize("case", CASES)
def test_only_our_chains_and_sets_are_named(case: str) -> None:
    plan = render_iptables(*load_case(case))
    for (family, prefix), table in itertools.product(FAMILY_PREFIXES, TABLES):
        rules = plan.family(family).table(table)
        assert rules
        for rule in rules:
            parts = words(rule)
            assert parts[0] == "-A"
            assert parts[1] in ("BULKHEAD-INPUT", "BULKHEAD-OUTPUT")
            assert target(rule) in STANDARD_TARGETS
            if "--match-set" in parts:
                name = parts[parts.index("--match-set") + 1]
                assert name.startswith(prefix)
                assert name in {s.name for s in plan.ipsets if s.family == family}
        # Chain order is iptables-save's: all of BULKHEAD-INPUT, then BULKHEAD-OUTPUT.
        chains = [words(rule)[1] for rule in rules]
        assert chains == sorted(chains)


@pytest.mark.parametrize("case", CASES)
def test_head_of_each_chain_mirrors_the_nftables_baseline(case: str) -> None:
    ruleset, baseline = load_case(case)
    plan = render_iptables(ruleset, baseline)
    heads: list[tuple[Family, str, str]] = [
        (4, "BULKHEAD-INPUT", "-i"),
        (4, "BULKHEAD-OUTPUT", "-o"),
        (6, "BULKHEAD-INPUT", "-i"),
        (6, "BULKHEAD-OUTPUT", "-o"),
    ]
    for (family, chain, interface), table in itertools.product(heads, TABLES):
        rules = list(plan.family(family).chain_rules(chain, table))
        assert rules[0] == f"-A {chain} {interface} lo -j RETURN"
        assert rules[1] == f"-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
        icmp = [r for r in rules if "--icmp-type" in r or "--icmpv6-type" in r]
        assert rules[2 : 2 + len(icmp)] == icmp
        types = {int(words(r)[-3]) for r in icmp}
        if family == 4:
            assert types == {3, 11, 12}
        else:
            # Errors, packet-too-big, neighbour discovery and multicast listeners, both ways.
            assert types == {1, 2, 3, 4, 133, 134, 135, 136, 130, 131, 132, 143}
        invalid = f"-A {chain} -m conntrack --ctstate INVALID -j DROP"
        assert (invalid in rules) is (baseline.mode is Mode.ENFORCE)


def test_enforce_ends_each_chain_with_a_counted_drop_logged_in_filter_only() -> None:
    plan = render_iptables(*load_case("web_db"))
    for family in (plan.v4, plan.v6):
        for chain in ("BULKHEAD-INPUT", "BULKHEAD-OUTPUT"):
            *_, log, drop = family.chain_rules(chain, "filter")
            assert log == (
                f"-A {chain} -m comment --comment default-deny -j NFLOG "
                "--nflog-prefix bulkhead-deny --nflog-group 1001"
            )
            assert drop == f"-A {chain} -m comment --comment default-deny -j DROP"
            *_, before, last = family.chain_rules(chain, "security")
            assert last == drop
            assert target(before) != "NFLOG"


BARE_RETURNS = {"-A BULKHEAD-INPUT -j RETURN", "-A BULKHEAD-OUTPUT -j RETURN"}


@pytest.mark.parametrize("case", CASES)
def test_the_security_copy_is_the_filter_copy_without_its_logs(case: str) -> None:
    # Filter sees every packet first: a log in security too would count each one twice.
    plan = render_iptables(*load_case(case))
    for family in (plan.v4, plan.v6):
        assert [r for r in family.filter if target(r) == "NFLOG"]
        assert not [r for r in family.security if target(r) == "NFLOG"]
        # Visibility's closing RETURN takes over the dropped log's would-deny comment.
        expected = [
            r.replace(" -j RETURN", " -m comment --comment would-deny -j RETURN")
            if r in BARE_RETURNS
            else r
            for r in family.filter
            if target(r) != "NFLOG"
        ]
        assert list(family.security) == expected


def test_visibility_never_drops_and_counts_would_deny_once_per_table() -> None:
    plan = render_iptables(*load_case("visibility"))
    for family in (plan.v4, plan.v6):
        assert all(target(rule) != "DROP" for rule in family.filter + family.security)
        for chain in ("BULKHEAD-INPUT", "BULKHEAD-OUTPUT"):
            *_, log, last = family.chain_rules(chain, "filter")
            assert log == (
                f"-A {chain} -m comment --comment would-deny -j NFLOG "
                "--nflog-prefix bulkhead-would-deny --nflog-group 1001"
            )
            assert last == f"-A {chain} -j RETURN"
            *_, security_last = family.chain_rules(chain, "security")
            assert security_last == f"-A {chain} -m comment --comment would-deny -j RETURN"
            for table in TABLES:
                tail = [r for r in family.chain_rules(chain, table) if comment(r) == "would-deny"]
                assert len(tail) == 1
        for table in TABLES:
            (deny,) = [r for r in family.table(table) if "r-d3ad00" in r]
            assert comment(deny) == "would-deny r-d3ad00 no-web-6000"
            assert target(deny) == "RETURN"


def test_enforce_deny_rule_drops() -> None:
    ruleset, _ = load_case("networks_ports")
    plan = render_iptables(ruleset, ENFORCE)
    (deny,) = [r for r in plan.v4.filter if "r-000001" in (comment(r) or "")]
    assert deny == (
        "-A BULKHEAD-INPUT -m set --match-set bh4-quarantine src "
        '-m comment --comment "r-000001 quarantine" -j DROP'
    )


def test_controllers_and_failsafe_ports_land_in_their_family_and_chain() -> None:
    plan = render_iptables(*load_case("empty_enforce"))
    for table in TABLES:
        v4, v6 = plan.v4.table(table), plan.v6.table(table)
        assert (
            "-A BULKHEAD-OUTPUT -d 198.18.255.1/32 -p tcp -m tcp --dport 7443 "
            "-m comment --comment controller -j RETURN"
        ) in v4
        assert (
            "-A BULKHEAD-OUTPUT -d 2001:db8:ffff::1/128 -p tcp -m tcp --dport 7443 "
            "-m comment --comment controller -j RETURN"
        ) in v6
        assert not [r for r in v4 if "2001:db8" in r]
        assert not [r for r in v6 if "198.18" in r]
        for rules in (v4, v6):
            assert (
                "-A BULKHEAD-INPUT -p tcp -m tcp --dport 22 "
                '-m comment --comment "failsafe tcp/22" -j RETURN'
            ) in rules
            assert (
                "-A BULKHEAD-OUTPUT -p udp -m udp --dport 53 "
                '-m comment --comment "failsafe udp/53" -j RETURN'
            ) in rules


def _peer_ruleset(peer_count: int) -> pb.Ruleset:
    v4 = [str(ipaddress.IPv4Address("198.18.0.1") + i) for i in range(peer_count)]
    v6 = [str(ipaddress.IPv6Address("2001:db8::1") + i) for i in range(peer_count)]
    # Gaps between the networks, so none collapse into a bigger one.
    nets = [f"198.19.{i % 256}.{(i // 256) * 8}/30" for i in range(peer_count)]
    nets += [f"2001:db8:{2 * i:x}::/48" for i in range(peer_count)]
    return pb.Ruleset(
        sets=[pb.AddressSet(name="peers", hosts=v4 + v6, networks=nets)],
        rules=[
            pb.Rule(
                direction=direction,
                protocol=pb.PROTOCOL_TCP,
                ports=[pb.PortRange(first=5432, last=5432)],
                peer_set="peers",
                action=pb.ACTION_ALLOW,
                policy="p",
                id="r1",
            )
            for direction in (pb.DIRECTION_INGRESS, pb.DIRECTION_EGRESS)
        ],
    )


def test_rules_do_not_grow_with_peers() -> None:
    one = render_iptables(_peer_ruleset(1), ENFORCE)
    thousand = render_iptables(_peer_ruleset(1000), ENFORCE)
    assert one.v4 == thousand.v4
    assert one.v6 == thousand.v6
    assert [(s.name, len(s.members)) for s in one.ipsets] == [("bh4-peers", 2), ("bh6-peers", 2)]
    assert [(s.name, len(s.members)) for s in thousand.ipsets] == [
        ("bh4-peers", 2000),
        ("bh6-peers", 2000),
    ]


def test_ipset_holds_hosts_as_host_networks_and_networks_collapsed() -> None:
    ruleset = pb.Ruleset(
        sets=[
            pb.AddressSet(
                name="s",
                hosts=["198.18.0.9", "2001:db8::9", "198.18.0.9"],
                networks=["198.19.0.0/16", "198.19.3.0/24", "198.18.0.9/32", "2001:db8:1::/48"],
            )
        ]
    )
    v4, v6 = render_iptables(ruleset, ENFORCE).ipsets
    assert (v4.name, v4.family, v4.members) == ("bh4-s", 4, ("198.18.0.9/32", "198.19.0.0/16"))
    assert (v6.name, v6.family, v6.members) == ("bh6-s", 6, ("2001:db8::9/128", "2001:db8:1::/48"))


def test_whole_address_space_is_stored_as_two_halves() -> None:
    ruleset = pb.Ruleset(sets=[pb.AddressSet(name="world", networks=["0.0.0.0/0", "::/0"])])
    v4, v6 = render_iptables(ruleset, ENFORCE).ipsets
    assert v4.members == ("0.0.0.0/1", "128.0.0.0/1")
    assert v6.members == ("::/1", "8000::/1")


def test_every_group_gets_a_set_per_family_even_empty() -> None:
    plan = render_iptables(pb.Ruleset(sets=[pb.AddressSet(name="nobody")]), ENFORCE)
    assert [(s.name, s.family, s.members) for s in plan.ipsets] == [
        ("bh4-nobody", 4, ()),
        ("bh6-nobody", 6, ()),
    ]


def test_long_group_names_fit_ipset_with_the_temporary_suffix() -> None:
    long_a, long_b = "a" * 31, "a" * 30 + "b"
    names = {ipset_name(group, family) for group in (long_a, long_b) for family in (4, 6)}
    assert len(names) == 4
    for name in names:
        assert len(name + "-new") <= IPSET_NAME_MAX
        assert re.fullmatch(r"bh[46]-a{14}-[0-9a-f]{8}", name)
    assert ipset_name("a" * 23, 4) == "bh4-" + "a" * 23  # the longest plain name


def _rule(**fields: Any) -> pb.Rule:
    base: dict[str, Any] = {
        "direction": pb.DIRECTION_INGRESS,
        "protocol": pb.PROTOCOL_TCP,
        "peer_set": "s",
        "action": pb.ACTION_ALLOW,
        "policy": "p",
        "id": "r1",
    }
    return pb.Rule(**(base | fields))


def test_more_than_fifteen_ports_are_split_across_multiport_rules() -> None:
    ports = [pb.PortRange(first=1000 + 10 * i, last=1000 + 10 * i) for i in range(14)]
    ports += [pb.PortRange(first=2000, last=2005), pb.PortRange(first=3000, last=3000)]
    ruleset = pb.Ruleset(sets=[pb.AddressSet(name="s")], rules=[_rule(ports=ports)])
    policy = [r for r in render_iptables(ruleset, ENFORCE).v4.filter if "--dports" in r]
    lists = [words(r)[words(r).index("--dports") + 1] for r in policy]
    assert lists == [",".join(str(1000 + 10 * i) for i in range(14)), "2000:2005,3000"]
    assert {comment(r) for r in policy} == {"r1 p"}


@pytest.mark.parametrize(
    ("protocol", "v4_words", "v6_words"),
    [
        (pb.PROTOCOL_ANY, [], []),
        (pb.PROTOCOL_TCP, ["-p", "tcp"], ["-p", "tcp"]),
        (pb.PROTOCOL_UDP, ["-p", "udp"], ["-p", "udp"]),
        (pb.PROTOCOL_ICMP, ["-p", "icmp"], ["-p", "ipv6-icmp"]),
    ],
)
def test_protocol_without_ports(protocol: int, v4_words: list[str], v6_words: list[str]) -> None:
    ruleset = pb.Ruleset(
        sets=[pb.AddressSet(name="s")],
        rules=[_rule(protocol=protocol, direction=pb.DIRECTION_EGRESS)],
    )
    plan = render_iptables(ruleset, ENFORCE)
    for rules, expected, family in ((plan.v4.filter, v4_words, 4), (plan.v6.filter, v6_words, 6)):
        (rule,) = [r for r in rules if "--match-set" in r]
        assert words(rule) == [
            "-A",
            "BULKHEAD-OUTPUT",
            *expected,
            "-m",
            "set",
            "--match-set",
            f"bh{family}-s",
            "dst",
            "-m",
            "comment",
            "--comment",
            "r1 p",
            "-j",
            "RETURN",
        ]


@pytest.mark.parametrize(
    ("value", "saved"),
    [
        ("default-deny", "default-deny"),
        ("controller_1", "controller_1"),
        ("r-1 web", '"r-1 web"'),
        ("", '""'),
        ("a\"b\\c'd", '"a\\"b\\\\c\\\'d"'),
        ("é", '"é"'),
    ],
)
def test_save_string_quotes_like_iptables_save(value: str, saved: str) -> None:
    assert save_string(value) == saved


def test_comment_is_cut_to_255_bytes_on_a_character_boundary_and_kept_on_one_line() -> None:
    ruleset = pb.Ruleset(
        sets=[pb.AddressSet(name="s")], rules=[_rule(policy="é\n" * 100 + "x", id="r-1")]
    )
    (rule,) = [r for r in render_iptables(ruleset, ENFORCE).v4.filter if "r-1" in r]
    text = comment(rule)
    assert text is not None
    assert text.startswith("r-1 é é ")
    assert "\n" not in rule
    assert 254 <= len(text.encode()) <= 255


def test_visibility_mode_applies_to_every_deny_rule() -> None:
    ruleset = pb.Ruleset(
        sets=[pb.AddressSet(name="s")],
        rules=[_rule(action=pb.ACTION_DENY), _rule(action=pb.ACTION_DENY, id="r2")],
    )
    plan = render_iptables(ruleset, VISIBILITY)
    denies = [r for r in plan.v4.filter if "--match-set" in r]
    assert [comment(r) for r in denies] == ["would-deny r1 p", "would-deny r2 p"]
    assert {target(r) for r in denies} == {"RETURN"}


@pytest.mark.parametrize(
    ("ruleset", "message"),
    [
        (pb.Ruleset(sets=[pb.AddressSet(name="Web")]), "sets[0].name"),
        (pb.Ruleset(sets=[pb.AddressSet(name="s", hosts=["198.18.0.0/24"])]), "sets[0].hosts[0]"),
        (pb.Ruleset(sets=[pb.AddressSet(name="s")], rules=[_rule(peer_set="x")]), "peer_set"),
        (
            pb.Ruleset(
                sets=[pb.AddressSet(name="s")],
                rules=[_rule(), _rule(ports=[pb.PortRange(first=90, last=80)])],
            ),
            "rules[1].ports[0]",
        ),
    ],
)
def test_bad_rulesets_are_refused_naming_the_field(ruleset: pb.Ruleset, message: str) -> None:
    with pytest.raises(RulesetError, match=re.escape(message)):
        render_iptables(ruleset, ENFORCE)


def test_allowed_packets_return_to_the_hosts_own_rules() -> None:
    # Bulkhead only narrows: nothing in our chains may ACCEPT past the host's own rules.
    from agent.dataplane.baseline import Baseline, Mode
    from agent.dataplane.iptables.render import render_iptables
    from bulkhead.v1 import ruleset_pb2

    ruleset = ruleset_pb2.Ruleset(
        sets=[ruleset_pb2.AddressSet(name="p_web", hosts=["198.18.0.10", "2001:db8::10"])],
        rules=[
            ruleset_pb2.Rule(
                direction=ruleset_pb2.DIRECTION_INGRESS, protocol=ruleset_pb2.PROTOCOL_TCP,
                ports=[ruleset_pb2.PortRange(first=5432, last=5432)], peer_set="p_web",
                action=ruleset_pb2.ACTION_ALLOW, policy="web-db", id="r1",
            )
        ],
    )  # fmt: skip
    plan = render_iptables(ruleset, Baseline(Mode.ENFORCE, (), (), ()))
    for family in (plan.v4, plan.v6):
        assert not [rule for rule in family.filter + family.security if "-j ACCEPT" in rule]
