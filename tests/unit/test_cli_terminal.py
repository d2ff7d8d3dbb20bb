"""What a host sent never acts on the operator's terminal (issue 17: a hostname holding
ESC[2J cleared the screen from `get agents` and `describe agent`).

The controller's answers come from the fake AdminService over real gRPC with mutual TLS:
whatever the controller lets through (an agent enrolled before it checked hostnames, a
process name, an agent's error text), the CLI prints it escaped, in tables, views, error
lines, json and yaml alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from rich.text import Text

from bulkhead.v1 import admin_pb2, agent_pb2, ruleset_pb2
from controller.cli.tables import plain_table
from controller.cli.terminal import has_active, printable
from tests.unit.cli_support import FakeAdmin, run, serving_fake_admin

# Clears the screen, retitles the window, rings, turns what follows right to left, and
# starts a C1 control sequence.
EVIL = "ev\x1b[2Jil\x1b]0;owned\x07\u202egnp.exe\x9b31m"
# How the CLI shows it, and its start (a narrow column folds the rest onto more lines).
SHOWN = "ev\\x1b[2Jil\\x1b]0;owned\\x07\\u202egnp.exe\\x9b31m"
SHOWN_START = "ev\\x1b[2Jil"


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[FakeAdmin]:
    with serving_fake_admin(tmp_path) as fake:
        yield fake


def assert_inert(text: str) -> None:
    """Nothing in TEXT acts on a terminal: no ESC, no other control, no bidi mark."""
    assert not has_active(text), repr(text)


def evil_summary() -> admin_pb2.AgentSummary:
    return admin_pb2.AgentSummary(
        agent_id="web-1",
        hostname=EVIL,
        labels={"app": EVIL},
        addresses=[EVIL],
        mode=agent_pb2.MODE_ENFORCE,
    )


def evil_detail() -> admin_pb2.AgentDetail:
    ruleset = ruleset_pb2.Ruleset(
        rules=[ruleset_pb2.Rule(direction=ruleset_pb2.DIRECTION_INGRESS, policy=EVIL)],
        sets=[ruleset_pb2.AddressSet(name=EVIL, hosts=[EVIL])],
    )
    baseline = agent_pb2.Baseline(controller=EVIL, dataplane=EVIL)
    return admin_pb2.AgentDetail(
        summary=evil_summary(), ruleset=ruleset, baseline=baseline, last_error=EVIL
    )


def one_flow(
    source: admin_pb2.FlowEndpoint,
    destination: admin_pb2.FlowEndpoint,
    verdict: agent_pb2.Verdict,
) -> admin_pb2.ListFlowsResponse:
    """SOURCE reached DESTINATION on tcp/5432 once."""
    entry = admin_pb2.FlowEntry(
        source=source, destination=destination, port=5432, protocol="tcp", verdict=verdict, count=1
    )
    return admin_pb2.ListFlowsResponse(flows=[entry])


def test_get_agents_shows_a_hostile_hostname_escaped(admin: FakeAdmin) -> None:
    admin.responses["ListAgents"] = admin_pb2.ListAgentsResponse(agents=[evil_summary()])

    result = run(admin.target, "get", "agents")

    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout)
    row = next(line for line in result.stdout.splitlines() if line.startswith("web-1"))
    assert SHOWN in row  # the hostname
    assert f"app={SHOWN}" in row


def test_describe_agent_shows_every_host_field_escaped(admin: FakeAdmin) -> None:
    admin.responses["DescribeAgent"] = evil_detail()

    result = run(admin.target, "describe", "agent", "web-1")

    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout)
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert f"hostname: {SHOWN}" in lines
    assert f"last error: {SHOWN}" in lines
    assert f"controller: {SHOWN}" in lines


@pytest.mark.parametrize("fmt", ["json", "yaml"])
@pytest.mark.parametrize(
    ("command", "method", "response"),
    [
        (["get", "agents"], "ListAgents", admin_pb2.ListAgentsResponse(agents=[evil_summary()])),
        (["describe", "agent", "web-1"], "DescribeAgent", evil_detail()),
    ],
)
def test_json_and_yaml_escape_but_keep_the_exact_value(
    admin: FakeAdmin, fmt: str, command: list[str], method: str, response: admin_pb2.AgentDetail
) -> None:
    admin.responses[method] = response

    result = run(admin.target, *command, "-o", fmt)

    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout)
    data = json.loads(result.stdout) if fmt == "json" else yaml.safe_load(result.stdout)
    summary = data["agents"][0] if method == "ListAgents" else data["summary"]
    assert summary["hostname"] == EVIL
    assert summary["labels"] == {"app": EVIL}


def test_yaml_keeps_other_unicode_readable(admin: FakeAdmin) -> None:
    friendly = admin_pb2.AgentSummary(agent_id="web-1", hostname="café-1.lab")
    admin.responses["ListAgents"] = admin_pb2.ListAgentsResponse(agents=[friendly])

    result = run(admin.target, "get", "agents", "-o", "yaml")

    assert "hostname: café-1.lab" in result.stdout


def test_flows_show_hostile_process_names_escaped_and_never_as_markup(
    admin: FakeAdmin,
) -> None:
    source = admin_pb2.FlowEndpoint(workload="web-1", process=EVIL, pid=7)
    destination = admin_pb2.FlowEndpoint(address="198.18.0.3", process="[/][bold]x")
    admin.responses["ListFlows"] = one_flow(source, destination, agent_pb2.VERDICT_DENIED)

    result = run(admin.target, "flows")

    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout)
    assert f"web-1 ({SHOWN}, pid 7)" in result.stdout
    assert "198.18.0.3:5432 ([/][bold]x)" in result.stdout  # text, not rich markup
    assert "denied" in result.stdout


def test_connections_show_hostile_processes_escaped(admin: FakeAdmin) -> None:
    process = agent_pb2.Process(pid=9, name=EVIL, user=EVIL, systemd_unit=EVIL, exe=EVIL)
    admin.responses["GetConnections"] = agent_pb2.ConnectionTable(
        connections=[
            agent_pb2.Connection(
                protocol="tcp",
                state="LISTEN",
                local_address="198.18.0.2",
                local_port=80,
                process=process,
            )
        ]
    )

    table = run(admin.target, "connections", "web-1")
    as_json = run(admin.target, "connections", "web-1", "-o", "json")

    assert table.exit_code == 0, table.stderr
    assert_inert(table.stdout)
    assert table.stdout.count(SHOWN_START) == 3  # name, user, unit (folded in the columns)
    assert_inert(as_json.stdout)
    assert json.loads(as_json.stdout)["connections"][0]["process"]["exe"] == EVIL


def test_an_agents_error_text_is_escaped_in_the_error_line(admin: FakeAdmin) -> None:
    admin.responses["GetConnections"] = agent_pb2.ConnectionTable(error=EVIL)

    result = run(admin.target, "connections", "web-1")

    assert result.exit_code == 1
    assert_inert(result.stderr)
    assert result.stderr == f"error: agent web-1: {SHOWN}\n"


def test_audit_shows_hostile_targets_and_details_escaped(admin: FakeAdmin) -> None:
    admin.responses["ListAudit"] = admin_pb2.ListAuditResponse(
        entries=[
            admin_pb2.AuditEntry(
                at_unix_ms=1,
                actor="agent:web-1",
                action="agent.tamper",
                target=EVIL,
                detail=json.dumps({"description": EVIL}),  # json's own \u001b escapes
            ),
            admin_pb2.AuditEntry(actor="agent:web-1", action="agent.tamper", detail=EVIL),
        ]
    )

    result = run(admin.target, "audit")

    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout)
    assert SHOWN in result.stdout


def test_suggest_never_writes_a_hostile_label(admin: FakeAdmin) -> None:
    web = admin_pb2.FlowEndpoint(workload="web-1", address="198.18.0.2", labels={"app": EVIL})
    db = admin_pb2.FlowEndpoint(workload="db-1", address="198.18.0.3", labels={"app": "db"})
    admin.responses["ListFlows"] = one_flow(web, db, agent_pb2.VERDICT_ALLOWED)

    result = run(admin.target, "suggest")

    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout)
    [policy] = yaml.safe_load_all(result.stdout)
    assert policy["spec"]["rules"][0]["from"] == {"cidr": "198.18.0.2/32"}  # not the label


# --- the output layer ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[2J", "\\x1b[2J"),
        ("a\nb\tc\rd", "a\\x0ab\\x09c\\x0dd"),  # no fake rows or columns either
        ("\x00\x7f\x85\x9b", "\\x00\\x7f\\x85\\x9b"),
        ("\u202a\u202b\u202c\u202d\u202e", "\\u202a\\u202b\\u202c\\u202d\\u202e"),
        ("\u2066\u2067\u2068\u2069\u2028\u2029", "\\u2066\\u2067\\u2068\\u2069\\u2028\\u2029"),
        ("db-1.lab café 数据库 [::1]:80", "db-1.lab café 数据库 [::1]:80"),
    ],
)
def test_printable_escapes_what_acts_on_a_terminal_and_nothing_else(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_a_table_escapes_cells_that_future_code_adds_as_text_or_strings() -> None:
    table = plain_table("A", "B", "C")
    table.add_row(Text(EVIL, style="red"), EVIL, Text("ok", style="bold"))
    console = Console(width=300, force_terminal=False, color_system=None)

    with console.capture() as captured:
        console.print(table)

    assert_inert(captured.get())
    assert captured.get().count(SHOWN_START) == 2  # (rich's Text drops the bell itself)
