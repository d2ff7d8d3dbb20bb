"""The `bulkhead` CLI end to end over real gRPC with mutual TLS, against a fake AdminService:
apply, get, describe, label and delete. The fake is in cli_support.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from bulkhead.v1 import admin_pb2, agent_pb2, ruleset_pb2
from tests.unit.cli_support import FakeAdmin, error_lines, run, serving_fake_admin

POLICY = {
    "apiVersion": "bulkhead/v1",
    "kind": "Policy",
    "metadata": {"name": "web-db"},
    "spec": {"rules": [{"from": {"app": "web"}, "to": {"app": "db"}, "ports": ["tcp/5432"]}]},
}
IPLIST = {
    "apiVersion": "bulkhead/v1",
    "kind": "IPList",
    "metadata": {"name": "office", "labels": {"zone": "office"}},
    "spec": {"cidrs": ["203.0.113.0/24", "2001:db8::/48"]},
}


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[FakeAdmin]:
    with serving_fake_admin(tmp_path) as fake:
        yield fake


def test_apply_sends_every_document_of_every_file_in_one_call(
    admin: FakeAdmin, tmp_path: Path
) -> None:
    first = tmp_path / "policies.yaml"
    first.write_text("---\n" + yaml.safe_dump(POLICY) + "---\n---\n")
    second = tmp_path / "office.yaml"
    second.write_text(yaml.safe_dump(IPLIST))
    admin.responses["Apply"] = admin_pb2.ApplyResponse(
        changes=[
            admin_pb2.ResourceChange(kind="Policy", name="web-db", action="created"),
            admin_pb2.ResourceChange(kind="IPList", name="office", action="unchanged"),
        ],
        revision=7,
    )

    result = run(admin.target, "apply", "-f", str(first), "-f", str(second))

    assert result.exit_code == 0, result.stderr
    request = admin.only_request("Apply")
    assert [json.loads(document) for document in request.documents] == [POLICY, IPLIST]
    assert not request.dry_run
    assert result.stdout.splitlines() == [
        "policy/web-db created",
        "iplist/office unchanged",
        "revision 7",
    ]


def test_apply_reads_stdin_and_passes_dry_run(admin: FakeAdmin) -> None:
    admin.responses["Apply"] = admin_pb2.ApplyResponse(
        changes=[admin_pb2.ResourceChange(kind="IPList", name="office", action="configured")],
        revision=3,
    )

    result = run(admin.target, "apply", "-f", "-", "--dry-run", stdin=yaml.safe_dump(IPLIST))

    assert result.exit_code == 0, result.stderr
    request = admin.only_request("Apply")
    assert request.dry_run
    assert [json.loads(document) for document in request.documents] == [IPLIST]
    assert "iplist/office configured (dry run)" in result.stdout
    assert "nothing was stored" in result.stdout


def test_apply_yaml_syntax_error_names_file_and_line_without_calling(
    admin: FakeAdmin, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Policy\nmetadata:\n  name: [web\nspec: {}\n")

    result = run(admin.target, "apply", "-f", str(bad))

    assert result.exit_code == 2
    [line] = error_lines(result)
    assert line.startswith(f"error: {bad}:4:")
    assert admin.requests == []


def test_apply_non_mapping_document_is_named_by_number(admin: FakeAdmin, tmp_path: Path) -> None:
    bad = tmp_path / "list.yaml"
    bad.write_text("kind: Policy\nmetadata: {name: a}\n---\n\n- just\n- a list\n")

    result = run(admin.target, "apply", "-f", str(bad))

    assert result.exit_code == 2
    assert error_lines(result) == [
        f"error: {bad}:5: document 2: expected a mapping (a resource), got a list"
    ]
    assert admin.requests == []


def test_apply_invalid_argument_prints_each_controller_error(
    admin: FakeAdmin, tmp_path: Path
) -> None:
    source = tmp_path / "policy.yaml"
    source.write_text(yaml.safe_dump(POLICY))
    admin.failures["Apply"] = (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Policy/web-db: spec.rules[0].ports[0]: 'tcp/99999' is not a port\n"
        "Policy/web-db: spec.rules[0].from: unknown iplist 'nope'",
    )

    result = run(admin.target, "apply", "-f", str(source))

    assert result.exit_code == 1
    assert error_lines(result) == [
        "error: Policy/web-db: spec.rules[0].ports[0]: 'tcp/99999' is not a port",
        "error: Policy/web-db: spec.rules[0].from: unknown iplist 'nope'",
    ]
    assert result.stdout == ""


def _agents() -> admin_pb2.ListAgentsResponse:
    return admin_pb2.ListAgentsResponse(
        agents=[
            admin_pb2.AgentSummary(
                agent_id="web-1",
                hostname="web-1.lab",
                labels={"app": "web", "env": "prod"},
                addresses=["198.18.0.2", "2001:db8::2"],
                mode=agent_pb2.MODE_ENFORCE,
                connected=True,
                applied_revision=3,
                desired_revision=5,
            ),
            admin_pb2.AgentSummary(
                agent_id="db-1",
                hostname="db-1.lab",
                labels={"app": "db"},
                mode=agent_pb2.MODE_VISIBILITY,
                applied_revision=5,
                desired_revision=5,
            ),
            admin_pb2.AgentSummary(
                agent_id="old-1",
                hostname="old-1.lab",
                mode=agent_pb2.MODE_ENFORCE,
                connected=True,
                revoked=True,
                applied_revision=5,
                desired_revision=5,
            ),
        ]
    )


def test_get_agents_table(admin: FakeAdmin) -> None:
    admin.responses["ListAgents"] = _agents()

    result = run(admin.target, "get", "agents")

    assert result.exit_code == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line}
    assert rows["ID"][:3] == ["ID", "HOSTNAME", "LABELS"]
    assert rows["web-1"] == [
        "web-1", "web-1.lab", "app=web,env=prod", "198.18.0.2,", "2001:db8::2",
        "enforce", "yes", "3/5", "*",
    ]  # fmt: skip
    assert rows["db-1"] == ["db-1", "db-1.lab", "app=db", "-", "visibility", "no", "5/5"]
    assert rows["old-1"] == ["old-1", "old-1.lab", "-", "-", "enforce", "revoked", "5/5"]
    assert "* the agent does not enforce the desired revision yet" in result.stdout


def test_get_agents_json_is_the_protobuf_message(admin: FakeAdmin) -> None:
    admin.responses["ListAgents"] = _agents()

    result = run(admin.target, "get", "agents", "-o", "json")

    assert result.exit_code == 0, result.stderr
    agents = json.loads(result.stdout)["agents"]
    assert agents[0]["agent_id"] == "web-1"
    assert agents[0]["labels"] == {"app": "web", "env": "prod"}
    assert agents[0]["mode"] == "MODE_ENFORCE"
    assert agents[0]["desired_revision"] == 5
    assert agents[1]["connected"] is False


def test_get_policies_yaml_can_be_applied_again(admin: FakeAdmin) -> None:
    admin.responses["ListResources"] = admin_pb2.ListResourcesResponse(
        resources=[
            admin_pb2.Resource(kind="Policy", name="web-db", document=json.dumps(POLICY)),
        ]
    )

    result = run(admin.target, "get", "policies", "-o", "yaml")

    assert result.exit_code == 0, result.stderr
    assert admin.only_request("ListResources").kind == "Policy"
    assert list(yaml.safe_load_all(result.stdout)) == [POLICY]


def test_get_iplists_table(admin: FakeAdmin) -> None:
    admin.responses["ListResources"] = admin_pb2.ListResourcesResponse(
        resources=[
            admin_pb2.Resource(
                kind="IPList", name="office", document=json.dumps(IPLIST), revision=4
            ),
        ]
    )

    result = run(admin.target, "get", "iplists")

    assert result.exit_code == 0, result.stderr
    assert admin.only_request("ListResources").kind == "IPList"
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["office", "zone=office", "203.0.113.0/24,", "2001:db8::/48", "4"] in lines


# 2100-01-01 00:00:00 UTC: in the future whenever the tests run.
CERTIFICATE_EXPIRY_MS = 4_102_444_800_000


def _agent_detail() -> admin_pb2.AgentDetail:
    clients = [f"198.18.1.{host}" for host in range(1, 11)]
    summary = admin_pb2.AgentSummary()
    summary.CopyFrom(_agents().agents[0])
    summary.certificate_not_after_unix_ms = CERTIFICATE_EXPIRY_MS
    return admin_pb2.AgentDetail(
        summary=summary,
        baseline=agent_pb2.Baseline(failsafe_inbound=["tcp/22"], controller="198.18.0.1:50151"),
        ruleset=ruleset_pb2.Ruleset(
            sets=[
                ruleset_pb2.AddressSet(name="db_peers", hosts=["198.18.0.3"]),
                ruleset_pb2.AddressSet(
                    name="web_clients", hosts=clients, networks=["203.0.113.0/24"]
                ),
            ],
            rules=[
                ruleset_pb2.Rule(
                    direction=ruleset_pb2.DIRECTION_EGRESS,
                    protocol=ruleset_pb2.PROTOCOL_TCP,
                    ports=[ruleset_pb2.PortRange(first=5432, last=5432)],
                    peer_set="db_peers",
                    action=ruleset_pb2.ACTION_ALLOW,
                    policy="web-db",
                ),
                ruleset_pb2.Rule(
                    direction=ruleset_pb2.DIRECTION_INGRESS,
                    protocol=ruleset_pb2.PROTOCOL_TCP,
                    ports=[ruleset_pb2.PortRange(first=8000, last=8100)],
                    peer_set="web_clients",
                    action=ruleset_pb2.ACTION_ALLOW,
                    policy="clients-web",
                ),
            ],
        ),
        last_error="",
    )


def test_describe_agent_renders_rules_baseline_and_sets(admin: FakeAdmin) -> None:
    admin.responses["DescribeAgent"] = _agent_detail()

    result = run(admin.target, "describe", "agent", "web-1")

    assert result.exit_code == 0, result.stderr
    assert admin.only_request("DescribeAgent").agent_id == "web-1"
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "out tcp 5432 db_peers: 198.18.0.3 allow web-db" in lines
    assert (
        "in tcp 8000-8100 web_clients: 198.18.1.1, 198.18.1.2, 198.18.1.3, 198.18.1.4 "
        "(+7 more) allow clients-web"
    ) in lines
    assert "failsafe inbound: tcp/22" in lines
    assert "controller: 198.18.0.1:50151" in lines
    assert "in sync: no: the agent has not applied the desired revision yet" in lines
    assert any(line.startswith("web_clients 10 1 ") for line in lines)
    [certificate] = [line for line in lines if line.startswith("certificate:")]
    assert certificate.startswith("certificate: expires in ")
    assert certificate.endswith(" (2100-01-01 00:00:00 UTC)")


def test_describe_revoked_agent_says_so(admin: FakeAdmin) -> None:
    detail = _agent_detail()
    detail.summary.revoked = True
    admin.responses["DescribeAgent"] = detail

    result = run(admin.target, "describe", "agent", "web-1")

    assert result.exit_code == 0, result.stderr
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert any(line.startswith("connected: revoked") for line in lines)
    assert "certificate: revoked: the controller refuses every certificate of this agent" in lines


def test_describe_agent_json_keeps_every_address(admin: FakeAdmin) -> None:
    admin.responses["DescribeAgent"] = _agent_detail()

    result = run(admin.target, "describe", "agent", "web-1", "-o", "json")

    assert result.exit_code == 0, result.stderr
    sets = json.loads(result.stdout)["ruleset"]["sets"]
    assert len(sets[1]["hosts"]) == 10


def test_describe_unknown_agent_prints_the_controller_message(admin: FakeAdmin) -> None:
    admin.failures["DescribeAgent"] = (grpc.StatusCode.NOT_FOUND, "agent 'nope' is not known")

    result = run(admin.target, "describe", "agent", "nope")

    assert result.exit_code == 1
    assert error_lines(result) == ["error: agent 'nope' is not known"]


def test_label_agent_sends_sets_and_removals(admin: FakeAdmin) -> None:
    admin.responses["LabelAgent"] = admin_pb2.LabelAgentResponse(
        labels={"app": "web", "env": "staging"}
    )

    result = run(admin.target, "label", "agent", "web-1", "env=staging", "tier-")

    assert result.exit_code == 0, result.stderr
    request = admin.only_request("LabelAgent")
    assert request.agent_id == "web-1"
    assert dict(request.set) == {"env": "staging"}
    assert list(request.remove) == ["tier"]
    assert result.stdout == "agent/web-1 labelled: app=web,env=staging\n"


def test_label_agent_malformed_argument_makes_no_call(admin: FakeAdmin) -> None:
    result = run(admin.target, "label", "agent", "web-1", "k=v=")

    assert result.exit_code == 2
    assert error_lines(result) == ["error: label argument 'k=v=': a value cannot contain '='"]
    assert admin.requests == []


@pytest.mark.parametrize(("word", "kind"), [("policy", "Policy"), ("iplist", "IPList")])
def test_delete_resource(admin: FakeAdmin, word: str, kind: str) -> None:
    admin.responses["DeleteResource"] = admin_pb2.DeleteResourceResponse(revision=9)

    result = run(admin.target, "delete", word, "office")

    assert result.exit_code == 0, result.stderr
    request = admin.only_request("DeleteResource")
    assert (request.kind, request.name) == (kind, "office")
    assert result.stdout.splitlines() == [f"{word}/office deleted", "revision 9"]


def test_other_status_codes_name_the_code(admin: FakeAdmin) -> None:
    admin.failures["DeleteResource"] = (
        grpc.StatusCode.FAILED_PRECONDITION,
        "iplist 'office' is used by\npolicy 'office-ssh'",
    )

    result = run(admin.target, "delete", "iplist", "office")

    assert result.exit_code == 1
    assert error_lines(result) == [
        f"error: the controller at {admin.address} answered FAILED_PRECONDITION: "
        "iplist 'office' is used by; policy 'office-ssh'"
    ]


def test_label_agent_accepts_the_reported_labels_it_shows(admin: FakeAdmin) -> None:
    admin.responses["DescribeAgent"] = admin_pb2.AgentDetail(
        summary=admin_pb2.AgentSummary(agent_id="web-1", reported_labels={"tier": "frontend"})
    )
    admin.responses["LabelAgent"] = admin_pb2.LabelAgentResponse(labels={"tier": "frontend"})

    result = run(admin.target, "label", "agent", "web-1", "--accept-reported")

    assert result.exit_code == 0, result.stderr
    assert "accepting the labels agent/web-1 reports: tier=frontend" in result.stdout
    labelled: list[Any] = [r for name, r in admin.requests if name == "LabelAgent"]
    [request] = labelled
    assert request.accept_reported
    assert dict(request.expected_reported) == {"tier": "frontend"}, "what was shown"
    assert (dict(request.set), list(request.remove)) == ({}, [])


def test_token_create_and_agent_addresses_send_allowed_ranges(admin: FakeAdmin) -> None:
    admin.responses["CreateToken"] = admin_pb2.CreateTokenResponse(token="T")
    admin.responses["SetAgentAddresses"] = admin_pb2.SetAgentAddressesResponse(
        allowed_ranges=["198.18.0.0/24"],
        addresses=["198.18.0.2"],
        refused_addresses=[
            agent_pb2.RefusedAddress(address="203.0.113.9", reason="outside the agent's ranges")
        ],
    )

    created = run(admin.target, "token", "create", "--addresses", "198.18.0.0/24, 2001:db8::/64")
    narrowed = run(admin.target, "agent", "addresses", "web-1", "--allow", "198.18.0.0/24")
    opened = run(admin.target, "agent", "addresses", "web-1", "--allow", "any")
    bad = run(admin.target, "agent", "addresses", "web-1", "--allow", "198.18.0.1/24")

    assert created.exit_code == narrowed.exit_code == opened.exit_code == 0
    token_requests: list[Any] = [r for name, r in admin.requests if name == "CreateToken"]
    assert [list(r.addresses) for r in token_requests] == [["198.18.0.0/24", "2001:db8::/64"]]
    requests: list[Any] = [r for name, r in admin.requests if name == "SetAgentAddresses"]
    assert [list(r.allowed_ranges) for r in requests] == [["198.18.0.0/24"], []]
    assert "refused: 203.0.113.9: outside the agent's ranges" in narrowed.stdout
    assert bad.exit_code == 2
    assert "'198.18.0.1/24' is not a CIDR with host bits zero" in bad.stderr
    assert len(requests) == 2, "a bad range makes no call"


def test_agents_with_refused_addresses_say_so_in_the_table_and_describe(admin: FakeAdmin) -> None:
    refused = [agent_pb2.RefusedAddress(address="198.18.0.9", reason="held by agent db-1")]
    summary = admin_pb2.AgentSummary(
        agent_id="web-1", addresses=["198.18.0.2"], refused_addresses=refused,
        reported_labels={"app": "web", "tier": "frontend"}, labels={"app": "web"},
        allowed_ranges=["198.18.0.0/24"],
    )  # fmt: skip
    admin.responses["ListAgents"] = admin_pb2.ListAgentsResponse(agents=[summary])
    admin.responses["DescribeAgent"] = admin_pb2.AgentDetail(summary=summary)

    listed = run(admin.target, "get", "agents")
    described = run(admin.target, "describe", "agent", "web-1")

    assert "198.18.0.2 (+1 refused)" in listed.stdout
    text = " ".join(described.stdout.split())
    assert "refused address: 198.18.0.9: held by agent db-1" in text
    assert "allowed ranges: 198.18.0.0/24" in text
    assert "not used until accepted: tier=frontend" in text
