"""See before you block: `bulkhead flows`, `connections`, `map` and `suggest`.

All four read what agents observed; `map` and `suggest` work on the same flows as
`bulkhead flows` (the controller merges both ends' reports), drawn or turned into
least-privilege policies on this side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click
from rich.table import Table

from bulkhead.v1 import admin_pb2, agent_pb2
from controller.cli.durations import EXAMPLES, parse_duration
from controller.cli.errors import BadInputError, CliError
from controller.cli.labels import parse_label_list
from controller.cli.output import (
    OutputFormat,
    cell,
    dump_data,
    make_console,
    now_unix_ms,
    relative_text,
)
from controller.cli.settings import Settings, echo_message, output_option
from controller.cli.tables import plain_table
from controller.observe.graph import MAP_FORMATS, MapError, render_dot, write_map
from controller.observe.model import Endpoint, FlowRow
from controller.observe.suggest import suggest_policies, to_yaml

MAX_FLOWS = 100_000  # the controller's cap for one listing
VERDICT_WORDS = {
    agent_pb2.VERDICT_ALLOWED: "allowed",
    agent_pb2.VERDICT_DENIED: "denied",
    agent_pb2.VERDICT_WOULD_DENY: "would-deny",
}
DIRECTION_WORDS = {
    agent_pb2.FLOW_DIRECTION_INBOUND: "inbound",
    agent_pb2.FLOW_DIRECTION_OUTBOUND: "outbound",
    agent_pb2.FLOW_DIRECTION_LISTEN: "listen",
}


def _since_option(default: str | None = None) -> click.Option:
    return click.Option(
        ["--since"],
        metavar="DURATION",
        default=default,
        show_default=default is not None,
        help=f"Only flows seen within this time ({EXAMPLES}).",
    )


def _request(
    since: str | None,
    *,
    workload: str = "",
    labels: Sequence[str] = (),
    denied: bool = False,
    limit: int = MAX_FLOWS,
) -> admin_pb2.ListFlowsRequest:
    request = admin_pb2.ListFlowsRequest(workload=workload, limit=limit)
    for text in labels:
        request.labels.update(parse_label_list(text, "--label"))
    if denied:
        request.verdicts.extend([agent_pb2.VERDICT_DENIED, agent_pb2.VERDICT_WOULD_DENY])
    if since is not None:
        request.since_unix_ms = max(0, now_unix_ms() - parse_duration(since, "--since") * 1000)
    return request


@click.command()
@click.option("--workload", metavar="ID", default="", help="Flows to or from this workload.")
@click.option(
    "--label",
    "labels",
    metavar="k=v",
    multiple=True,
    help="Flows to or from a workload with this label (repeatable: all must match).",
)
@click.option("--denied", is_flag=True, help="Only denied and would-be-denied flows.")
@click.option("--limit", type=click.IntRange(1, MAX_FLOWS), default=1000, show_default=True)
@output_option
@click.pass_obj
def flows(
    settings: Settings,
    *,
    workload: str,
    labels: Sequence[str],
    denied: bool,
    since: str | None,
    limit: int,
    fmt: OutputFormat,
) -> None:
    """Observed flows: who connected to whom, on which port, through which processes."""
    request = _request(since, workload=workload, labels=labels, denied=denied, limit=limit)
    with settings.client() as client:
        response = client.list_flows(request)
    if fmt != "table":
        echo_message(response, fmt)
        return
    if not response.flows:
        click.echo("No flows" + (f" in the last {since}." if since else " observed yet."))
        return
    make_console().print(flows_table(response.flows, now_unix_ms()))
    if response.truncated:
        click.echo(f"(more than {limit} flows matched; showing the most recent)", err=True)


flows.params.insert(3, _since_option())


def endpoint_text(end: admin_pb2.FlowEndpoint, port: int | None = None) -> str:
    """`web-1 (nginx, pid 812)` or `db-1:5432 (postgres)`; an address when no workload."""
    text = end.workload or end.address
    if port is not None:
        text += f":{port}"
    if end.process:
        text += (
            f" ({end.process}, pid {end.pid})" if port is None and end.pid else f" ({end.process})"
        )
    return text


def flows_table(entries: Sequence[admin_pb2.FlowEntry], now_ms: int) -> Table:
    table = plain_table("SOURCE", "", "DESTINATION", "PROTO", "VERDICT", "COUNT", "LAST SEEN")
    for entry in entries:
        verdict = VERDICT_WORDS.get(entry.verdict, "?")
        style = {"denied": "red", "would-deny": "yellow"}.get(verdict, "")
        table.add_row(
            endpoint_text(entry.source),
            "→",
            endpoint_text(entry.destination, entry.port if entry.protocol != "icmp" else None),
            entry.protocol,
            cell(verdict, style),
            str(entry.count),
            relative_text(entry.last_seen_unix_ms, now_ms),
        )
    return table


@click.command()
@click.argument("agent_id", metavar="AGENT")
@output_option
@click.pass_obj
def connections(settings: Settings, agent_id: str, fmt: OutputFormat) -> None:
    """The live socket-to-process table of one connected agent's host."""
    with settings.client() as client:
        table = client.get_connections(agent_id)
    if table.error:
        raise CliError(f"agent {agent_id}: {table.error}")
    if fmt != "table":
        echo_message(table, fmt)
        return
    view = plain_table(
        "PROTO", "STATE", "LOCAL", "PEER", "DIRECTION", "PID", "PROCESS", "USER", "UNIT"
    )
    for c in sorted(table.connections, key=lambda c: (c.direction, c.local_port, c.peer_address)):
        view.add_row(
            c.protocol,
            c.state,
            _socket_text(c.local_address, c.local_port),
            _socket_text(c.peer_address, c.peer_port) if c.peer_address else "*",
            DIRECTION_WORDS.get(c.direction, "?"),
            str(c.process.pid) if c.process.pid else "-",
            c.process.name or "-",
            c.process.user or "-",
            c.process.systemd_unit or "-",
        )
    make_console().print(view)


