"""`bulkhead`: the operator CLI. Commands parse arguments, call the controller, print.

Errors are CliErrors (see errors.py): one `error: ` line each on stderr, exit 2 for bad
input and 1 for controller or connection failures, never a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from controller.cli.access_commands import agent, audit, token
from controller.cli.client import CONTROLLER_ENV, DEFAULT_CONTROLLER, DEFAULT_TIMEOUT_SECONDS
from controller.cli.credentials import CREDENTIALS_ENV, DEFAULT_CREDENTIALS_DIR
from controller.cli.describe import agent_detail_view
from controller.cli.documents import load_documents, read_sources
from controller.cli.errors import BadInputError
from controller.cli.labels import parse_label_args
from controller.cli.observe_commands import connections, flows, suggest, traffic_map
from controller.cli.output import (
    OutputFormat,
    dump_documents,
    labels_text,
    make_console,
    parse_stored_document,
)
from controller.cli.settings import Settings, echo_message, output_option
from controller.cli.tables import agents_table, iplists_table, policies_table

# CLI word -> the resource kind the controller stores.
RESOURCE_KINDS = {"policy": "Policy", "iplist": "IPList"}
# `get` accepts plural and singular forms.
_GET_TARGETS = {
    "agents": "agents", "agent": "agents",
    "policies": "policy", "policy": "policy",
    "iplists": "iplist", "iplist": "iplist",
}  # fmt: skip
_DEBUG_ENV = "BULKHEAD_DEBUG"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--controller",
    metavar="ADDR",
    envvar=CONTROLLER_ENV,
    default=DEFAULT_CONTROLLER,
    show_default=True,
    show_envvar=True,
    help="Address (host:port) of bulkhead-controller.",
)
@click.option(
    "--credentials",
    metavar="DIR",
    envvar=CREDENTIALS_ENV,
    default=DEFAULT_CREDENTIALS_DIR,
    show_default=True,
    show_envvar=True,
    help="Directory with operator.crt, operator.key and ca.crt "
    "(from bulkhead-controller admin-cert --out DIR).",
)
@click.option(
    "--timeout",
    metavar="SECONDS",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT_SECONDS,
    show_default=True,
    help="How long to wait for each answer of the controller.",
)
@click.pass_context
def cli(ctx: click.Context, controller: str, credentials: str, timeout: float) -> None:
    """Operate Bulkhead: apply policies, inspect agents and their rules, enroll and revoke."""
    if not controller.strip():
        raise BadInputError("--controller is empty: give host:port of bulkhead-controller")
    if not credentials.strip():
        raise BadInputError("--credentials is empty: give the directory of operator.crt")
    ctx.obj = Settings(
        controller=controller.strip(), credentials=Path(credentials.strip()), timeout=timeout
    )


@cli.command()
@click.option(
    "-f",
    "--filename",
    "filenames",
    multiple=True,
    required=True,
    metavar="FILE",
    help="YAML file of resources ('-' reads stdin); may be repeated.",
)
@click.option("--dry-run", is_flag=True, help="Validate and report changes without storing.")
@output_option
@click.pass_obj
def apply(settings: Settings, filenames: Sequence[str], dry_run: bool, fmt: OutputFormat) -> None:
    """Create or update the policies and IP lists in FILE, all or nothing."""
    documents = load_documents(read_sources(filenames))
    with settings.client() as client:
        response = client.apply(documents, dry_run=dry_run)
    if fmt != "table":
        echo_message(response, fmt)
        return
    suffix = " (dry run)" if dry_run else ""
    for change in response.changes:
        click.echo(f"{change.kind.lower()}/{change.name} {change.action}{suffix}")
    if dry_run:
        click.echo(f"revision {response.revision} (dry run: nothing was stored)")
    else:
        click.echo(f"revision {response.revision}")


@cli.command()
@click.argument(
    "resource", type=click.Choice(sorted(_GET_TARGETS)), metavar="agents|policies|iplists"
)
@output_option
@click.pass_obj
def get(settings: Settings, resource: str, fmt: OutputFormat) -> None:
    """List agents, policies or IP lists."""
    target = _GET_TARGETS[resource]
    if target == "agents":
        _get_agents(settings, fmt)
    else:
        _get_resources(settings, target, fmt)


def _get_agents(settings: Settings, fmt: OutputFormat) -> None:
    with settings.client() as client:
        response = client.list_agents()
    if fmt != "table":
        echo_message(response, fmt)
    elif not response.agents:
        click.echo("No agents.")
    else:
        make_console().print(agents_table(response.agents))


def _get_resources(settings: Settings, word: str, fmt: OutputFormat) -> None:
    with settings.client() as client:
        response = client.list_resources(RESOURCE_KINDS[word])
    resources = sorted(response.resources, key=lambda resource: resource.name)
    if fmt != "table":
        # The documents themselves, so that `get policies -o yaml` can be applied again.
        documents = [parse_stored_document(resource) for resource in resources]
        click.echo(dump_documents(documents, fmt), nl=False)
    elif not resources:
        click.echo("No policies." if word == "policy" else "No IP lists.")
    else:
        table = policies_table if word == "policy" else iplists_table
        make_console().print(table(resources))


@cli.group()
def describe() -> None:
    """Show one object in detail."""


@describe.command("agent")
@click.argument("agent_id", metavar="ID")
@output_option
@click.pass_obj
def describe_agent(settings: Settings, agent_id: str, fmt: OutputFormat) -> None:
    """An agent's state, baseline, compiled rules and address sets."""
    with settings.client() as client:
        detail = client.describe_agent(agent_id)
    if fmt != "table":
        echo_message(detail, fmt)
    else:
        make_console().print(agent_detail_view(detail))


