"""Policies suggested from observed flows: grouping, merging, naming, and validity."""

from __future__ import annotations

import ipaddress
import json
import random
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.cli.documents import Source, load_documents
from controller.observe.model import Endpoint, FlowRow
from controller.observe.suggest import suggest_policies, to_yaml
from controller.policy.names import MAX_NAME_LENGTH, name_problem
from controller.policy.peers import CidrPeer, IPListPeer, Peer
from controller.policy.ports import PortProtocol, PortSpec
from controller.policy.resources import Policy, parse_documents, resource_to_json

WEB = {"app": "web", "role": "frontend", "env": "prod"}
API = {"app": "api", "role": "backend"}


def flow(
    source: Endpoint,
    destination: Endpoint,
    port: int,
    protocol: str = "tcp",
    *,
    verdict: str = "allowed",
) -> FlowRow:
    return FlowRow(source, destination, port, protocol, verdict, 1, 1000.0, 2000.0)


def validated(docs: list[dict[str, Any]]) -> list[Policy]:
    """The documents as the controller reads them; raises if any is invalid."""
    resources = parse_documents([json.dumps(doc) for doc in docs])
    assert all(isinstance(resource, Policy) for resource in resources)
    return [resource for resource in resources if isinstance(resource, Policy)]


def rules_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for doc in docs for rule in doc["spec"]["rules"]]


web1 = Endpoint("web-1", "198.18.0.11", WEB, "nginx")
web2 = Endpoint("web-2", "198.18.0.12", WEB, "nginx")
api1 = Endpoint("api-1", "198.18.0.21", API, "gunicorn")
db1 = Endpoint("db-1", "198.18.0.31", {"app": "db"}, "postgres")


def test_flows_between_groups_merge_into_one_rule_with_sorted_ports() -> None:
    rows = [
        flow(web1, api1, 8443),
        flow(web2, api1, 8000),
        flow(web1, api1, 8000),
        flow(web2, api1, 53, "udp"),
        flow(web1, api1, 0, "icmp"),
        flow(web1, api1, 8000, verdict="would-deny"),
    ]
    docs = suggest_policies(rows, ["app", "role"])
    assert docs == [
        {
            "apiVersion": "bulkhead/v1",
            "kind": "Policy",
            "metadata": {"name": "suggested-api-backend"},
            "spec": {
                "rules": [
                    {
                        "from": {"app": "web", "role": "frontend"},
                        "to": {"app": "api", "role": "backend"},
                        "ports": ["tcp/8000", "tcp/8443", "udp/53", "icmp"],
                    }
                ]
            },
        }
    ]
    validated(docs)


def test_one_policy_per_destination_group_with_one_rule_per_source_group() -> None:
    rows = [flow(web1, api1, 8000), flow(api1, db1, 5432), flow(web1, db1, 5432)]
    docs = suggest_policies(rows, ["app"])
    assert [doc["metadata"]["name"] for doc in docs] == ["suggested-api", "suggested-db"]
    db_rules = docs[1]["spec"]["rules"]
    assert [(rule["from"], rule["to"]) for rule in db_rules] == [
        ({"app": "api"}, {"app": "db"}),
        ({"app": "web"}, {"app": "db"}),
    ]
    validated(docs)


def test_an_end_with_only_some_keys_excludes_the_groups_that_have_the_others() -> None:
    docs = suggest_policies([flow(api1, db1, 5432)], ["app", "role"])
    (rule,) = rules_of(docs)
    assert rule["to"] == {"selector": "app == 'db' && !has(role)"}
    assert docs[0]["metadata"]["name"] == "suggested-db"
    (policy,) = validated(docs)
    (peer,) = policy.spec.rules[0].to
    assert matches(peer, db1)
    assert not matches(peer, Endpoint("db-2", "198.18.0.32", {"app": "db", "role": "replica"}))


def test_ends_without_any_key_are_named_by_their_addresses() -> None:
    stranger = Endpoint("", "203.0.113.9")
    bare4 = Endpoint("bare", "198.18.0.40")
    bare6 = Endpoint("bare", "2001:db8::40")
    rows = [
        flow(stranger, web1, 443),
        flow(bare4, api1, 8000),
        flow(bare6, api1, 8000),
        flow(web1, Endpoint("", "2001:db8:53::1"), 53, "udp"),
    ]
    docs = suggest_policies(rows, ["app"])
    by_name = {doc["metadata"]["name"]: doc["spec"]["rules"] for doc in docs}
    assert by_name["suggested-api"] == [
        {
            "from": [{"cidr": "198.18.0.40/32"}, {"cidr": "2001:db8::40/128"}],
            "to": {"app": "api"},
            "ports": ["tcp/8000"],
        }
    ]
    assert by_name["suggested-web"][0]["from"] == {"cidr": "203.0.113.9/32"}
    assert by_name["suggested-2001-db8-53-1"][0]["to"] == {"cidr": "2001:db8:53::1/128"}
    validated(docs)


