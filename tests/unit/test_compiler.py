"""Compiling labelled workloads, IP lists and policies into per-agent rulesets."""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import Any

import pytest

from bulkhead.v1 import ruleset_pb2
from bulkhead.v1.contract import ruleset_hash
from controller.policy import Estate, Workload, compile_rulesets, referenced_iplists
from controller.policy.resources import IPList, Policy, parse_documents

INGRESS = ruleset_pb2.DIRECTION_INGRESS
EGRESS = ruleset_pb2.DIRECTION_EGRESS
TCP = ruleset_pb2.PROTOCOL_TCP
UDP = ruleset_pb2.PROTOCOL_UDP
ICMP = ruleset_pb2.PROTOCOL_ICMP
ANY = ruleset_pb2.PROTOCOL_ANY

WEB = Workload("web-1", {"app": "web", "env": "prod"}, ("198.18.0.10", "2001:db8::10"))
DB = Workload("db-1", {"app": "db", "env": "prod"}, ("198.18.0.20", "2001:db8::20"))
OTHER = Workload("other-1", {"app": "other"}, ("198.18.0.30",))


def rule(source: object, destination: object, *ports: str) -> dict[str, Any]:
    return {"from": source, "to": destination, "ports": list(ports)}


def policy(name: str, *rules: dict[str, Any]) -> Policy:
    document = {
        "apiVersion": "bulkhead/v1",
        "kind": "Policy",
        "metadata": {"name": name},
        "spec": {"rules": list(rules)},
    }
    (parsed,) = parse_documents([json.dumps(document)])
    assert isinstance(parsed, Policy)
    return parsed


def iplist(name: str, labels: dict[str, str], *cidrs: str) -> IPList:
    document = {
        "apiVersion": "bulkhead/v1",
        "kind": "IPList",
        "metadata": {"name": name, "labels": labels},
        "spec": {"cidrs": list(cidrs)},
    }
    (parsed,) = parse_documents([json.dumps(document)])
    assert isinstance(parsed, IPList)
    return parsed


OFFICE = iplist("office", {"zone": "office"}, "203.0.113.0/24", "2001:db8:ff::/48", "192.0.2.7/32")
WEB_TO_DB = policy("web-db", rule({"app": "web"}, {"app": "db"}, "tcp/5432"))


def peer_set(ruleset: ruleset_pb2.Ruleset, rule: ruleset_pb2.Rule) -> ruleset_pb2.AddressSet:
    (found,) = [s for s in ruleset.sets if s.name == rule.peer_set]
    return found


def summary(ruleset: ruleset_pb2.Ruleset) -> list[tuple[Any, ...]]:
    """Each rule as (direction, protocol, ports, peer hosts, peer networks, policy)."""
    return [
        (
            r.direction,
            r.protocol,
            [(p.first, p.last) for p in r.ports],
            list(peer_set(ruleset, r).hosts),
            list(peer_set(ruleset, r).networks),
            r.policy,
        )
        for r in ruleset.rules
    ]


def test_rule_is_compiled_into_both_ends_and_nothing_else() -> None:
    rulesets = compile_rulesets([WEB, DB, OTHER], [], [WEB_TO_DB])
    assert summary(rulesets["db-1"]) == [
        (INGRESS, TCP, [(5432, 5432)], ["198.18.0.10", "2001:db8::10"], [], "web-db")
    ]
    assert summary(rulesets["web-1"]) == [
        (EGRESS, TCP, [(5432, 5432)], ["198.18.0.20", "2001:db8::20"], [], "web-db")
    ]
    assert rulesets["other-1"] == ruleset_pb2.Ruleset()
    assert all(r.action == ruleset_pb2.ACTION_ALLOW for rs in rulesets.values() for r in rs.rules)


def test_every_workload_gets_a_ruleset_even_without_policies() -> None:
    rulesets = compile_rulesets([WEB, OTHER], [OFFICE], [])
    assert rulesets == {"other-1": ruleset_pb2.Ruleset(), "web-1": ruleset_pb2.Ruleset()}