@cli.group()
def delete() -> None:
    """Delete a policy or an IP list."""


def _delete_command(word: str) -> click.Command:
    kind = RESOURCE_KINDS[word]

    @click.command(word, help=f"Delete the {kind} NAME.")
    @click.argument("name", metavar="NAME")
    @click.pass_obj
    def command(settings: Settings, name: str) -> None:
        with settings.client() as client:
            response = client.delete_resource(kind, name)
        click.echo(f"{word}/{name} deleted")
        click.echo(f"revision {response.revision}")

    return command


for _word in RESOURCE_KINDS:
    delete.add_command(_delete_command(_word))


@cli.group()
def label() -> None:
    """Set or remove labels."""


@label.command("agent")
@click.argument("agent_id", metavar="ID")
@click.argument("changes", nargs=-1, metavar="key=value|key- ...")
@click.option(
    "--accept-reported",
    is_flag=True,
    help="Make the labels the host reports (its config and labels.d/) operator labels, "
    "so policy uses them; KEY=VALUE and KEY- given too apply after them.",
)
@click.pass_obj
def label_agent(
    settings: Settings, agent_id: str, changes: Sequence[str], accept_reported: bool
) -> None:
    """Set (key=value) or remove (key-) labels of agent ID. Only these labels (and the
    enrollment token's) drive policy; what the host reports about itself waits for
    --accept-reported."""
    parsed = parse_label_args(changes, allow_empty=accept_reported)
    with settings.client() as client:
        reported = None
        if accept_reported:
            # What is accepted is what the operator is shown here, not what the host may
            # report by the time the controller acts.
            reported = dict(client.describe_agent(agent_id).summary.reported_labels)
            click.echo(f"accepting the labels agent/{agent_id} reports: {labels_text(reported)}")
        response = client.label_agent(agent_id, parsed.set, parsed.remove, accept_reported=reported)
    click.echo(f"agent/{agent_id} labelled: {labels_text(response.labels)}")


for _command in (token, agent, audit, flows, connections, traffic_map, suggest):
    cli.add_command(_command)


def main() -> None:
    """Console entry point: run the CLI; an unexpected exception is one line, not a traceback."""
    try:
        cli(prog_name="bulkhead")
    except Exception as exc:
        if os.environ.get(_DEBUG_ENV):
            raise
        click.echo(
            f"error: unexpected {type(exc).__name__}: {exc} "
            f"(a bug in bulkhead; set {_DEBUG_ENV}=1 for the traceback)",
            err=True,
        )
        sys.exit(1)
