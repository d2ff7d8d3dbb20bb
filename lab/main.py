"""`bulkhead-lab`: a Bulkhead lab of network namespaces on one machine.

Every command prints one clear line on error and exits non-zero; no tracebacks.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from lab import control
from lab.demo import DEFAULT_POLICY, run_demo
from lab.errors import LabError
from lab.iproute import ip_binary
from lab.lifecycle import (
    CONTROLLER_ADDRESS,
    DATAPLANES,
    MODES,
    add_listener,
    down,
    require_root,
    up,
)
from lab.probe import DEFAULT_TIMEOUT, probe_hosts
from lab.spec import parse_host_specs, validate_host_name
from lab.state import LabPaths, lab_dir, load_state
from lab.status import render_status

_out = Console(highlight=False)


class _LabGroup(click.Group):
    """Turns LabError (and Ctrl-C) into one line on stderr and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LabError as exc:
            click.echo(f"bulkhead-lab: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("bulkhead-lab: interrupted", err=True)
            ctx.exit(130)


def _say(line: str) -> None:
    click.echo(line, err=True)


@click.group(cls=_LabGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """A Bulkhead lab: one network namespace per host on a private bridge, with a
    controller and one agent per host. State lives in $BULKHEAD_LAB_DIR
    (default /run/bulkhead-lab)."""


@main.command("up")
@click.option(
    "--host", "hosts", multiple=True, metavar="NAME[:key=value,...]",
    help="A host and its labels, e.g. web:app=web,env=prod (repeat).",
)  # fmt: skip
@click.option("--dataplane", type=click.Choice(DATAPLANES), default="nftables", show_default=True)
@click.option("--mode", type=click.Choice(MODES), default="enforce", show_default=True)
@click.option("--no-daemons", is_flag=True, help="Only the network: no controller, no agents.")
def up_command(hosts: tuple[str, ...], dataplane: str, mode: str, no_daemons: bool) -> None:
    """Create the lab; returns when every agent is in sync."""
    specs = parse_host_specs(hosts)
    require_root()
    directory = lab_dir()
    up(directory, specs, mode=mode, dataplane=dataplane, daemons=not no_daemons, report=_say)
    _say(f"lab is up; state in {directory}. Next: eval $(bulkhead-lab env); bulkhead-lab status")


@main.command("down")
@click.option(
    "--all-bh", is_flag=True,
    help="Also remove bh-* namespaces and links the lab did not mark as its own.",
)  # fmt: skip
def down_command(all_bh: bool) -> None:
    """Stop every lab process and remove namespaces, links and the lab directory."""
    require_root()
    if not down(lab_dir(), every_bh=all_bh, report=_say):
        _say("nothing to remove: no lab is up")


@main.command("env")
def env_command() -> None:
    """Print shell exports for the `bulkhead` CLI: eval $(bulkhead-lab env)."""
    try:
        state = load_state(lab_dir())
        controller, credentials = state.controller, state.credentials
    except LabError:
        controller, credentials = CONTROLLER_ADDRESS, str(LabPaths(lab_dir()).operator)
    click.echo(f"export BULKHEAD_CONTROLLER={controller}")
    click.echo(f"export BULKHEAD_CREDENTIALS={credentials}")


@main.command("status")
def status_command() -> None:
    """Hosts, addresses, labels, processes and agent sync state."""
    require_root()
    directory = lab_dir()
    render_status(directory, load_state(directory), _out)


@main.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside host NAME's namespace: bulkhead-lab exec web -- ss -tln."""
    require_root()
    host = load_state(lab_dir()).host(validate_host_name(name, where="NAME"))
    sys.stdout.flush()
    # Replace this process: exit status, signals and the terminal pass straight through.
    os.execv(ip_binary(), ["ip", "netns", "exec", host.netns, *command])


@main.command("listen")
@click.argument("name")
@click.argument("ports", nargs=-1, required=True, type=click.IntRange(1, 65535))
@click.option("--udp", is_flag=True, help="Also answer UDP datagrams on each port.")
def listen_command(name: str, ports: tuple[int, ...], udp: bool) -> None:
    """Start a background server on host NAME answering on each PORT (v4 and v6)."""
    require_root()
    record = add_listener(lab_dir(), name, list(ports), udp=udp)
    _say(f"listener on {name}: {', '.join(map(str, ports))} (pid {record.pid}, log {record.log})")


@main.command("probe")
@click.argument("source", metavar="FROM")
@click.argument("target", metavar="TO")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("-6", "ipv6", is_flag=True, help="Use TO's IPv6 address.")
@click.option("--udp", is_flag=True, help="Send a datagram; ok if the listener answers.")
@click.option("--timeout", type=float, default=DEFAULT_TIMEOUT, show_default=True)
def probe_command(
    *, source: str, target: str, port: int, ipv6: bool, udp: bool, timeout: float
) -> None:
    """Connect from FROM (a host, or `ops` for this console) to TO:PORT.
    Exit 0 if connected, 1 if blocked."""
    require_root()
    state = load_state(lab_dir())
    result = probe_hosts(state, source, target, port, ipv6=ipv6, udp=udp, timeout=timeout)
    family = " (IPv6)" if ipv6 else ""
    proto = "/udp" if udp else ""
    verdict = "ok" if result.connected else f"blocked ({result.reason})"
    click.echo(f"{source} -> {target}:{port}{proto}{family} {verdict}")
    sys.exit(0 if result.connected else 1)


@main.command("demo")
@click.option("--keep", is_flag=True, help="Leave the lab up afterwards.")
@click.option(
    "--policy", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_POLICY,
    show_default=True, help="The policy file to apply.",
)  # fmt: skip
def demo_command(keep: bool, policy: Path) -> None:
    """web, db and other; apply the web-to-db policy; show what gets through."""
    require_root()
    if not run_demo(lab_dir(), policy=policy, keep=keep, console=_out):
        raise LabError("some probes did not match the policy (see the table)")
    _say("every probe matched the policy")


@main.command("stop")
@click.argument("target", metavar="controller|HOST")
@click.option("--kill", is_flag=True, help="SIGKILL instead of SIGTERM (a crash).")
def stop_command(target: str, kill: bool) -> None:
    """Stop the controller or a host's agent; the host's rules stay enforced."""
    require_root()
    pid = control.stop(lab_dir(), target, sig=signal.SIGKILL if kill else signal.SIGTERM)
    _say(f"stopped {target} (pid {pid})")


@main.command("start")
@click.argument("target", metavar="controller|HOST")
@click.option("--no-wait", is_flag=True, help="Return at once, not when it is in service.")
def start_command(target: str, no_wait: bool) -> None:
    """Start the controller or a host's agent again after `stop`."""
    require_root()
    pid = control.start(lab_dir(), target, wait=not no_wait)
    _say(f"started {target} (pid {pid})")
