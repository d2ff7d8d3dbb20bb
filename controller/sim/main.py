"""bulkhead-sim: many simulated agents against a controller, for load and latency.

    bulkhead-sim run --controller 127.0.0.1:50151 --credentials ./sim-agents \\
        --agents 10000 --labels-from 'app=app{0..99}' --operator-credentials ./operator

Agents without cached credentials in --credentials enroll first (tokens from --token or
minted with --operator-credentials); the others reuse theirs. Then every agent holds a
stream, acks each snapshot and sends heartbeats until --duration passes or Ctrl-C.
--record writes when each agent received each revision (unix seconds), so an external
script can measure latency from a change it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from controller.gc_tuning import tune_for_many_streams
from controller.sim.agents import SimAgent
from controller.sim.credentials import CredentialCache
from controller.sim.enroll import enroll_fleet, mint_tokens
from controller.sim.errors import SimError
from controller.sim.fleet import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    DEFAULT_CONNECT_CONCURRENCY,
    DEFAULT_HEARTBEAT_S,
    DEFAULT_MAX_ATTEMPTS,
    Fleet,
    FleetOptions,
)
from controller.sim.harness import raise_open_files_limit
from controller.sim.spec import FleetSpec, LabelPattern, parse_label_pattern

DEFAULT_ENROLL_CONCURRENCY = 50


@dataclass(frozen=True)
class Enrollment:
    controller: str
    enroll_address: str
    credentials: Path
    tokens: tuple[str, ...]
    operator: Path | None
    concurrency: int


def host_port(value: str, option: str) -> str:
    """Check HOST:PORT (IPv6 as [ADDR]:PORT); SimError naming OPTION otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise SimError(f"{option} {value!r}: expected HOST:PORT, e.g. 127.0.0.1:50151")
    return value


def enrollment_address(controller: str) -> str:
    """The controller's default enrollment address: its port + 1."""
    host, _, port = controller.rpartition(":")
    return f"{host}:{int(port) + 1}"


def _address_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return host_port(value, f"--{(param.name or '').replace('_', '-')}")
    except SimError as exc:
        raise click.BadParameter(str(exc)) from exc