def test_cidr_peer_programs_only_the_managed_side() -> None:
    outbound = policy("web-out", rule({"app": "web"}, {"cidr": "198.18.50.0/24"}, "tcp/443"))
    inbound = policy("to-db", rule({"cidr": "2001:db8:5::/64"}, {"app": "db"}, "tcp/5432"))
    rulesets = compile_rulesets([WEB, DB], [], [outbound, inbound])
    assert summary(rulesets["web-1"]) == [
        (EGRESS, TCP, [(443, 443)], [], ["198.18.50.0/24"], "web-out")
    ]
    assert summary(rulesets["db-1"]) == [
        (INGRESS, TCP, [(5432, 5432)], [], ["2001:db8:5::/64"], "to-db")
    ]


def test_single_address_cidrs_are_hosts() -> None:
    hosts = policy(
        "hosts",
        rule({"app": "web"}, [{"cidr": "198.18.9.9/32"}, {"cidr": "2001:db8::9/128"}], "udp/53"),
    )
    ruleset = compile_rulesets([WEB], [], [hosts])["web-1"]
    assert summary(ruleset) == [
        (EGRESS, UDP, [(53, 53)], ["198.18.9.9", "2001:db8::9"], [], "hosts")
    ]


def test_iplist_by_name_and_by_label() -> None:
    by_name = policy("by-name", rule({"iplist": "office"}, {"app": "web"}, "tcp/22"))
    by_label = policy("by-label", rule({"app": "db"}, {"zone": "office"}, "tcp/443"))
    by_selector = policy("by-selector", rule({"app": "db"}, {"selector": "has(zone)"}, "tcp/80"))
    rulesets = compile_rulesets([WEB, DB], [OFFICE], [by_name, by_label, by_selector])
    office = (["192.0.2.7"], ["203.0.113.0/24", "2001:db8:ff::/48"])
    assert summary(rulesets["web-1"]) == [(INGRESS, TCP, [(22, 22)], *office, "by-name")]
    assert summary(rulesets["db-1"]) == [
        (EGRESS, TCP, [(443, 443)], *office, "by-label"),
        (EGRESS, TCP, [(80, 80)], *office, "by-selector"),
    ]


def test_label_peer_matches_workloads_and_iplists_together() -> None:
    office_host = Workload("desk-1", {"zone": "office"}, ("198.18.7.1",))
    to_db = policy("office-db", rule({"zone": "office"}, {"app": "db"}, "tcp/5432"))
    rulesets = compile_rulesets([office_host, DB], [OFFICE], [to_db])
    assert summary(rulesets["db-1"]) == [
        (
            INGRESS,
            TCP,
            [(5432, 5432)],
            ["192.0.2.7", "198.18.7.1"],
            ["203.0.113.0/24", "2001:db8:ff::/48"],
            "office-db",
        )
    ]
    assert [r.direction for r in rulesets["desk-1"].rules] == [EGRESS]


def test_unknown_iplist_compiles_to_an_empty_peer() -> None:
    missing = policy("missing", rule({"iplist": "nowhere"}, {"app": "db"}, "tcp/5432"))
    assert referenced_iplists(missing) == {"nowhere"}
    ruleset = compile_rulesets([DB], [OFFICE], [missing])["db-1"]
    assert summary(ruleset) == [(INGRESS, TCP, [(5432, 5432)], [], [], "missing")]


def test_referenced_iplists_collects_both_sides() -> None:
    both = policy(
        "both",
        rule({"iplist": "a"}, {"app": "db"}, "tcp/1"),
        rule({"app": "web"}, [{"iplist": "b"}, {"zone": "c"}], "tcp/2"),
    )
    assert referenced_iplists(both) == {"a", "b"}


