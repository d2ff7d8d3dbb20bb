"""Who may join and who is cut off: `bulkhead token ...`, `bulkhead agent revoke`, `bulkhead audit`.

Arguments are checked before the controller is contacted (exit 2 on a bad one).
"""

from __future__ import annotations

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
@output_option
@click.pass_obj
def token_create(
    settings: Settings, labels: str | None, ttl: str, uses: int, fmt: OutputFormat
) -> None:
    """Create an enrollment token. The table output is the token alone on stdout, so that
    T=$(bulkhead token create) works; its id and expiry go to stderr."""
    ttl_seconds = parse_duration(ttl, "--ttl", maximum_seconds=MAX_TOKEN_TTL_S)
    token_labels = {} if labels is None else parse_label_list(labels, "--labels")
    with settings.client() as client:
        response = client.create_token(token_labels, ttl_seconds, uses)
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
