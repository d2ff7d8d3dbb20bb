"""Policy and IPList documents: validation errors for operators, canonical JSON."""

from __future__ import annotations

import copy
import json
from ipaddress import ip_network
from typing import Any

import pytest

from controller.policy.errors import FieldError, ValidationFailed
from controller.policy.peers import CidrPeer, IPListPeer, LabelsPeer, SelectorPeer
from controller.policy.ports import PortProtocol, PortSpec
from controller.policy.resources import (
    MAX_DOCUMENT_DEPTH,
    IPList,
    Policy,
    parse_documents,
    resource_to_json,
)


def policy(name: str = "web-db", /, **rule: Any) -> dict[str, Any]:
    body = {"from": {"app": "web"}, "to": {"app": "db"}, "ports": ["tcp/5432"]}
    body.update(rule)
    return {
        "apiVersion": "bulkhead/v1",
        "kind": "Policy",
        "metadata": {"name": name},
        "spec": {"rules": [body]},
    }


def iplist(name: str = "office", *cidrs: str) -> dict[str, Any]:
    return {
        "apiVersion": "bulkhead/v1",
        "kind": "IPList",
        "metadata": {"name": name, "labels": {"zone": "office"}},
        "spec": {"cidrs": list(cidrs) or ["203.0.113.0/24"]},
    }


def errors_of(*documents: object) -> list[FieldError]:
    texts = [d if isinstance(d, str) else json.dumps(d) for d in documents]
    with pytest.raises(ValidationFailed) as caught:
        parse_documents(texts)
    return caught.value.errors


def only_error(document: object) -> str:
    (error,) = errors_of(document)
    return str(error)


def test_valid_policy_parses_into_typed_peers_and_ports() -> None:
    document = policy(
        to=[{"app": "db", "env": "prod"}, {"cidr": "198.18.5.0/24"}, {"iplist": "office"}],
        ports=["tcp/6379", "udp/53", "tcp/8000-8100", "icmp", "any"],
    )
    document["spec"]["rules"][0]["from"] = {"selector": "app == 'api' && !quarantine"}
    (parsed,) = parse_documents([json.dumps(document)])
    assert isinstance(parsed, Policy)
    rule = parsed.spec.rules[0]
    (source,) = rule.from_
    assert isinstance(source, SelectorPeer)
    assert source.selector.matches({"app": "api"})
    assert rule.to == (
        LabelsPeer((("app", "db"), ("env", "prod"))),
        CidrPeer(ip_network("198.18.5.0/24")),
        IPListPeer("office"),
    )
    assert rule.ports == (
        PortSpec(PortProtocol.TCP, 6379, 6379),
        PortSpec(PortProtocol.UDP, 53, 53),
        PortSpec(PortProtocol.TCP, 8000, 8100),
        PortSpec(PortProtocol.ICMP),
        PortSpec(PortProtocol.ANY),
    )


def test_valid_iplist_keeps_labels_and_canonical_networks() -> None:
    (parsed,) = parse_documents([json.dumps(iplist("office", "2001:DB8::/48", "203.0.113.0/24"))])
    assert isinstance(parsed, IPList)
    assert parsed.metadata.labels == {"zone": "office"}
    assert [str(n) for n in parsed.spec.cidrs] == ["203.0.113.0/24", "2001:db8::/48"]


def test_canonical_json_uses_document_field_names_and_parses_back() -> None:
    document = policy(ports=["tcp/80"])
    (parsed,) = parse_documents([json.dumps(document)])
    text = resource_to_json(parsed)
    assert text == (
        '{"apiVersion":"bulkhead/v1","kind":"Policy","metadata":{"name":"web-db"},'
        '"spec":{"rules":[{"from":[{"app":"web"}],"ports":["tcp/80"],"to":[{"app":"db"}]}]}}'
    )
    assert parse_documents([text]) == [parsed]


def test_canonical_json_is_the_same_for_equivalent_documents() -> None:
    one = policy(to=[{"selector": "b && a"}])
    other = policy(to={"selector": "a&&b"})
    texts = [resource_to_json(r) for r in parse_documents([json.dumps(one)])]
    assert texts == [resource_to_json(r) for r in parse_documents([json.dumps(other)])]


def test_bad_port_names_the_port_and_the_range() -> None:
    assert only_error(policy(ports=["tcp/80", "tcp/99999"])) == (
        "document 1 (Policy web-db): spec.rules[0].ports[1]: 'tcp/99999': port must be 1-65535"
    )


@pytest.mark.parametrize(
    ("port", "message"),
    [
        ("tcp/0", "'tcp/0': port must be 1-65535"),
        ("tcp/90-80", "'tcp/90-80': range start 90 is above its end 80"),
        ("udp/1-70000", "'udp/1-70000': port must be 1-65535"),
        ("http", "'http': expected tcp/N, udp/N, tcp/N-M, udp/N-M, icmp or any"),
        ("TCP/80", "'TCP/80': expected tcp/N"),
        (443, "expected a port like 'tcp/443' as a string, got 443"),
    ],
)
def test_port_errors(port: object, message: str) -> None:
    error = only_error(policy(ports=[port]))
    assert error.startswith(f"document 1 (Policy web-db): spec.rules[0].ports[0]: {message}")