def _patterns_option(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> tuple[LabelPattern, ...]:
    try:
        return tuple(parse_label_pattern(value) for value in values)
    except SimError as exc:
        raise click.BadParameter(str(exc)) from exc


def _fleet_options(function: click.decorators.FC) -> click.decorators.FC:
    """Options shared by `enroll` and `run`: where the controller is and who the agents are."""
    decorators = [
        click.option("--controller", required=True, callback=_address_option,
                     help="HOST:PORT of the controller's agent (mTLS) port."),
        click.option("--enroll-address", callback=_address_option,
                     help="HOST:PORT of its enrollment port [default: --controller port + 1]."),
        click.option("--credentials", required=True,
                     type=click.Path(file_okay=False, path_type=Path),
                     help="Directory caching the agents' keys and certificates."),
        click.option("--agents", required=True, type=click.IntRange(1), help="How many agents."),
        click.option("--id-prefix", default="sim", show_default=True,
                     help="Agent ids are PREFIX-000000, PREFIX-000001, ..."),
        click.option("--labels-from", "patterns", multiple=True, callback=_patterns_option,
                     metavar="KEY=VALUE",
                     help="A label every agent carries; VALUE may hold one {FIRST..LAST} "
                     "range that agents take in turn (app=app{0..99}). Repeatable."),
        click.option("--token", "tokens", multiple=True,
                     help="Enrollment token for agents without credentials (repeatable; "
                     "the next is used when one is used up)."),
        click.option("--operator-credentials", type=click.Path(file_okay=False, path_type=Path),
                     help="Operator (admin) credentials to mint enrollment tokens with."),
        click.option("--enroll-concurrency", type=click.IntRange(1, 1000),
                     default=DEFAULT_ENROLL_CONCURRENCY, show_default=True,
                     help="Enrollments in flight at once."),
    ]  # fmt: skip
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Simulated Bulkhead agents for load and latency measurements."""


@main.command()
@_fleet_options
def enroll(  # noqa: PLR0917 - click passes options positionally
    controller: str,
    enroll_address: str | None,
    credentials: Path,
    agents: int,
    id_prefix: str,
    patterns: tuple[LabelPattern, ...],
    tokens: tuple[str, ...],
    operator_credentials: Path | None,
    enroll_concurrency: int,
) -> None:
    """Enroll the agents that have no cached credentials yet, and stop."""
    spec = _spec(agents, id_prefix, patterns)
    settings = Enrollment(
        controller=controller,
        enroll_address=enroll_address or enrollment_address(controller),
        credentials=credentials,
        tokens=tokens,
        operator=operator_credentials,
        concurrency=enroll_concurrency,
    )
    _run_async(_enroll(spec, settings))


@main.command()
@_fleet_options
@click.option("--heartbeat-interval", type=click.FloatRange(0.1, 300), default=DEFAULT_HEARTBEAT_S,
              show_default=True, help="Seconds between an agent's heartbeats.")  # fmt: skip
@click.option("--connect-concurrency", type=click.IntRange(1, 100_000),
              default=DEFAULT_CONNECT_CONCURRENCY, show_default=True,
              help="Agents dialling (not yet answered) at once.")  # fmt: skip
@click.option("--backoff-initial", type=click.FloatRange(0.01, 60), default=BACKOFF_INITIAL_S,
              show_default=True, help="First reconnect delay ceiling, seconds.")  # fmt: skip
@click.option("--backoff-max", type=click.FloatRange(0.01, 3600), default=BACKOFF_MAX_S,
              show_default=True, help="Largest reconnect delay, seconds.")  # fmt: skip
@click.option("--max-attempts", type=click.IntRange(1), default=DEFAULT_MAX_ATTEMPTS,
              show_default=True,
              help="Unanswered attempts in a row after which an agent gives up.")  # fmt: skip
@click.option("--duration", type=click.FloatRange(0), default=0, show_default=True,
              help="Seconds to run; 0 runs until Ctrl-C.")  # fmt: skip
@click.option("--status-interval", type=click.FloatRange(0.5), default=5.0, show_default=True,
              help="Seconds between status lines.")  # fmt: skip
@click.option("--record", type=click.Path(dir_okay=False, path_type=Path),
              help="Write when each agent got each revision (unix seconds) as JSON.")  # fmt: skip
def run(  # noqa: PLR0917 - click passes options positionally
    controller: str,
    enroll_address: str | None,
    credentials: Path,
    agents: int,
    id_prefix: str,
    patterns: tuple[LabelPattern, ...],
    tokens: tuple[str, ...],
    operator_credentials: Path | None,
    enroll_concurrency: int,
    heartbeat_interval: float,
    connect_concurrency: int,
    backoff_initial: float,
    backoff_max: float,
    max_attempts: int,
    duration: float,
    status_interval: float,
    record: Path | None,
) -> None:
    """Enroll what is missing, then hold N agent streams."""
    spec = _spec(agents, id_prefix, patterns)
    if backoff_initial > backoff_max:
        raise click.BadParameter("must not exceed --backoff-max", param_hint="--backoff-initial")
    settings = Enrollment(
        controller=controller,
        enroll_address=enroll_address or enrollment_address(controller),
        credentials=credentials,
        tokens=tokens,
        operator=operator_credentials,
        concurrency=enroll_concurrency,
    )
    options = FleetOptions(
        heartbeat_interval=heartbeat_interval,
        connect_concurrency=connect_concurrency,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        max_attempts=max_attempts,
    )
    _run_async(
        _hold(
            spec, settings, options, duration=duration, status_every=status_interval, record=record
        )
    )


def _spec(agents: int, id_prefix: str, patterns: tuple[LabelPattern, ...]) -> FleetSpec:
    try:
        return FleetSpec(agents, id_prefix=id_prefix, labels=patterns)
    except SimError as exc:
        raise click.UsageError(str(exc)) from exc


def _run_async(coroutine: Coroutine[Any, Any, object]) -> None:
    try:
        asyncio.run(coroutine)
    except SimError as exc:
        raise click.ClickException(str(exc)) from exc


async def _enroll(spec: FleetSpec, settings: Enrollment) -> dict[str, SimAgent]:
    """Credentials for every agent of SPEC, as SimAgents ready to stream."""
    raise_open_files_limit(spec.count)
    cache = CredentialCache(settings.credentials)
    credentials, report = await enroll_fleet(
        spec.agent_ids(),
        cache,
        enroll_address=settings.enroll_address,
        tokens=_token_source(settings),
        concurrency=settings.concurrency,
        progress=lambda done: click.echo(f"enrolled {done}") if done % 1000 == 0 else None,
    )
    click.echo(
        f"credentials: {report.reused} reused, {report.enrolled} enrolled "
        f"({report.seconds:.1f} s), {len(report.failed)} without"
    )
    for agent_id, why in list(report.failed.items())[:10]:
        click.echo(f"  {agent_id}: {why}", err=True)
    ca_pem = cache.ca_pem() or b""
    return {
        agent_id: SimAgent(
            agent_id,
            credentials[agent_id],
            ca_pem,
            labels=spec.labels_for(index),
            addresses=[spec.address_for(index)],
            controller=settings.controller,
        )
        for index, agent_id in enumerate(spec.agent_ids())
        if agent_id in credentials
    }


def _token_source(settings: Enrollment) -> Callable[[int], Sequence[str]]:
    """Where tokens for N missing agents come from: --token, else minted, else nowhere."""
    operator = settings.operator

    def tokens(missing: int) -> Sequence[str]:
        if settings.tokens:
            return settings.tokens
        if operator is not None:
            return mint_tokens(settings.controller, operator, missing)
        return ()

    return tokens


async def _hold(
    spec: FleetSpec,
    settings: Enrollment,
    options: FleetOptions,
    *,
    duration: float,
    status_every: float,
    record: Path | None,
) -> None:
    agents = await _enroll(spec, settings)
    if not agents:
        raise SimError("no agent has credentials; nothing to run")
    fleet = Fleet(list(agents.values()), options)
    tune_for_many_streams()  # as the controller: thousands of streams in one process
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Arrivals are kept on the monotonic clock; the record is in unix time.
    to_unix = time.time() - time.monotonic()
    fleet.start()
    started = time.monotonic()
    try:
        while not stop.is_set():
            remaining = duration - (time.monotonic() - started) if duration else status_every
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(status_every, remaining))
            click.echo(_status_line(fleet, time.monotonic() - started))
        # Before stopping: afterwards no agent is up any more.
        click.echo("final: " + _status_line(fleet, time.monotonic() - started))
    finally:
        await fleet.stop()
    if record is not None:
        arrivals = {
            agent.agent_id: {str(rev): at + to_unix for rev, at in sorted(agent.arrivals.items())}
            for agent in fleet.agents
        }
        record.write_text(json.dumps(arrivals, indent=1) + "\n")
        click.echo(f"arrivals written to {record}")


def _status_line(fleet: Fleet, elapsed: float) -> str:
    agents = fleet.agents
    held = min(agent.applied_revision for agent in agents)
    snapshots = sum(agent.snapshots for agent in agents)
    return (
        f"[{elapsed:7.1f} s] {fleet.status().describe()}; {snapshots} snapshots received, "
        f"revision {held} or newer everywhere"
    )