def test_an_unknown_address_with_ip_list_labels_is_named_by_them() -> None:
    office = Endpoint("", "203.0.113.7", {"app": "office"})
    docs = suggest_policies([flow(office, web1, 443)], ["app"])
    assert rules_of(docs)[0]["from"] == {"app": "office"}


def test_denied_flows_suggest_nothing() -> None:
    assert suggest_policies([flow(web1, db1, 5432, verdict="denied")], ["app"]) == []
    rows = [flow(web1, db1, 5432, verdict="denied"), flow(web1, db1, 80)]
    assert rules_of(suggest_policies(rows, ["app"]))[0]["ports"] == ["tcp/80"]


def test_would_deny_flows_are_suggested() -> None:
    rows = [flow(web1, db1, 5432, verdict="would-deny")]
    assert rules_of(suggest_policies(rows, ["app"]))[0]["ports"] == ["tcp/5432"]


def test_flows_with_nothing_to_program_are_skipped() -> None:
    same = Endpoint("web-1", "198.18.0.99", WEB, "curl")
    rows = [
        flow(web1, same, 8080),  # one workload talking to itself
        flow(Endpoint("", "198.18.5.1"), Endpoint("", "198.18.5.2"), 80),  # no agent either side
    ]
    assert suggest_policies(rows, ["app"]) == []


def test_two_workloads_of_one_group_get_a_rule_within_it() -> None:
    docs = suggest_policies([flow(web1, web2, 7000)], ["app"])
    assert rules_of(docs) == [{"from": {"app": "web"}, "to": {"app": "web"}, "ports": ["tcp/7000"]}]


def test_a_label_value_a_peer_cannot_hold_falls_back_to_the_address() -> None:
    odd = Endpoint("odd", "198.18.0.50", {"app": "has space"})
    docs = suggest_policies([flow(odd, web1, 80)], ["app"])
    assert rules_of(docs)[0]["from"] == {"cidr": "198.18.0.50/32"}
    validated(docs)


def test_names_are_valid_capped_and_unique() -> None:
    long_value = "A" * 63
    ends = [
        Endpoint("w1", "198.18.0.1", {"app": "Web", "tier": "x"}),
        Endpoint("w2", "198.18.0.2", {"app": "web", "tier": "x"}),
        Endpoint("w3", "198.18.0.3", {"app": "web_", "tier": "x"}),
        Endpoint("w4", "198.18.0.4", {"app": long_value, "tier": long_value}),
        Endpoint("w5", "198.18.0.5", {"app": long_value, "tier": long_value.lower()}),
        Endpoint("w6", "198.18.0.6", {"app": "", "tier": "__"}),
        Endpoint("Ünï.Code", "198.18.0.7"),
    ]
    client = Endpoint("client", "198.18.1.1", {"app": "client"})
    docs = suggest_policies([flow(client, end, 80) for end in ends], ["app", "tier"])
    names = [doc["metadata"]["name"] for doc in docs]
    assert len(names) == len(set(names)) == len(ends)
    assert all(name_problem(name) is None for name in names), names
    assert {"suggested-web-x", "suggested-web-x-2", "suggested-web-x-3", "suggested"} < set(names)
    assert "suggested-n-code" in names
    capped = [name for name in names if len(name) == MAX_NAME_LENGTH]
    assert len(capped) == 2
    validated(docs)


def test_group_keys_are_checked() -> None:
    with pytest.raises(ValueError, match=r"group_by: 'has space': label keys start"):
        suggest_policies([], ["app", "has space"])
    with pytest.raises(ValueError, match=r"group_by: 'cidr' is reserved"):
        suggest_policies([], ["cidr"])
    with pytest.raises(ValueError, match=r"group_by: expected a list of label keys"):
        suggest_policies([], "app")


def test_repeated_group_keys_count_once() -> None:
    rows = [flow(web1, api1, 8000)]
    assert suggest_policies(rows, ["app", "app"]) == suggest_policies(rows, ["app"])


def test_suggestions_do_not_depend_on_row_order() -> None:
    rows = [
        flow(web1, api1, 8000),
        flow(web2, api1, 8001),
        flow(api1, db1, 5432),
        flow(Endpoint("bare", "2001:db8::40"), db1, 22),
        flow(Endpoint("bare", "198.18.0.40"), db1, 22),
        flow(Endpoint("", "203.0.113.9"), web1, 443),
    ]
    expected = suggest_policies(rows, ["app", "role"])
    for seed in range(5):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        assert suggest_policies(shuffled, ["app", "role"]) == expected


# --- YAML -------------------------------------------------------------------------------


def test_yaml_is_what_apply_reads() -> None:
    rows = [
        flow(web1, api1, 8000),
        flow(Endpoint("bare", "2001:db8::40"), api1, 0, "icmp"),
        flow(api1, db1, 5432),
        flow(Endpoint("yes", "198.18.0.60", {"app": "yes", "role": "on"}), db1, 5432),
    ]
    docs = suggest_policies(rows, ["app", "role"])
    text = to_yaml(docs)
    assert text.startswith("---\napiVersion: bulkhead/v1\nkind: Policy\nmetadata:")
    assert text.count("---\n") == len(docs)
    assert "&id" not in text  # no anchors, although from/to peers repeat
    applied = parse_documents(load_documents([Source("suggested.yaml", text)]))
    assert [resource_to_json(r) for r in applied] == [resource_to_json(r) for r in validated(docs)]


