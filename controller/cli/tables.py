"""Rich tables: agents, policies and IP lists (`get`), enrollment tokens and audit entries."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import RenderableType
from rich.style import StyleType
from rich.table import Table
from rich.text import Text

from bulkhead.v1 import admin_pb2
from controller.cli.output import (
    cell,
    labels_text,
    mode_text,
    moment_text,
    parse_stored_document,
    revisions_text,
    truncated,
    unix_ms_text,
    yes_no,
)
from controller.cli.terminal import printable

# Audit details longer than this are cut in the table (never in json/yaml).
AUDIT_DETAIL_LIMIT = 80


class PlainTable(Table):
    """A table whose cells are plain, printable text, whoever fills it: a string cell is
    never parsed as markup, and what a host sent cannot act on the terminal."""

    def add_row(
        self,
        *renderables: RenderableType | None,
        style: StyleType | None = None,
        end_section: bool = False,
    ) -> None:
        plain = [_plain(renderable) for renderable in renderables]
        super().add_row(*plain, style=style, end_section=end_section)


def _plain(renderable: RenderableType | None) -> RenderableType | None:
    if isinstance(renderable, str):
        return cell(renderable)
    if isinstance(renderable, Text) and printable(renderable.plain) != renderable.plain:
        return cell(renderable.plain, renderable.style)
    return renderable


def plain_table(*headers: str, caption: str | None = None) -> Table:
    """A borderless table like `kubectl get`: easy to read and to grep."""
    table = PlainTable(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        header_style="bold",
        caption=caption,
        caption_justify="left",
    )
    for header in headers:
        table.add_column(header, overflow="fold")
    return table


def agents_table(agents: Sequence[admin_pb2.AgentSummary]) -> Table:
    notes = []
    if any(revisions_text(agent).endswith("*") for agent in agents):
        notes.append("* the agent does not enforce the desired revision yet")
    if any(agent.refused_addresses for agent in agents):
        notes.append("refused: addresses the host reports that are not compiled (describe agent)")
    caption = "\n".join(notes) or None
    table = plain_table(
        "ID", "HOSTNAME", "LABELS", "ADDRESSES", "MODE", "CONNECTED", "APPLIED/DESIRED",
        caption=caption,
    )  # fmt: skip
    for agent in sorted(agents, key=lambda agent: agent.agent_id):
        table.add_row(
            cell(agent.agent_id),
            cell(agent.hostname or "-"),
            cell(labels_text(agent.labels)),
            cell(_addresses_text(agent)),
            cell(mode_text(agent.mode)),
            cell(_connection_state(agent)),
            cell(revisions_text(agent)),
        )
    return table


def _addresses_text(agent: admin_pb2.AgentSummary) -> str:
    text = truncated(list(agent.addresses))
    refused = len(agent.refused_addresses)
    return f"{text} (+{refused} refused)" if refused else text


def policies_table(resources: Sequence[admin_pb2.Resource]) -> Table:
    table = plain_table("NAME", "RULES", "REVISION")
    for resource in sorted(resources, key=lambda resource: resource.name):
        spec = _spec(parse_stored_document(resource))
        rules = spec.get("rules")
        table.add_row(
            cell(resource.name),
            cell(len(rules) if isinstance(rules, list) else "-"),
            cell(resource.revision),
        )
    return table


def iplists_table(resources: Sequence[admin_pb2.Resource]) -> Table:
    table = plain_table("NAME", "LABELS", "CIDRS", "REVISION")
    for resource in sorted(resources, key=lambda resource: resource.name):
        document = parse_stored_document(resource)
        metadata = document.get("metadata")
        labels = metadata.get("labels") if isinstance(metadata, dict) else None
        cidrs = _spec(document).get("cidrs")
        table.add_row(
            cell(resource.name),
            cell(labels_text(labels) if isinstance(labels, dict) else "-"),
            cell(truncated([str(c) for c in cidrs]) if isinstance(cidrs, list) else "-"),
            cell(resource.revision),
        )
    return table


def token_state(token: admin_pb2.TokenInfo, now_ms: int) -> str:
    """active, used (every use taken), expired or revoked; revoked wins, then used."""
    if token.revoked:
        return "revoked"
    if token.used >= token.uses:
        return "used"
    if token.expires_unix_ms <= now_ms:
        return "expired"
    return "active"


def tokens_table(tokens: Sequence[admin_pb2.TokenInfo], now_ms: int) -> Table:
    table = plain_table("ID", "LABELS", "USED/USES", "EXPIRES", "STATE", "CREATED BY")
    for token in sorted(tokens, key=lambda token: (token.created_unix_ms, token.token_id)):
        table.add_row(
            cell(token.token_id),
            cell(labels_text(token.labels)),
            cell(f"{token.used}/{token.uses}"),
            cell(moment_text(token.expires_unix_ms, now_ms)),
            cell(token_state(token, now_ms)),
            cell(token.created_by or "-"),
        )
    return table


def audit_table(entries: Sequence[admin_pb2.AuditEntry]) -> Table:
    """Entries in the controller's order; the time column is UTC like every other time."""
    table = plain_table("TIME (UTC)", "ACTOR", "ACTION", "TARGET", "DETAIL")
    for entry in entries:
        table.add_row(
            cell(unix_ms_text(entry.at_unix_ms).removesuffix(" UTC")),
            cell(entry.actor or "-"),
            cell((entry.action or "-") + (f" (x{n})" if (n := entry.repeated_count) > 1 else "")),
            cell(entry.target or "-"),
            cell(_cut(compact_json(entry.detail), AUDIT_DETAIL_LIMIT)),
        )
    return table


def compact_json(text: str) -> str:
    """JSON text on one line without blanks; text that is not JSON is shown as it is."""
    if not text:
        return "-"
    try:
        value = json.loads(text)
    except ValueError:
        return " ".join(text.split())
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _connection_state(agent: admin_pb2.AgentSummary) -> str:
    """revoked, offline (silent past the controller's threshold), stuck (not answering
    its ruleset), yes or no."""
    if agent.revoked:
        return "revoked"
    if agent.offline:
        return "offline"
    if agent.stuck:
        return "stuck"
    return yes_no(agent.connected)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _spec(document: dict[str, Any]) -> dict[str, Any]:
    spec = document.get("spec")
    return spec if isinstance(spec, dict) else {}