def _socket_text(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def flow_rows(entries: Sequence[admin_pb2.FlowEntry]) -> list[FlowRow]:
    """The controller's entries as the map's and the suggester's rows."""
    return [
        FlowRow(
            source=_endpoint(entry.source),
            destination=_endpoint(entry.destination),
            port=entry.port if entry.protocol != "icmp" else 0,
            protocol=entry.protocol,
            verdict=VERDICT_WORDS[entry.verdict],
            count=entry.count,
            first_seen=entry.first_seen_unix_ms / 1000,
            last_seen=entry.last_seen_unix_ms / 1000,
        )
        for entry in entries
        if entry.verdict in VERDICT_WORDS
    ]


def _endpoint(end: admin_pb2.FlowEndpoint) -> Endpoint:
    return Endpoint(end.workload, end.address, dict(end.labels), end.process)


def _all_flows(settings: Settings, since: str | None) -> list[FlowRow]:
    with settings.client() as client:
        response = client.list_flows(_request(since))
    if response.truncated:
        click.echo(f"warning: only the {MAX_FLOWS} most recent flows are used", err=True)
    return flow_rows(response.flows)


@click.command("map")
@click.option(
    "-o",
    "--output",
    "path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"File to write; the format follows the suffix ({', '.join(MAP_FORMATS)}).",
)
@click.option("--group-by", metavar="LABEL", help="Draw workloads in boxes by this label.")
@click.pass_obj
def traffic_map(settings: Settings, path: Path, group_by: str | None, since: str | None) -> None:
    """Draw the traffic map with Graphviz: workloads, edges labelled with ports, denied in red."""
    suffix = path.suffix.lstrip(".").lower()
    if suffix not in MAP_FORMATS:
        raise BadInputError(
            f"--output: {path.name!r} does not end in one of .{', .'.join(MAP_FORMATS)}"
        )
    rows = _all_flows(settings, since)
    try:
        write_map(render_dot(rows, group_by), path)
    except MapError as exc:
        raise CliError(str(exc)) from exc
    click.echo(f"wrote {path} ({len(rows)} flows)", err=True)


traffic_map.params.append(_since_option())


@click.command()
@click.option(
    "--group-by",
    metavar="k1,k2",
    default="app",
    show_default=True,
    help="Labels that name the groups policies are written for.",
)
@click.option(
    "-o",
    "--output",
    "fmt",
    type=click.Choice(["yaml", "json"]),
    default="yaml",
    show_default=True,
)
@click.pass_obj
def suggest(settings: Settings, group_by: str, since: str | None, fmt: str) -> None:
    """Least-privilege policies from observed allowed and would-be-denied flows, ready for
    `bulkhead apply -f`."""
    keys = [key.strip() for key in group_by.split(",") if key.strip()]
    if not keys:
        raise BadInputError("--group-by: name at least one label key")
    try:
        documents = suggest_policies(_all_flows(settings, since), keys)
    except ValueError as exc:
        raise BadInputError(f"--group-by: {exc}") from exc
    if not documents:
        click.echo("nothing to suggest: no allowed or would-deny flows between workloads", err=True)
        return
    click.echo(to_yaml(documents) if fmt == "yaml" else dump_data(documents, "json"), nl=False)


suggest.params.append(_since_option())