def test_bad_cidr_in_iplist() -> None:
    assert only_error(iplist("office", "10.0.0.300/24")) == (
        "document 1 (IPList office): spec.cidrs[0]: "
        "'10.0.0.300/24' is not a valid IPv4 or IPv6 network"
    )


def test_cidr_with_host_bits_says_so_and_names_the_network() -> None:
    error = only_error(policy(to={"cidr": "198.18.5.1/24"}))
    assert error == (
        "document 1 (Policy web-db): spec.rules[0].to.cidr: "
        "'198.18.5.1/24' has host bits set; the network is '198.18.5.0/24'"
    )


def test_unknown_fields_are_reported_at_every_level() -> None:
    document = policy(protocol="tcp")
    document["metadata"]["namespace"] = "x"
    document["extra"] = 1
    assert {(e.path, e.message) for e in errors_of(document)} == {
        ("extra", "unknown field"),
        ("metadata.namespace", "unknown field"),
        ("spec.rules[0].protocol", "unknown field"),
    }


def test_bad_selector_reports_the_expression_and_column() -> None:
    error = only_error(policy(to=[{"app": "db"}, {"selector": "app == db"}]))
    assert error == (
        "document 1 (Policy web-db): spec.rules[0].to[1].selector: "
        "'app == db': expected a quoted value after '==' at column 8, found 'db'"
    )


def test_reserved_key_mixed_with_labels_points_at_the_label() -> None:
    error = only_error(policy(**{"from": {"cidr": "198.18.0.0/24", "foo": "bar"}}))
    assert error.startswith(
        "document 1 (Policy web-db): spec.rules[0].from.foo: "
        "labels cannot be combined with 'cidr' in one peer"
    )


def test_two_reserved_keys_in_one_peer() -> None:
    error = only_error(policy(to={"iplist": "office", "selector": "all()"}))
    assert "a peer takes only one of selector, iplist, cidr" in error


def test_empty_peer_and_empty_peer_list() -> None:
    errors = errors_of(policy(**{"from": {}, "to": []}))
    assert [(e.path, e.message) for e in errors] == [
        (
            "spec.rules[0].from",
            "empty peer: give labels to match, or one of selector, iplist, cidr",
        ),
        ("spec.rules[0].to", "must list at least one peer"),
    ]


@pytest.mark.parametrize(
    ("peer", "path", "message"),
    [
        ({"app": 5}, "from.app", "label value must be a string, got 5; quote it in YAML"),
        ({"app": True}, "from.app", "label value must be a string, got true; quote it in YAML"),
        ({"app": "a b"}, "from.app", "'a b': label values are up to 63 letters"),
        ({"-app": "x"}, 'from["-app"]', "'-app': label keys start with a letter or digit"),
        ({"iplist": "Office"}, "from.iplist", "'Office': names use lowercase letters"),
        (["web"], "from[0]", "expected a peer mapping like {app: web}"),
        ("web", "from", "expected a peer or a list of peers, got 'web'"),
    ],
)
def test_peer_label_errors(peer: object, path: str, message: str) -> None:
    (error,) = errors_of(policy(**{"from": peer}))
    assert error.path == f"spec.rules[0].{path}"
    assert error.message.startswith(message)


def test_metadata_label_keys_cannot_be_reserved_peer_keys() -> None:
    document = iplist()
    document["metadata"]["labels"] = {"cidr": "x"}
    (error,) = errors_of(document)
    assert error.path == "metadata.labels.cidr"
    assert "reserved" in error.message


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Web_DB", "'Web_DB': names use lowercase letters, digits and '-'"),
        ("-web", "'-web': names use lowercase letters"),
        ("a" * 64, "names are at most 63 characters"),
    ],
)
def test_bad_names(name: str, message: str) -> None:
    (error,) = errors_of(policy(name))
    assert error.path == "metadata.name"
    assert message in error.message


def test_wrong_api_version() -> None:
    document = policy()
    document["apiVersion"] = "bulkhead/v2"
    assert only_error(document) == (
        "document 1 (Policy web-db): apiVersion: 'bulkhead/v2': must be 'bulkhead/v1'"
    )


def test_unknown_and_missing_kind() -> None:
    unknown = policy()
    unknown["kind"] = "NetworkPolicy"
    missing = policy()
    del missing["kind"]
    assert [str(e) for e in errors_of(unknown, missing)] == [
        "document 1: kind: 'NetworkPolicy': unknown kind; expected Policy or IPList",
        "document 2: kind: required field is missing; expected Policy or IPList",
    ]


