"""The `bulkhead describe agent` view: summary, baseline, compiled rules and address sets."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from bulkhead.v1 import admin_pb2, agent_pb2, ruleset_pb2
from controller.cli.output import (
    action_text,
    cell,
    direction_text,
    in_sync,
    labels_text,
    mode_text,
    moment_text,
    now_unix_ms,
    ports_text,
    protocol_text,
    truncated,
    unix_ms_text,
    yes_no,
)
from controller.cli.tables import PlainTable, plain_table

# The baseline the agent always allows besides the configured ports (see DESIGN.md).
_IMPLICIT_BASELINE = "loopback, established/related, essential ICMP/ICMPv6"
# Agent addresses shown before cutting the list.
_ADDRESS_LIMIT = 8


def agent_detail_view(detail: admin_pb2.AgentDetail, now_ms: int | None = None) -> RenderableType:
    """Everything the controller knows about one agent, as one printable group."""
    return Group(
        _section("Agent"),
        _summary_grid(detail, now_unix_ms() if now_ms is None else now_ms),
        Text(""),
        _section("Baseline (always allowed)"),
        _baseline_grid(detail.baseline),
        Text(""),
        _section(f"Rules ({len(detail.ruleset.rules)})"),
        _rules_table(detail.ruleset),
        Text(""),
        _section(f"Address sets ({len(detail.ruleset.sets)})"),
        _sets_table(detail.ruleset.sets),
    )


def _section(title: str) -> Text:
    return Text(title, style="bold")


def _key_values(rows: Sequence[tuple[str, str]]) -> Table:
    grid = PlainTable.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(cell(f"  {key}:"), cell(value))
    return grid


def _summary_grid(detail: admin_pb2.AgentDetail, now_ms: int) -> Table:
    summary = detail.summary
    connected = "revoked" if summary.revoked else yes_no(summary.connected)
    if summary.last_seen_unix_ms > 0:
        connected += f" (last seen {unix_ms_text(summary.last_seen_unix_ms)})"
    return _key_values(
        [
            ("id", summary.agent_id),
            ("hostname", summary.hostname or "-"),
            ("labels", labels_text(summary.labels)),
            ("reported labels", _reported_labels_text(summary)),
            ("addresses", truncated(list(summary.addresses), _ADDRESS_LIMIT) or "-"),
            ("allowed ranges", ", ".join(summary.allowed_ranges) or "any"),
            *(
                ("refused address", f"{refused.address}: {refused.reason}")
                for refused in summary.refused_addresses[:_ADDRESS_LIMIT]
            ),
            ("mode", _mode_meaning(summary.mode)),
            ("connected", connected),
            ("certificate", _certificate_text(summary, now_ms)),
            ("applied", _revision_text(summary.applied_revision, summary.applied_hash)),
            ("desired", _revision_text(summary.desired_revision, summary.desired_hash)),
            ("in sync", _sync_text(summary)),
            ("last error", detail.last_error or "-"),
        ]
    )


def _reported_labels_text(summary: admin_pb2.AgentSummary) -> str:
    """What the host says of itself, and which of it no policy uses yet."""
    if not summary.reported_labels:
        return "-"
    waiting = {k: v for k, v in summary.reported_labels.items() if summary.labels.get(k) != v}
    if not waiting:
        return f"{labels_text(summary.reported_labels)} (all in use)"
    return (
        f"{labels_text(summary.reported_labels)}; not used until accepted: "
        f"{labels_text(waiting)} (bulkhead label agent {summary.agent_id} --accept-reported)"
    )


def _certificate_text(summary: admin_pb2.AgentSummary, now_ms: int) -> str:
    if summary.revoked:
        return "revoked: the controller refuses every certificate of this agent"
    expiry = summary.certificate_not_after_unix_ms
    if expiry <= 0:
        return "none issued"
    verb = "expires" if expiry > now_ms else "expired"
    return f"{verb} {moment_text(expiry, now_ms)}"


def _mode_meaning(mode: int) -> str:
    if mode == agent_pb2.MODE_ENFORCE:
        return "enforce (default-deny: what no rule allows is dropped)"
    if mode == agent_pb2.MODE_VISIBILITY:
        return "visibility (nothing dropped; would-be denials are recorded)"
    return mode_text(mode)


def _revision_text(revision: int, ruleset_hash: str) -> str:
    if revision == 0 and not ruleset_hash:
        return "none"
    return f"revision {revision}" + (f" (hash {ruleset_hash[:12]})" if ruleset_hash else "")


def _sync_text(summary: admin_pb2.AgentSummary) -> str:
    if in_sync(summary):
        return "yes"
    if summary.applied_revision < summary.desired_revision:
        return "no: the agent has not applied the desired revision yet"
    return "no: the agent enforces a different ruleset"


def _baseline_grid(baseline: agent_pb2.Baseline) -> Table:
    return _key_values(
        [
            ("failsafe inbound", ", ".join(baseline.failsafe_inbound) or "-"),
            ("failsafe outbound", ", ".join(baseline.failsafe_outbound) or "-"),
            ("controller", baseline.controller or "-"),
            ("dataplane", baseline.dataplane or "-"),
            ("always", _IMPLICIT_BASELINE),
        ]
    )


def _rules_table(ruleset: ruleset_pb2.Ruleset) -> RenderableType:
    if not ruleset.rules:
        return Text("  none: only the baseline is allowed (in enforce mode)")
    sets = {address_set.name: address_set for address_set in ruleset.sets}
    table = plain_table("DIRECTION", "PROTOCOL", "PORTS", "PEERS", "ACTION", "POLICY")
    for rule in ruleset.rules:
        table.add_row(
            cell(direction_text(rule.direction)),
            cell(protocol_text(rule.protocol)),
            cell(_rule_ports_text(rule)),
            cell(_peers_text(rule.peer_set, sets)),
            cell(action_text(rule.action)),
            cell(rule.policy or "-"),
        )
    return table


def _rule_ports_text(rule: ruleset_pb2.Rule) -> str:
    if rule.protocol in (ruleset_pb2.PROTOCOL_TCP, ruleset_pb2.PROTOCOL_UDP):
        return ports_text(rule.ports)
    return "-"


def _peers_text(name: str, sets: dict[str, ruleset_pb2.AddressSet]) -> str:
    address_set = sets.get(name)
    if address_set is None:
        return f"{name or '-'} (set missing from the ruleset)"
    members = [*address_set.hosts, *address_set.networks]
    return f"{name}: {truncated(members)}" if members else f"{name}: (empty)"


def _sets_table(sets: Sequence[ruleset_pb2.AddressSet]) -> RenderableType:
    if not sets:
        return Text("  none")
    table = plain_table("NAME", "HOSTS", "NETWORKS", "MEMBERS")
    for address_set in sets:
        table.add_row(
            cell(address_set.name),
            cell(len(address_set.hosts)),
            cell(len(address_set.networks)),
            cell(truncated([*address_set.hosts, *address_set.networks])),
        )
    return table