def test_yaml_puts_the_top_level_keys_in_document_order() -> None:
    doc = {"spec": {"rules": []}, "zzz": 1, "metadata": {"name": "x"}, "kind": "Policy"}
    doc["apiVersion"] = "bulkhead/v1"
    keys = [line.split(":")[0] for line in to_yaml([doc]).splitlines() if line[:1].isalpha()]
    assert keys == ["apiVersion", "kind", "metadata", "spec", "zzz"]
    assert to_yaml([]) == ""


# --- properties -------------------------------------------------------------------------

KEYS = ["app", "role", "in", "has"]
LABEL_VALUES = st.sampled_from(["web", "db", "", "Web", "x" * 63, "a.b_c-d"]) | st.text(max_size=4)
LABELS = st.dictionaries(st.sampled_from([*KEYS, "other", "bad key"]), LABEL_VALUES, max_size=3)
WORKLOADS = ["web-1", "web-2", "db-1", 'we"ird\n']
UNKNOWN = ["198.18.9.1", "2001:db8:9::1", "203.0.113.5"]


def addresses_of(index: int) -> list[str]:
    return [f"198.18.0.{10 + index}", f"2001:db8::{10 + index}"]


@st.composite
def worlds(draw: st.DrawFn) -> list[FlowRow]:
    """Flow rows over a fixed set of workloads and unknown addresses, labels fixed per end."""
    ends: list[st.SearchStrategy[Endpoint]] = []
    for index, workload in enumerate(WORKLOADS):
        labels = draw(LABELS)
        ends.append(
            st.builds(
                Endpoint,
                st.just(workload),
                st.sampled_from(addresses_of(index)),
                st.just(labels),
                st.sampled_from(["", "nginx", "p\"s'q"]),
            )
        )
    for address in UNKNOWN:
        ends.append(st.just(Endpoint("", address, draw(LABELS))))
    endpoint = st.one_of(ends)
    service = st.sampled_from([("tcp", 80), ("tcp", 5432), ("udp", 53), ("icmp", 0)])
    row = st.builds(
        lambda source, destination, proto_port, verdict, count: FlowRow(
            source, destination, proto_port[1], proto_port[0], verdict, count, 1.0, 2.0
        ),
        endpoint,
        endpoint,
        service,
        st.sampled_from(["allowed", "denied", "would-deny"]),
        st.integers(min_value=0, max_value=5),
    )
    return draw(st.lists(row, max_size=14))


def matches(peer: Peer, end: Endpoint) -> bool:
    if isinstance(peer, CidrPeer):
        return ipaddress.ip_address(end.address) in peer.network
    assert not isinstance(peer, IPListPeer)
    return peer.selector.matches(end.labels)


def port_matches(spec: PortSpec, row: FlowRow) -> bool:
    if spec.protocol in (PortProtocol.ICMP, PortProtocol.ANY):
        return spec.protocol == PortProtocol.ANY or row.protocol == "icmp"
    return spec.protocol.value == row.protocol and spec.first <= row.port <= spec.last


def covered(policies: list[Policy], row: FlowRow) -> bool:
    return any(
        any(matches(peer, row.source) for peer in rule.from_)
        and any(matches(peer, row.destination) for peer in rule.to)
        and any(port_matches(port, row) for port in rule.ports)
        for policy in policies
        for rule in policy.spec.rules
    )


def projection(end: Endpoint, keys: list[str]) -> tuple[tuple[str, str], ...]:
    return tuple((key, end.labels[key]) for key in keys if key in end.labels)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=worlds(), group_by=st.lists(st.sampled_from(KEYS), max_size=3))
def test_every_suggestion_validates_and_allows_exactly_what_was_seen(
    rows: list[FlowRow], group_by: list[str]
) -> None:
    docs = suggest_policies(rows, group_by)
    policies = validated(docs)  # every document valid, names unique within the batch
    if docs:  # `apply` refuses a file without documents, and so it should
        reread = parse_documents(load_documents([Source("s.yaml", to_yaml(docs))]))
        assert [resource_to_json(r) for r in reread] == [resource_to_json(p) for p in policies]
    assert all(re.fullmatch(r"suggested(-[a-z0-9-]*[a-z0-9])?", p.metadata.name) for p in policies)

    wanted = [
        row
        for row in rows
        if row.verdict != "denied"
        and (row.source.workload or row.destination.workload)
        and row.source.workload != row.destination.workload
    ]
    for row in wanted:
        assert covered(policies, row), row
    # Least privilege: a label or selector peer names one group, never its neighbours.
    ends = {end for row in rows for end in (row.source, row.destination)}
    for policy in policies:
        for rule in policy.spec.rules:
            for peer in (*rule.from_, *rule.to):
                if not isinstance(peer, CidrPeer):
                    named = {projection(end, group_by) for end in ends if matches(peer, end)}
                    assert len(named) <= 1, (peer, named)
    if not wanted:
        assert docs == []
