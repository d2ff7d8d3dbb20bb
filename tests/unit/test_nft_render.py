"""The nftables renderer: golden documents, shape, and refusal of bad rulesets."""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from agent.dataplane.backend import RulesetError
from agent.dataplane.baseline import Baseline, Mode, baseline_from_json, parse_port_spec
from agent.dataplane.nftables import render
from bulkhead.v1 import ruleset_pb2 as pb

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "nftables"
CASES = sorted(path.name.removesuffix(".input.json") for path in GOLDEN.glob("*.input.json"))
ENFORCE = Baseline(Mode.ENFORCE, failsafe_inbound=(parse_port_spec("tcp/22"),))


def load_case(name: str) -> tuple[pb.Ruleset, Baseline]:
    document = json.loads((GOLDEN / f"{name}.input.json").read_text())
    ruleset = json_format.ParseDict(document["ruleset"], pb.Ruleset())
    return ruleset, baseline_from_json(json.dumps(document["baseline"]))


def rules(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [c["add"]["rule"] for c in document["nftables"] if "rule" in c.get("add", {})]


def rule_text(rule: dict[str, Any]) -> str:
    return json.dumps(rule["expr"], sort_keys=True)


def test_there_are_golden_cases() -> None:
    assert {"empty_enforce", "web_db", "networks_ports", "visibility"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_render_matches_golden(case: str) -> None:
    ruleset, baseline = load_case(case)
    actual = json.dumps(render(ruleset, baseline), indent=2, sort_keys=True) + "\n"
    golden = GOLDEN / f"{case}.nft.json"
    if os.environ.get("BULKHEAD_UPDATE_GOLDEN") == "1":
        golden.write_text(actual)
    expected = golden.read_text() if golden.exists() else ""
    if actual != expected:
        diff = difflib.unified_diff(
            expected.splitlines(), actual.splitlines(), str(golden), "rendered", lineterm=""
        )
        pytest.fail(
            "rendered document differs from golden (BULKHEAD_UPDATE_GOLDEN=1 regenerates):\n"
            + "\n".join(diff)
        )


@pytest.mark.parametrize("case", CASES)
def test_only_our_table_is_touched(case: str) -> None:
    commands = render(*load_case(case))["nftables"]
    assert commands[0] == {"metainfo": {"json_schema_version": 1}}
    table = {"family": "inet", "name": "bulkhead"}
    assert commands[1:4] == [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
    ]
    for command in commands[4:]:
        ((verb, body),) = command.items()
        ((kind, spec),) = body.items()
        assert verb == "add"
        assert (spec["family"], spec["table"]) == ("inet", "bulkhead"), kind
    assert "flush" not in json.dumps(commands)


def test_visibility_never_drops() -> None:
    document = render(*load_case("visibility"))
    assert '"drop"' not in json.dumps(document)
    chains = [c["add"]["chain"] for c in document["nftables"] if "chain" in c.get("add", {})]
    assert {c["policy"] for c in chains if "hook" in c} == {"accept"}
    last_input = [r for r in rules(document) if r["chain"] == "input"][-1]
    assert last_input == {
        "family": "inet",
        "table": "bulkhead",
        "chain": "input",
        "comment": "would-deny",
        "expr": [{"counter": None}, {"log": {"group": 1001, "prefix": "bulkhead-would-deny"}}],
    }


def test_enforce_ends_each_base_chain_with_a_counted_logged_drop() -> None:
    document = render(*load_case("web_db"))
    log = {"log": {"group": 1001, "prefix": "bulkhead-deny"}}  # read by agent/observe
    for chain in ("input", "output"):
        last = [r for r in rules(document) if r["chain"] == chain][-1]
        assert last["expr"] == [{"counter": None}, log, {"drop": None}]
        assert last["comment"] == "default-deny"


def test_every_address_set_gets_four_sets_even_empty() -> None:
    ruleset = pb.Ruleset(sets=[pb.AddressSet(name="nobody")])
    document = render(ruleset, ENFORCE)
    sets = {c["add"]["set"]["name"]: c["add"]["set"] for c in document["nftables"][4:8]}
    assert set(sets) == {"nobody_v4", "nobody_v4net", "nobody_v6", "nobody_v6net"}
    assert all("elem" not in s for s in sets.values())
    assert sets["nobody_v4net"]["flags"] == ["interval"]
    assert "flags" not in sets["nobody_v4"]


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
    one = render(_peer_ruleset(1), ENFORCE)
    thousand = render(_peer_ruleset(1000), ENFORCE)
    assert [rule_text(r) for r in rules(one)] == [rule_text(r) for r in rules(thousand)]
    elements = [c["add"]["set"].get("elem", []) for c in thousand["nftables"][4:8]]
    assert [len(e) for e in elements] == [1000, 1000, 1000, 1000]


def test_rule_renders_once_per_family_and_address_kind() -> None:
    document = render(_peer_ruleset(3), ENFORCE)
    policy_in = [r for r in rules(document) if r["chain"] == "policy_in"]
    matched_sets = [r["expr"][0]["match"]["right"] for r in policy_in]
    assert matched_sets == ["@peers_v4", "@peers_v4net", "@peers_v6", "@peers_v6net"]
    assert {r["expr"][0]["match"]["left"]["payload"]["field"] for r in policy_in} == {"saddr"}
    policy_out = [r for r in rules(document) if r["chain"] == "policy_out"]
    assert {r["expr"][0]["match"]["left"]["payload"]["field"] for r in policy_out} == {"daddr"}


def test_overlapping_networks_are_collapsed_for_the_interval_set() -> None:
    ruleset = pb.Ruleset(
        sets=[pb.AddressSet(name="n", networks=["198.19.0.0/16", "198.19.3.0/24"])]
    )
    v4net = render(ruleset, ENFORCE)["nftables"][5]["add"]["set"]
    assert v4net["elem"] == [{"prefix": {"addr": "198.19.0.0", "len": 16}}]


def test_comment_is_cut_to_128_bytes_on_a_character_boundary() -> None:
    ruleset = pb.Ruleset(
        sets=[pb.AddressSet(name="s")],
        rules=[
            pb.Rule(
                direction=pb.DIRECTION_INGRESS,
                protocol=pb.PROTOCOL_ANY,
                peer_set="s",
                action=pb.ACTION_ALLOW,
                policy="é" * 100,
                id="r-1",
            )
        ],
    )
    comment = rules(render(ruleset, ENFORCE))[-1]["comment"]
    assert comment.startswith("r-1 éé")
    assert len(comment.encode()) <= 128
    assert len(comment.encode()) >= 127


def _rule(**fields: Any) -> pb.Rule:
    base: dict[str, Any] = {
        "direction": pb.DIRECTION_INGRESS,
        "protocol": pb.PROTOCOL_TCP,
        "peer_set": "s",
        "action": pb.ACTION_ALLOW,
    }
    return pb.Rule(**(base | fields))


@pytest.mark.parametrize(
    ("ruleset", "message"),
    [
        (pb.Ruleset(sets=[pb.AddressSet(name="Web")]), "sets[0].name"),
        (pb.Ruleset(sets=[pb.AddressSet(name="s"), pb.AddressSet(name="s")]), "sets[1].name"),
        (pb.Ruleset(sets=[pb.AddressSet(name="s", hosts=["198.18.0.0/24"])]), "sets[0].hosts[0]"),
        (pb.Ruleset(sets=[pb.AddressSet(name="s", networks=["198.18.0.1/24"])]), "networks[0]"),
        (pb.Ruleset(sets=[pb.AddressSet(name="s")], rules=[_rule(peer_set="x")]), "peer_set"),
        (pb.Ruleset(sets=[pb.AddressSet(name="s")], rules=[_rule(direction=0)]), "direction"),
        (pb.Ruleset(sets=[pb.AddressSet(name="s")], rules=[_rule(protocol=0)]), "protocol"),
        (pb.Ruleset(sets=[pb.AddressSet(name="s")], rules=[_rule(action=0)]), "rules[0].action"),
        (
            pb.Ruleset(
                sets=[pb.AddressSet(name="s")],
                rules=[_rule(), _rule(ports=[pb.PortRange(first=90, last=80)])],
            ),
            "rules[1].ports[0]",
        ),
        (
            pb.Ruleset(
                sets=[pb.AddressSet(name="s")],
                rules=[_rule(ports=[pb.PortRange(first=0, last=80)])],
            ),
            "rules[0].ports[0]",
        ),
        (
            pb.Ruleset(
                sets=[pb.AddressSet(name="s")],
                rules=[_rule(protocol=pb.PROTOCOL_ICMP, ports=[pb.PortRange(first=1, last=1)])],
            ),
            "rules[0].ports",
        ),
    ],
)
def test_bad_rulesets_are_refused_naming_the_field(ruleset: pb.Ruleset, message: str) -> None:
    with pytest.raises(RulesetError, match=re.escape(message)):
        render(ruleset, ENFORCE)