def test_ports_are_grouped_per_protocol_and_merged() -> None:
    ports = ("tcp/5432", "udp/53", "tcp/8000-8100", "tcp/8050-8200", "tcp/5433", "icmp", "udp/53")
    grouped = policy("grouped", rule({"app": "web"}, {"app": "db"}, *ports))
    ruleset = compile_rulesets([WEB, DB], [], [grouped])["db-1"]
    assert [(r.protocol, [(p.first, p.last) for p in r.ports]) for r in ruleset.rules] == [
        (TCP, [(5432, 5433), (8000, 8200)]),
        (UDP, [(53, 53)]),
        (ICMP, []),
    ]


def test_any_port_covers_every_protocol() -> None:
    anything = policy("anything", rule({"app": "web"}, {"app": "db"}, "tcp/80", "any", "icmp"))
    ruleset = compile_rulesets([WEB, DB], [], [anything])["db-1"]
    assert [(r.protocol, list(r.ports)) for r in ruleset.rules] == [(ANY, [])]


def test_same_peer_spec_shares_one_set() -> None:
    first = policy(
        "a-first",
        rule({"app": "web"}, {"app": "db"}, "tcp/5432"),
        rule({"app": "web"}, [{"app": "db"}, {"app": "db"}], "udp/53"),
    )
    second = policy("b-second", rule({"app": "web"}, {"app": "db"}, "tcp/6432"))
    rulesets = compile_rulesets([WEB, DB], [], [first, second])
    web = rulesets["web-1"]
    assert len(web.rules) == 3
    assert len(web.sets) == 1
    assert {r.peer_set for r in web.rules} == {web.sets[0].name}
    db_set_names = {r.peer_set for r in rulesets["db-1"].rules}
    assert len(db_set_names) == 1
    assert db_set_names != {web.sets[0].name}
    assert all(s.name.startswith("p_") and len(s.name) == 14 for s in web.sets)


def test_peer_list_order_does_not_change_the_set() -> None:
    one = policy("one", rule({"app": "web"}, [{"app": "db"}, {"cidr": "198.18.5.0/24"}], "tcp/1"))
    two = policy("one", rule({"app": "web"}, [{"cidr": "198.18.5.0/24"}, {"app": "db"}], "tcp/1"))
    assert compile_rulesets([WEB, DB], [], [one]) == compile_rulesets([WEB, DB], [], [two])


def test_only_sets_the_agent_references_are_included() -> None:
    two_sides = policy(
        "two-sides",
        rule({"app": "web"}, {"app": "db"}, "tcp/5432"),
        rule({"app": "other"}, {"cidr": "198.18.99.0/24"}, "tcp/80"),
    )
    rulesets = compile_rulesets([WEB, DB, OTHER], [], [two_sides])
    for ruleset in rulesets.values():
        assert {s.name for s in ruleset.sets} == {r.peer_set for r in ruleset.rules}


def test_relabel_and_readdress_change_set_contents_not_rules() -> None:
    before = compile_rulesets([WEB, DB, OTHER], [], [WEB_TO_DB])
    relabelled = Workload("other-1", {"app": "web"}, ("198.18.0.30",))
    readdressed = Workload("web-1", dict(WEB.labels), ("198.18.0.11",))
    after = compile_rulesets([readdressed, DB, relabelled], [], [WEB_TO_DB])
    assert list(after["db-1"].rules) == list(before["db-1"].rules)
    assert [s.name for s in after["db-1"].sets] == [s.name for s in before["db-1"].sets]
    assert list(after["db-1"].sets[0].hosts) == ["198.18.0.11", "198.18.0.30"]
    assert list(after["other-1"].rules) == list(before["web-1"].rules)