def test_empty_rules_and_ports_and_missing_fields() -> None:
    no_rules = policy()
    no_rules["spec"]["rules"] = []
    no_ports = policy(ports=[])
    no_to = policy()
    del no_to["spec"]["rules"][0]["to"]
    assert [(e.document, e.path, e.message) for e in errors_of(no_rules, no_ports, no_to)] == [
        (1, "spec.rules", "must list at least one rule"),
        (2, "spec.rules[0].ports", "must list at least one port"),
        (3, "spec.rules[0].to", "required field is missing"),
    ]


def test_wrong_shapes_are_named() -> None:
    document = policy(ports="tcp/80")
    document["metadata"]["labels"] = ["zone"]
    assert [(e.path, e.message) for e in errors_of(document)] == [
        ("metadata.labels", 'expected a mapping of labels, got ["zone"]'),
        ("spec.rules[0].ports", "expected a list, got 'tcp/80'"),
    ]


def test_not_json_or_not_a_mapping() -> None:
    assert [str(e) for e in errors_of("{oops", "[1, 2]")] == [
        "document 1: not valid JSON: Expecting property name enclosed in double quotes "
        "at line 1 column 2",
        "document 2: expected one resource as a mapping, got [1, 2]",
    ]


def test_duplicate_kind_and_name_in_one_batch() -> None:
    errors = errors_of(policy("a"), iplist("a"), policy("a"))
    assert [str(e) for e in errors] == [
        "document 3 (Policy a): metadata.name: Policy 'a' is already defined in document 1"
    ]


def test_every_error_of_every_document_is_reported_at_once() -> None:
    bad_port = policy("one", ports=["tcp/80", "tcp/99999", "udp/0"])
    bad_cidr = iplist("two", "10.0.0.300/24", "10.0.0.1/24")
    wrong_version = copy.deepcopy(bad_port)
    wrong_version["apiVersion"] = "v1"
    wrong_version["metadata"]["name"] = "three"
    failed = errors_of(bad_port, policy("fine"), bad_cidr, wrong_version)
    assert [(e.document, e.kind, e.name, e.path) for e in failed] == [
        (1, "Policy", "one", "spec.rules[0].ports[1]"),
        (1, "Policy", "one", "spec.rules[0].ports[2]"),
        (3, "IPList", "two", "spec.cidrs[0]"),
        (3, "IPList", "two", "spec.cidrs[1]"),
        (4, "Policy", "three", "apiVersion"),
        (4, "Policy", "three", "spec.rules[0].ports[1]"),
        (4, "Policy", "three", "spec.rules[0].ports[2]"),
    ]


def test_failure_text_is_one_line_per_error() -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_documents([json.dumps(policy(ports=["tcp/0", "udp/0"]))])
    assert str(caught.value).splitlines() == [str(e) for e in caught.value.errors]
    assert len(caught.value.errors) == 2


def test_a_document_nested_past_the_limit_is_refused_where_it_gets_too_deep() -> None:
    # Without the limit: RecursionError from the json module (about 1,000 levels).
    deep = "[" * 100_000 + "]" * 100_000
    (error,) = errors_of(policy(), deep)
    assert str(error) == (
        f"document 2: nested deeper than {MAX_DOCUMENT_DEPTH} levels of mappings and lists "
        f"at line 1 column {MAX_DOCUMENT_DEPTH + 1}"
    )


def test_depth_counts_lists_and_mappings_on_any_line() -> None:
    text = '{\n  "spec":' + '{"a": [' * 20 + "]}" * 20 + "}"
    (error,) = errors_of(text)
    # Level 1 opens line 1; level 33 is the '[' of the 16th '{"a": [' on line 2.
    assert str(error).endswith("levels of mappings and lists at line 2 column 121")


def test_brackets_inside_strings_do_not_count_towards_depth() -> None:
    document = policy()
    document["metadata"]["name"] = '[[{{"\\' * 40  # brackets, quotes, backslashes
    (error,) = errors_of(document)
    assert error.path == "metadata.name"  # validated as a name, not refused for depth


def test_a_document_at_the_depth_limit_is_parsed_and_validated() -> None:
    document = policy()
    value: object = "x"
    for _ in range(MAX_DOCUMENT_DEPTH - 3):  # the policy and its labels mapping hold it
        value = [value]
    document["metadata"]["labels"] = {"deep": value}
    (error,) = errors_of(document)
    assert error.path == "metadata.labels.deep"


def test_an_unterminated_string_of_escapes_is_scanned_once() -> None:
    # A backtracking scan of this 1 MiB document took minutes (80 kB: 17.8 s) and held
    # the controller's event loop; any operator, even a viewer's dry run, could send it.
    document = '"' + '\\"' * 500_000
    with pytest.raises(ValidationFailed, match="document 1"):
        parse_documents([document])
