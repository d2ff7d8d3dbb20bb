"""bulkhead-agent: enforces the controller's policy on this host."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from agent.addresses import discover_addresses
from agent.config import DEFAULT_CONFIG, AgentConfig, ConfigError, load_config, split_host_port
from agent.confirm import controller_reachable
from agent.dataplane.backend import Backend, DataplaneError
from agent.dataplane.baseline import Baseline, Endpoint, Mode
from agent.dataplane.conntrack import cut_disallowed
from agent.dataplane.conntrack_mirror import ConntrackMirror
from agent.dataplane.nftables import render
from agent.dataplane.select import choose_backend, detect_iptables_flavour, make_backend
from agent.enforcer import Enforcer
from agent.enroll import EnrollmentError, enroll
from agent.identity import AgentCredentials, IdentityError, KeytoolError, load_credentials
from agent.install import install_service
from agent.link import Backoff, ControllerLink
from agent.observe.observer import Observer
from agent.reload import HostSettings, host_settings, watch_settings
from agent.state import StateCorrupt, load_snapshot
from agent.tamper import TamperGuard
from bulkhead import sdnotify
from bulkhead.v1 import agent_pb2, ruleset_pb2

if TYPE_CHECKING:
    from agent.metrics import AgentMetrics  # imported when metrics_listen is set

log = logging.getLogger("bulkhead.agent")

AGENT_VERSION = "0.1.0"
VERIFY_POLL_S = 1.0  # how often the agent asks whether the quick cuts are due a check
# Set by the lab and the tests: refuse to program the machine's own network namespace.
REQUIRE_NETNS_ENV = "BULKHEAD_REQUIRE_NETNS"


class AgentStartError(Exception):
    pass


def _in_named_netns() -> bool:
    """Whether this process runs in a namespace made with `ip netns add`.

    Compared against /run/netns rather than /proc/1/ns/net, which sandboxes may hide.
    """
    own = os.stat("/proc/self/ns/net")
    netns_dir = Path("/run/netns")
    if not netns_dir.is_dir():
        return False
    for entry in netns_dir.iterdir():
        try:
            other = entry.stat()
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (own.st_dev, own.st_ino):
            return True
    return False


def _refuse_outside_netns() -> None:
    if os.environ.get(REQUIRE_NETNS_ENV) == "1" and not _in_named_netns():
        raise AgentStartError(
            f"{REQUIRE_NETNS_ENV}=1 but this process is not in a named network namespace; "
            "refusing to program the machine's own firewall"
        )


def build_baseline(config: AgentConfig, mode: Mode | None = None) -> Baseline:
    endpoints = {
        Endpoint(*split_host_port(config.controller)),
        Endpoint(*split_host_port(config.enrollment_address())),
    }
    return Baseline(
        mode=mode or config.mode,
        failsafe_inbound=config.failsafe.inbound_specs(),
        failsafe_outbound=config.failsafe.outbound_specs(),
        controllers=tuple(sorted(endpoints, key=lambda e: (e.address, e.port))),
    )


async def obtain_credentials(config: AgentConfig) -> AgentCredentials:
    """The agent's credentials from its state dir, enrolling first if it has none."""
    try:
        credentials = load_credentials(config.state_dir)
    except KeytoolError as exc:  # the files may be fine: the check did not happen
        raise AgentStartError(str(exc)) from exc
    except IdentityError as exc:
        raise AgentStartError(f"{exc}; fix or remove them and enroll again") from exc
    if credentials is not None:
        return credentials
    if config.token is None:
        raise AgentStartError(
            f"not enrolled: no certificate in {config.state_dir}. Create a token on the "
            "controller (bulkhead token create) and run `bulkhead-agent enroll --token T` "
            "or put it in the config as `token:`"
        )
    backoff = Backoff()
    while True:
        try:
            credentials, _ = await enroll(
                config.enrollment_address(), config.token, config.agent_id, config.hostname,
                config.state_dir,
            )  # fmt: skip
            return credentials
        except EnrollmentError as exc:
            if not exc.retryable:
                raise AgentStartError(f"enrollment failed: {exc}") from exc
            delay = backoff.next_delay()
            log.warning("enrollment: %s; retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)


def selected_dataplane(config: AgentConfig) -> str:
    try:
        return choose_backend(
            config.dataplane,
            detect_iptables_flavour(),
            allow_iptables_on_nft_host=config.allow_iptables_on_nft_host,
        )
    except DataplaneError as exc:
        raise AgentStartError(str(exc)) from exc


def _baseline_message(config: AgentConfig, dataplane: str) -> agent_pb2.Baseline:
    return agent_pb2.Baseline(
        failsafe_inbound=config.failsafe.inbound,
        failsafe_outbound=config.failsafe.outbound,
        controller=config.controller,
        dataplane=dataplane,
    )


def open_metrics(config: AgentConfig) -> AgentMetrics | None:
    """The agent's metrics if `metrics_listen` is set, else None. Only then is
    prometheus_client imported: once loaded, a module stays resident for good."""
    if config.metrics_listen is None:
        return None
    from agent.metrics import AgentMetrics

    return AgentMetrics()


def _open_backend(config: AgentConfig, metrics: AgentMetrics | None) -> tuple[str, Backend]:
    """The configured dataplane's name and backend, its applies timed into METRICS (if on)."""
    dataplane = selected_dataplane(config)
    try:
        backend = make_backend(dataplane)
    except (DataplaneError, ImportError, OSError) as exc:
        raise AgentStartError(f"dataplane {dataplane}: cannot start ({exc})") from exc
    log.info("dataplane: %s (configured: %s)", dataplane, config.dataplane)
    return dataplane, backend if metrics is None else metrics.timed(backend)


def _make_enforcer(
    config: AgentConfig, backend: Backend, baseline: Baseline
) -> tuple[Enforcer, ConntrackMirror]:
    """The enforcer, cutting connections quickly from a mirror of conntrack, checked by a
    full dump once the cuts settle (agent/dataplane/conntrack_mirror.py)."""
    main_endpoint = (Endpoint(*split_host_port(config.controller)),)
    mirror = ConntrackMirror()
    enforcer = Enforcer(
        backend,
        baseline,
        config.state_dir,
        cut_flows=functools.partial(cut_disallowed, mirror=mirror),
        verify_flows=mirror.thorough_cut,
        confirm=lambda: controller_reachable(main_endpoint, config.commit_confirm_seconds),
    )
    return enforcer, mirror


async def run_agent(config: AgentConfig, config_path: Path) -> None:
    _refuse_outside_netns()
    try:
        _, settings = host_settings(config_path)  # the config's labels plus the drop-ins
    except ConfigError as exc:
        raise AgentStartError(str(exc)) from exc
    baseline = build_baseline(config, settings.mode)
    metrics = open_metrics(config)
    dataplane, backend = _open_backend(config, metrics)
    # Tamper guard: every apply goes through guard.backend, so it knows what to repair to.
    guard = TamperGuard.for_dataplane(dataplane, backend)
    enforcer, mirror = _make_enforcer(config, guard.backend, baseline)
    try:
        enforcer.restore()
    except DataplaneError as exc:
        raise AgentStartError(f"cannot program nftables: {exc}") from exc
    # systemd (Type=notify): ready once the first ruleset is in the kernel.
    sdnotify.ready(f"enforcing revision {enforcer.applied_revision} ({dataplane})")
    watchdog = sdnotify.start_watchdog()
    # Tamper guard: repairs from now on; reports go to the link once it exists (before the
    # first enrollment there is no one to tell, and the repair is logged either way).
    guarding = asyncio.create_task(guard.watch())
    # After restore: the baseline lets the agent reach the enrollment port, nothing else.
    await obtain_credentials(config)

    def make_hello() -> agent_pb2.Hello:
        return agent_pb2.Hello(
            agent_id=config.agent_id,
            hostname=config.hostname,
            labels=settings.labels,
            applied_revision=enforcer.applied_revision,
            applied_hash=enforcer.applied_hash,
            mode=_wire_mode(settings.mode),
            baseline=_baseline_message(config, dataplane),
            agent_version=AGENT_VERSION,
        )

    controllers = [split_host_port(config.controller), split_host_port(config.enrollment_address())]
    observer = (
        Observer(lambda: link.addresses, capacity=config.flow_capacity, ignore=controllers)
        if config.observe
        else None
    )
    link = ControllerLink(
        config.controller,
        agent_id=config.agent_id,
        state_dir=config.state_dir,
        enforcer=enforcer,
        make_hello=make_hello,
        discover=discover_addresses,
        heartbeat_interval=config.heartbeat_interval,
        address_poll_interval=config.address_poll_interval,
        observer=observer,
        flow_report_interval=config.flow_report_interval,
    )
    loop = asyncio.get_running_loop()
    observing = _start_observing(observer, loop, config, metrics, link)

    async def apply_settings(new: HostSettings) -> None:
        nonlocal settings
        if new.mode is not settings.mode:
            await asyncio.to_thread(enforcer.set_baseline, build_baseline(config, new.mode))
        settings = new
        change = agent_pb2.ConfigChange(labels=new.labels, mode=_wire_mode(new.mode))
        link.report(agent_pb2.AgentMessage(config=change))

    guard.report_to(link.report_tamper)  # tamper guard: report from now on
    task = asyncio.create_task(link.run_forever())
    verifying = asyncio.create_task(_verify_cuts(enforcer))
    reload = asyncio.create_task(watch_settings(config_path, settings, apply_settings))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    link.save_flows()  # the flows not stored yet go after the restart
    # Rules stay in the kernel: stopping the agent must never open the host.
    if task.done():
        raise AgentStartError(f"the controller link stopped: {task.exception()!r}")
    log.info("stopping; the last policy stays enforced")
    sdnotify.stopping()
    if watchdog is not None:
        watchdog.cancel()
    # The tamper guard too: the rules stay.
    for running in (task, reload, verifying, guarding, observing):
        if running is not None:
            running.cancel()
    mirror.close()


async def _verify_cuts(enforcer: Enforcer) -> None:
    """Check the quick conntrack cuts with a full dump once they have settled."""
    while True:
        await asyncio.sleep(VERIFY_POLL_S)
        if enforcer.verification_due():
            await asyncio.to_thread(enforcer.verify_cut)


def _start_observing(
    observer: Observer | None,
    loop: asyncio.AbstractEventLoop,
    config: AgentConfig,
    metrics: AgentMetrics | None,
    link: ControllerLink,
) -> asyncio.Task[None] | None:
    """Start the observer (if on) and the metrics endpoint (if configured)."""
    if metrics is not None and config.metrics_listen is not None:
        _register_metrics(metrics, link, observer)
        host, port = split_host_port(config.metrics_listen)
        try:
            metrics.serve(host, port)
            log.info("metrics on http://%s/metrics", config.metrics_listen)
        except OSError as exc:
            # Enforcement matters more than metrics: keep running, say why there are none.
            log.error("no metrics: cannot listen on %s (%s)", config.metrics_listen, exc)
    if observer is None:
        return None
    observer.start(loop)
    task = asyncio.create_task(observer.run(config.snapshot_interval))
    task.add_done_callback(lambda _: observer.close(loop))
    return task


def _register_metrics(
    metrics: AgentMetrics, link: ControllerLink, observer: Observer | None
) -> None:
    metrics.counter(
        "bulkhead_agent_flows_reported",
        "Flows sent to the controller.",
        lambda: link.flows_reported,
    )
    if observer is not None:
        metrics.counter(
            "bulkhead_agent_connections_seen",
            "Connections counted (events and snapshots).",
            lambda: observer.connections_seen,
        )
        metrics.counter(
            "bulkhead_agent_flows_dropped",
            "Flows discarded because the pending table was full.",
            lambda: observer.table.dropped,
        )
        metrics.counter(
            "bulkhead_agent_denied_packets",
            "Packets default-deny dropped or (visibility) would have dropped.",
            lambda: observer.denied_packets,
        )
        metrics.counter(
            "bulkhead_agent_events_lost",
            "Connection and drop events lost (netlink overruns, floods beyond the bound).",
            observer.lost_events,
        )
        metrics.gauge(
            "bulkhead_agent_flows_pending",
            "Flows waiting to be reported.",
            lambda: len(observer.table),
        )


def _wire_mode(mode: Mode) -> agent_pb2.Mode:
    return agent_pb2.MODE_ENFORCE if mode is Mode.ENFORCE else agent_pb2.MODE_VISIBILITY


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
@click.pass_context
def main(ctx: click.Context, config_path: Path, log_level: str) -> None:
    """Run the Bulkhead agent (or one of the commands below)."""
    ctx.obj = config_path
    if ctx.invoked_subcommand is not None:
        return
    _setup_logging(log_level)
    try:
        config = load_config(config_path)
        asyncio.run(run_agent(config, config_path))
    except (ConfigError, AgentStartError) as exc:
        _fail(str(exc))


@main.command("render")
@click.option(
    "--snapshot",
    "snapshot_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="State dir holding snapshot.json (default: the config's state_dir).",
)
@click.pass_obj
def render_cmd(config_path: Path, snapshot_dir: Path | None) -> None:
    """Print the nftables JSON the agent would load, without touching the kernel."""
    try:
        config = load_config(config_path)
        saved = load_snapshot(snapshot_dir or config.state_dir)
        ruleset = saved.ruleset if saved else ruleset_pb2.Ruleset()
        document = render(ruleset, build_baseline(config))
    except (ConfigError, StateCorrupt, DataplaneError) as exc:
        _fail(str(exc))
        return
    click.echo(json.dumps(document, indent=2))


@main.command("enroll")
@click.option("--token", required=True, help="From `bulkhead token create` on the controller.")
@click.option(
    "--controller",
    "enrollment",
    help="The controller's enrollment ADDRESS:PORT [default: from the config].",
)
@click.pass_obj
def enroll_command(config_path: Path, token: str, enrollment: str | None) -> None:
    """Enroll this host: get a client certificate for the config's agent id."""
    try:
        config = load_config(config_path)
        address = enrollment or config.enrollment_address()
        split_host_port(address)
        _, labels = asyncio.run(
            enroll(address, token, config.agent_id, config.hostname, config.state_dir)
        )
    except (ConfigError, EnrollmentError, ValueError) as exc:
        _fail(str(exc))
        return
    shown = ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "none"
    click.echo(f"enrolled as {config.agent_id}; credentials in {config.state_dir}; labels: {shown}")


@main.command("uninstall-rules")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def uninstall_rules(config_path: Path, yes: bool) -> None:
    """Remove what the agent owns in its dataplane (and nothing else), leaving this host
    without Bulkhead's protection: for decommissioning a host. Stop the agent first."""
    try:
        _refuse_outside_netns()
        config = load_config(config_path)
        dataplane = selected_dataplane(config)
        if not yes:
            if not sys.stdin.isatty():
                raise AgentStartError("refusing to remove the rules without --yes (no terminal)")
            click.confirm(
                f"Remove Bulkhead's {dataplane} rules? This host will no longer be segmented",
                abort=True,
            )
        make_backend(dataplane).remove()
    except (AgentStartError, ConfigError, DataplaneError) as exc:
        _fail(str(exc))
        return
    owned = (
        "table inet bulkhead" if dataplane == "nftables" else "BULKHEAD-* chains and bh4/bh6 ipsets"
    )
    click.echo(f"removed {owned}")


main.add_command(install_service)
