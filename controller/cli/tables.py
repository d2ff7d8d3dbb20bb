"""Rich tables for `bulkhead get`: agents, policies and IP lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich import box
from rich.table import Table

from bulkhead.v1 import admin_pb2
from controller.cli.output import (
    cell,
    labels_text,
    mode_text,
    parse_stored_document,
    revisions_text,
    truncated,
    yes_no,
)


def plain_table(*headers: str, caption: str | None = None) -> Table:
    """A borderless table like `kubectl get`: easy to read and to grep."""
    table = Table(
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
    out_of_sync = any(revisions_text(agent).endswith("*") for agent in agents)
    caption = "* the agent does not enforce the desired revision yet" if out_of_sync else None
    table = plain_table(
        "ID", "HOSTNAME", "LABELS", "ADDRESSES", "MODE", "CONNECTED", "APPLIED/DESIRED",
        caption=caption,
    )  # fmt: skip
    for agent in sorted(agents, key=lambda agent: agent.agent_id):
        table.add_row(
            cell(agent.agent_id),
            cell(agent.hostname or "-"),
            cell(labels_text(agent.labels)),
            cell(truncated(list(agent.addresses))),
            cell(mode_text(agent.mode)),
            cell(yes_no(agent.connected)),
            cell(revisions_text(agent)),
        )
    return table


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


def _spec(document: dict[str, Any]) -> dict[str, Any]:
    spec = document.get("spec")
    return spec if isinstance(spec, dict) else {}