def test_rules_are_ordered_by_policy_rule_direction_protocol() -> None:
    late = policy("zz-late", rule({"app": "web"}, {"app": "web"}, "udp/53", "tcp/80"))
    early = policy(
        "aa-early",
        rule({"app": "web"}, {"app": "db"}, "tcp/1"),
        rule({"app": "db"}, {"app": "web"}, "tcp/2"),
    )
    ruleset = compile_rulesets([WEB, DB], [], [late, early])["web-1"]
    assert [(r.policy, r.direction, r.protocol) for r in ruleset.rules] == [
        ("aa-early", EGRESS, TCP),
        ("aa-early", INGRESS, TCP),
        ("zz-late", INGRESS, TCP),
        ("zz-late", INGRESS, UDP),
        ("zz-late", EGRESS, TCP),
        ("zz-late", EGRESS, UDP),
    ]


def test_rule_ids_hash_the_content_and_are_unique_per_ruleset() -> None:
    repeated = policy(
        "repeated",
        rule({"app": "web"}, {"app": "db"}, "tcp/5432"),
        rule({"app": "web"}, {"app": "db"}, "tcp/5432"),
    )
    copy = policy("copy", rule({"app": "web"}, {"app": "db"}, "tcp/5432"))
    web = compile_rulesets([WEB, DB], [], [repeated, copy])["web-1"]
    assert [r.policy for r in web.rules] == ["copy", "repeated"]
    assert len({r.id for r in web.rules}) == 2
    alone = compile_rulesets([WEB, DB], [], [copy])["web-1"]
    assert alone.rules[0].id == web.rules[0].id


def test_same_input_in_any_order_gives_the_same_hashes() -> None:
    policies = [
        WEB_TO_DB,
        policy("office-in", rule({"zone": "office"}, {"selector": "env == 'prod'"}, "tcp/22")),
        policy(
            "egress", rule({"app": "web"}, [{"cidr": "198.18.64.0/18"}, {"app": "other"}], "any")
        ),
    ]
    workloads = [WEB, DB, OTHER, Workload("desk-1", {"zone": "office"}, ("2001:db8::77",))]
    iplists = [OFFICE, iplist("vpn", {"zone": "office"}, "198.51.100.0/24")]

    def hashes(seed: int | None) -> dict[str, str]:
        shuffle = random.Random(seed).shuffle if seed is not None else (lambda _: None)
        w, i, p = list(workloads), list(iplists), list(policies)
        for items in (w, i, p):
            shuffle(items)
        return {k: ruleset_hash(v) for k, v in compile_rulesets(w, i, p).items()}

    expected = hashes(None)
    assert hashes(None) == expected
    for seed in range(5):
        assert hashes(seed) == expected
    assert len(set(expected.values())) == len(expected)  # the inputs do differ per agent


def test_ruleset_hash_is_built_from_parts_as_protocol_md_says() -> None:
    ruleset = compile_rulesets([WEB, DB], [], [WEB_TO_DB])["db-1"]
    skeleton = ruleset_pb2.Ruleset()
    skeleton.CopyFrom(ruleset)
    for address_set in skeleton.sets:
        del address_set.hosts[:]
        del address_set.networks[:]
    bare = skeleton.SerializeToString(deterministic=True)
    digest = hashlib.sha256(b"bulkhead.v1 ruleset\0" + len(bare).to_bytes(8, "big") + bare)
    for address_set in ruleset.sets:
        digest.update(hashlib.sha256(address_set.SerializeToString(deterministic=True)).digest())
    assert ruleset_hash(ruleset) == digest.hexdigest()
    assert Estate([WEB, DB], [], [WEB_TO_DB]).hash("db-1") == digest.hexdigest()


def test_bad_workload_address_is_refused_by_name() -> None:
    message = "'198.18.0.300' is not an IPv4 or IPv6 host address"
    with pytest.raises(ValueError, match=re.escape(message)):
        Workload("bad", {}, ("198.18.0.300",))


def test_duplicate_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="workload 'web-1' is given twice"):
        compile_rulesets([WEB, WEB], [], [])
    with pytest.raises(ValueError, match="policy 'web-db' is given twice"):
        compile_rulesets([WEB], [], [WEB_TO_DB, WEB_TO_DB])
