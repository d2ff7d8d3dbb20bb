"""Who may join and who is cut off: `bulkhead token ...`, `bulkhead agent revoke`, `bulkhead audit`.

Arguments are checked before the controller is contacted (exit 2 on a bad one).
"""

from __future__ import annotations

import ipaddress

import click

from controller.cli.durations import EXAMPLES, parse_duration
from controller.cli.labels import parse_label_list
from controller.cli.output import (
    OutputFormat,
    labels_text,
    make_console,
    moment_text,
    now_unix_ms,
)
from controller.cli.settings import Settings, echo_message, output_option
from controller.cli.tables import audit_table, tokens_table
from controller.enrollment import MAX_TOKEN_TTL_S, MAX_TOKEN_USES

# The proto's uint32 limit field.
_MAX_AUDIT_LIMIT = 2**32 - 1


@click.group()
def token() -> None:
    """Create, list and revoke enrollment tokens for new agents."""


@token.command("create")
@click.option(
    "--labels",
    metavar="k=v,k2=v2",
    help="Labels given to the agent that enrolls with the token.",
)
@click.option(
    "--ttl",
    metavar="DURATION",
    default="1h",
    show_default=True,
    help=f"How long the token can be used: {EXAMPLES}; at most 30d.",
)
@click.option(
    "--uses",
    type=click.IntRange(1, MAX_TOKEN_USES),
    default=1,
    show_default=True,
    help="How many agents can enroll with the token.",
)
@click.option(
    "--addresses",
    metavar="CIDR,...",
    help="Ranges the enrolled agent's addresses must fall in; others it reports are "
    "refused (default: any workload address no other live agent holds).",
)
@output_option
@click.pass_obj
def token_create(  # noqa: PLR0917 - click passes options positionally
    settings: Settings,
    labels: str | None,
    ttl: str,
    uses: int,
    addresses: str | None,
    fmt: OutputFormat,
) -> None:
    """Create an enrollment token. The table output is the token alone on stdout, so that
    T=$(bulkhead token create) works; its id and expiry go to stderr."""
    ttl_seconds = parse_duration(ttl, "--ttl", maximum_seconds=MAX_TOKEN_TTL_S)
    token_labels = {} if labels is None else parse_label_list(labels, "--labels")
    ranges = parse_cidr_list(addresses, "--addresses")
    with settings.client() as client:
        response = client.create_token(token_labels, ttl_seconds, uses, addresses=ranges)
    if fmt != "table":
        echo_message(response, fmt)
        return
    info = response.info
    click.echo(response.token)
    click.echo(
        f"token {info.token_id}: expires {moment_text(info.expires_unix_ms, now_unix_ms())}, "
        f"{info.uses} use{'s' if info.uses != 1 else ''}, labels {labels_text(info.labels)} "
        "(the token is shown only now)",
        err=True,
    )


@token.command("list")
@output_option
@click.pass_obj
def token_list(settings: Settings, fmt: OutputFormat) -> None:
    """List enrollment tokens: their labels, uses, expiry and state."""
    with settings.client() as client:
        response = client.list_tokens()
    if fmt != "table":
        echo_message(response, fmt)
    elif not response.tokens:
        click.echo("No tokens.")
    else:
        make_console().print(tokens_table(response.tokens, now_unix_ms()))


@token.command("revoke")
@click.argument("token_id", metavar="TOKEN_ID")
@click.pass_obj
def token_revoke(settings: Settings, token_id: str) -> None:
    """Revoke a token: no agent can enroll with it any more."""
    with settings.client() as client:
        client.revoke_token(token_id)
    click.echo(f"token {token_id} revoked")


@click.group()
def agent() -> None:
    """Act on one agent's identity."""


@agent.command("revoke")
@click.argument("agent_id", metavar="ID")
@click.pass_obj
def agent_revoke(settings: Settings, agent_id: str) -> None:
    """Revoke agent ID: cut its connection and refuse its certificates from now on."""
    with settings.client() as client:
        response = client.revoke_agent(agent_id)
    count = response.certificates
    click.echo(f"agent/{agent_id} revoked: {count} certificate{'s' if count != 1 else ''} revoked")


@agent.command("addresses")
@click.argument("agent_id", metavar="ID")
@click.option(
    "--allow",
    metavar="CIDR,...|any",
    required=True,
    help="Ranges agent ID's addresses must fall in ('any': no restriction). Addresses it "
    "reports outside them leave its peers' sets.",
)
@output_option
@click.pass_obj
def agent_addresses(settings: Settings, agent_id: str, allow: str, fmt: OutputFormat) -> None:
    """Set the address ranges agent ID may hold, and show what it holds then."""
    ranges = [] if allow.strip() == "any" else parse_cidr_list(allow, "--allow")
    with settings.client() as client:
        response = client.set_agent_addresses(agent_id, ranges)
    if fmt != "table":
        echo_message(response, fmt)
        return
    # Canonical addresses and the controller's own reasons: nothing here is host text.
    click.echo(
        f"agent/{agent_id} may hold addresses in: {', '.join(response.allowed_ranges) or 'any'}"
    )
    click.echo(f"accepted: {', '.join(response.addresses) or 'none'}")
    for refused in response.refused_addresses:
        click.echo(f"refused: {refused.address}: {refused.reason}")


def parse_cidr_list(text: str | None, option: str) -> list[str]:
    """Comma-separated CIDRs, checked before the controller is asked (exit 2 on a bad one)."""
    if text is None:
        return []
    ranges = [part.strip() for part in text.split(",") if part.strip()]
    for part in ranges:
        try:
            ipaddress.ip_network(part, strict=True)
        except ValueError:
            raise click.BadParameter(
                f"{part!r} is not a CIDR with host bits zero", param_hint=option
            ) from None
    return ranges


@click.command()
@click.option(
    "--since",
    metavar="DURATION",
    help=f"Only entries newer than this ({EXAMPLES}).",
)
@click.option(
    "--limit",
    type=click.IntRange(1, _MAX_AUDIT_LIMIT),
    help="At most this many entries (default: the controller's limit).",
)
@click.option(
    "--agents",
    is_flag=True,
    help="Add the events agents caused (tamper reports, renewals, address changes), "
    "kept apart from operator actions; repeats are merged into one entry (xN).",
)
@output_option
@click.pass_obj
def audit(
    settings: Settings, since: str | None, limit: int | None, agents: bool, fmt: OutputFormat
) -> None:
    """Show the audit log: who changed what, and when."""
    since_unix_ms = 0
    if since is not None:
        seconds = parse_duration(since, "--since")
        since_unix_ms = max(0, now_unix_ms() - seconds * 1000)
    with settings.client() as client:
        response = client.list_audit(since_unix_ms, limit or 0, include_agents=agents)
    if fmt != "table":
        echo_message(response, fmt)
    elif not response.entries:
        click.echo("No audit entries" + (f" in the last {since}." if since else "."))
    else:
        make_console().print(audit_table(response.entries))
