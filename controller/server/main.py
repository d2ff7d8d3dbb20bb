"""bulkhead-controller: the gRPC control plane."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import click
import grpc

from bulkhead import sdnotify
from bulkhead.channel import SERVER_STREAM_OPTIONS
from bulkhead.privatefile import PrivateFile, check_private_dir, write_private_group
from bulkhead.v1 import admin_pb2_grpc, agent_pb2_grpc
from controller.core import DEFAULT_OFFLINE_AFTER_S, Controller
from controller.enrollment import DEFAULT_AGENT_CERT_TTL, Enrollment
from controller.gc_tuning import tune_for_many_streams
from controller.host_reports import DEFAULT_HOST_LIMITS, HostLimits
from controller.metrics import serve_metrics
from controller.pki import (
    OPERATOR_ROLES,
    CertificateAuthority,
    Identity,
    PkiError,
    certificate_from_pem,
    identity_from_certificate,
)
from controller.policy.names import label_key_problem
from controller.server.admin_servicer import AdminServicer
from controller.server.agent_servicer import AgentServicer
from controller.server.connection_limits import (
    DEFAULT_HANDSHAKE_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    ConnectionLimits,
    main_port_options,
)
from controller.server.enrollment_front import DEFAULT_PER_SOURCE, DEFAULT_TOTAL
from controller.server.enrollment_port import (
    EnrollmentPort,
    EnrollmentPortError,
    audit_throttled_to,
    start_enrollment_port,
)
from controller.server.enrollment_throttle import DEFAULT_FAILURES_PER_MINUTE
from controller.store.sqlite_store import SqliteStore, StoreCorrupt

log = logging.getLogger("bulkhead.controller")
# Agent-reported changes arriving within this window are compiled together (core.py).
COALESCE_S = 0.05
# Heartbeats are kept in memory and written together this often (at most).
LAST_SEEN_FLUSH_S = 5.0

DEFAULT_LISTEN = "127.0.0.1:50151"
DEFAULT_STATE_DIR = "/var/lib/bulkhead/controller"
# Off so a second controller cannot bind the same port and silently take half the agents.
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Agents ping to notice a vanished controller; accept their pings on idle streams.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    # TLS records of 4 KB rather than 16: each stream holds buffers of that size, and
    # agents' messages are mostly small. 50 MB less with 10,000 agents (docs/benchmarks.md).
    ("grpc.tsi.max_frame_size", 4096),
    *SERVER_STREAM_OPTIONS,
]


# The generated registration functions are untyped; these aliases give them types.
_add_agent_service: Callable[[AgentServicer, grpc.aio.Server], None] = (
    agent_pb2_grpc.add_AgentServiceServicer_to_server
)
_add_admin_service: Callable[[AdminServicer, grpc.aio.Server], None] = (
    admin_pb2_grpc.add_AdminServiceServicer_to_server
)


class StartupError(Exception):
    pass


def _lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock so two controllers never share one database."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(state_dir / "controller.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StartupError(f"state dir {state_dir}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise StartupError(f"{state_dir} is in use by another bulkhead-controller") from exc
    return fd


async def _watch_offline(core: Controller, offline_after_s: float) -> None:
    """Write heartbeats in batches, and re-evaluate offline agents often enough to notice
    within a quarter of the threshold."""
    interval = max(1.0, min(LAST_SEEN_FLUSH_S, offline_after_s / 4))
    while True:
        await asyncio.sleep(interval)
        core.flush_last_seen()
        core.check_offline()
        core.check_stuck()


def _host_port(value: str | None, option: str) -> str | None:
    """Check HOST:PORT on the command line (IPv6 as [ADDR]:PORT)."""
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint=option)
    return value


def _split(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def _label_keys(value: str) -> frozenset[str]:
    keys = frozenset(k.strip() for k in value.split(",") if k.strip())
    for key in keys:
        if problem := label_key_problem(key):
            raise click.BadParameter(problem, param_hint="--trust-host-label-keys")
    return keys


def enrollment_address(listen: str) -> str:
    """The default enrollment address: the main one with the next port."""
    host, _, port = listen.rpartition(":")
    return f"{host}:{int(port) + 1}"


def open_state(
    state_dir: Path, *, ca_cert: Path | None, ca_key: Path | None
) -> tuple[SqliteStore, CertificateAuthority]:
    """The store and the CA of a state dir (the CA created on first start if not supplied)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = SqliteStore(state_dir / "controller.db")
    except (StoreCorrupt, OSError) as exc:
        raise StartupError(str(exc)) from exc
    try:
        if ca_cert is not None and ca_key is not None:
            ca = CertificateAuthority.from_files(ca_cert, ca_key)
        else:
            ca = CertificateAuthority.load_or_create(state_dir / "pki")
    except PkiError as exc:
        raise StartupError(f"CA: {exc}") from exc
    return store, ca


async def _start_enrollment(
    address: str,
    enrollment: Enrollment,
    credentials: grpc.ServerCredentials,
    limits: ConnectionLimits,
    store: SqliteStore,
) -> EnrollmentPort:
    host, _, port = address.rpartition(":")
    try:
        return await start_enrollment_port(
            host.strip("[]"), int(port), enrollment, credentials, limits,
            audit=audit_throttled_to(store),
        )  # fmt: skip
    except EnrollmentPortError as exc:
        raise StartupError(str(exc)) from exc


async def serve(
    listen: str,
    enroll_listen: str,
    state_dir: Path,
    *,
    sans: tuple[str, ...] = (),
    ca_cert: Path | None = None,
    ca_key: Path | None = None,
    agent_cert_ttl: timedelta = DEFAULT_AGENT_CERT_TTL,
    offline_after_s: float = DEFAULT_OFFLINE_AFTER_S,
    offline_isolation: bool = False,
    host_limits: HostLimits = DEFAULT_HOST_LIMITS,
    trusted_label_keys: frozenset[str] = frozenset(),
    metrics_listen: tuple[str, int] | None = None,
    limits: ConnectionLimits = ConnectionLimits(),  # noqa: B008 - frozen, shared safely
) -> None:
    _lock_state_dir(state_dir)
    store, ca = open_state(state_dir, ca_cert=ca_cert, ca_key=ca_key)
    enrollment = Enrollment(store, ca, agent_cert_ttl=agent_cert_ttl)
    try:
        core = Controller(
            store,
            enrollment,
            offline_after_s=offline_after_s,
            offline_isolation=offline_isolation,
            coalesce_s=COALESCE_S,
            limits=host_limits,
            trusted_label_keys=trusted_label_keys,
        )
    except RuntimeError as exc:  # stored resources that no longer validate
        raise StartupError(str(exc)) from exc
    # A fresh server certificate each start: nothing long-lived to steal besides the CA.
    try:
        server_cert, server_key = ca.issue_server(sans)
    except PkiError as exc:
        raise StartupError(f"--san: {exc}") from exc
    # State loaded and compiled: from here on the heap grows with streams, not with start-up.
    tune_for_many_streams()
    server = grpc.aio.server(options=[*SERVER_OPTIONS, *main_port_options(limits)])
    _add_agent_service(AgentServicer(core), server)
    _add_admin_service(AdminServicer(core), server)
    # The main port requires a client certificate from our CA (another CA's fails the
    # handshake). Hosts without one can only enroll, on a second port with server-only
    # TLS and a server of its own (enrollment_port.py): grpcio cannot ask for an optional
    # client certificate, so callers there are always anonymous.
    credentials = {
        require_client_cert: grpc.ssl_server_credentials(
            [(server_key, server_cert)],
            root_certificates=ca.certificate_pem,
            require_client_auth=require_client_cert,
        )
        for require_client_cert in (True, False)
    }
    try:
        server.add_secure_port(listen, credentials[True])
    except RuntimeError as exc:
        raise StartupError(
            f"cannot listen on {listen}: address in use or not local ({exc})"
        ) from exc
    await server.start()
    enroll = await _start_enrollment(enroll_listen, enrollment, credentials[False], limits, store)
    if metrics_listen is not None:
        try:
            serve_metrics(
                core, *metrics_listen, front=enroll.front.stats, failures=enroll.throttle.stats
            )
        except OSError as exc:
            raise StartupError(f"--metrics-listen: cannot listen ({exc})") from exc
        log.info("metrics on http://%s:%d/metrics", *metrics_listen)
    log.info(
        "listening on %s (mTLS) and %s (enrollment), CA %s, state in %s",
        listen, enroll_listen, ca.fingerprint[:16], state_dir,
    )  # fmt: skip
    # systemd (Type=notify): ready once both ports listen.
    sdnotify.ready(f"listening on {listen} and {enroll_listen}")
    watchdog = sdnotify.start_watchdog()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    offline_watch = asyncio.create_task(_watch_offline(core, offline_after_s))
    await stop.wait()
    offline_watch.cancel()
    log.info("shutting down")
    sdnotify.stopping()
    if watchdog is not None:
        watchdog.cancel()
    # Streams end on our side first, each with a status, rather than being cancelled by
    # the server one by one after the grace period (seconds with thousands of agents).
    started = time.monotonic()
    core.close_all()
    await asyncio.gather(server.stop(grace=2), enroll.stop(grace=2))
    stopped = time.monotonic()
    core.flush_last_seen()
    store.close()
    log.info(
        "stopped: streams ended in %.1f s, state written in %.1f s",
        stopped - started, time.monotonic() - stopped,
    )  # fmt: skip


_STATE_DIR_OPTION = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="Where the SQLite store and the CA live.",
)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    callback=lambda _ctx, _param, value: _host_port(value, "--listen"),
    help="HOST:PORT for mTLS clients.",
)
@click.option(
    "--enroll-listen",
    callback=lambda _ctx, _param, value: _host_port(value, "--enroll-listen"),
    help="HOST:PORT where hosts without a certificate enroll [default: the --listen port + 1].",
)
@_STATE_DIR_OPTION
@click.option(
    "--san",
    "sans",
    multiple=True,
    help="Extra IP or DNS name for the server certificate (clients verify the name "
    "bulkhead-controller, which it always carries).",
)
@click.option("--ca-cert", type=click.Path(dir_okay=False, path_type=Path), help="Your own CA.")
@click.option("--ca-key", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--agent-cert-ttl",
    type=click.IntRange(60, 90 * 24 * 3600),
    default=int(DEFAULT_AGENT_CERT_TTL.total_seconds()),
    show_default=True,
    help="Lifetime of agent certificates in seconds; agents renew at two thirds.",
)
@click.option(
    "--offline-after",
    type=click.FloatRange(1, 30 * 24 * 3600),
    default=DEFAULT_OFFLINE_AFTER_S,
    show_default=True,
    help="Seconds of silence after which an agent is shown offline.",
)
@click.option(
    "--offline-isolation",
    is_flag=True,
    help="Take offline agents' addresses out of their peers' sets.",
)
@click.option(
    "--max-agent-addresses",
    type=click.IntRange(1, 4096),
    default=DEFAULT_HOST_LIMITS.max_addresses,
    show_default=True,
    help="Addresses one agent may report; a report with more is refused.",
)
@click.option(
    "--max-agent-labels",
    type=click.IntRange(1, 1024),
    default=DEFAULT_HOST_LIMITS.max_labels,
    show_default=True,
    help="Labels one agent may report or be given.",
)
@click.option(
    "--trust-host-label-keys",
    metavar="KEY,...",
    default="",
    help="Label keys compiled as hosts report them (off by default: host labels drive no "
    "policy until an operator accepts them with `bulkhead label agent ID --accept-reported`).",
)
@click.option(
    "--metrics-listen",
    metavar="ADDR:PORT",
    help="Serve Prometheus metrics over HTTP there (e.g. 127.0.0.1:9470); off by default.",
)
@click.option(
    "--handshake-timeout",
    type=click.FloatRange(0.5, 120),
    default=DEFAULT_HANDSHAKE_TIMEOUT_S,
    show_default=True,
    help="Seconds a new connection (either port) has to complete TLS before it is closed.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(1, 7 * 24 * 3600),
    default=DEFAULT_IDLE_TIMEOUT_S,
    show_default=True,
    help="Seconds a main-port connection with no call open is kept (streams are calls).",
)
@click.option(
    "--enroll-connections-per-source",
    type=click.IntRange(1, 10_000),
    default=DEFAULT_PER_SOURCE,
    show_default=True,
    help="Open connections to the enrollment port per source (an IPv4 address or IPv6 "
    "/64); more are closed at once.",
)
@click.option(
    "--enroll-connections",
    type=click.IntRange(1, 100_000),
    default=DEFAULT_TOTAL,
    show_default=True,
    help="Open connections to the enrollment port in total.",
)
@click.option(
    "--enroll-failures-per-minute",
    type=click.IntRange(1, 100_000),
    default=DEFAULT_FAILURES_PER_MINUTE,
    show_default=True,
    help="Failed enrollments a source may make per minute; beyond that its attempts get "
    "RESOURCE_EXHAUSTED until it slows down.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
@click.pass_context
def main(  # noqa: PLR0917 - click passes options positionally
    ctx: click.Context,
    listen: str,
    enroll_listen: str | None,
    state_dir: Path,
    sans: tuple[str, ...],
    ca_cert: Path | None,
    ca_key: Path | None,
    agent_cert_ttl: int,
    offline_after: float,
    offline_isolation: bool,
    max_agent_addresses: int,
    max_agent_labels: int,
    trust_host_label_keys: str,
    metrics_listen: str | None,
    handshake_timeout: float,
    idle_timeout: float,
    enroll_connections_per_source: int,
    enroll_connections: int,
    enroll_failures_per_minute: int,
    log_level: str,
) -> None:
    """Run the Bulkhead controller (or one of the commands below)."""
    if ctx.invoked_subcommand is not None:
        return
    _setup_logging(log_level)
    if (ca_cert is None) != (ca_key is None):
        click.echo("error: --ca-cert and --ca-key go together", err=True)
        sys.exit(2)
    try:
        asyncio.run(
            serve(
                listen,
                enroll_listen or enrollment_address(listen),
                state_dir,
                sans=sans,
                ca_cert=ca_cert,
                ca_key=ca_key,
                agent_cert_ttl=timedelta(seconds=agent_cert_ttl),
                offline_after_s=offline_after,
                offline_isolation=offline_isolation,
                host_limits=HostLimits(max_agent_addresses, max_agent_labels),
                trusted_label_keys=_label_keys(trust_host_label_keys),
                metrics_listen=_split(_host_port(metrics_listen, "--metrics-listen")),
                limits=ConnectionLimits(
                    handshake_timeout_s=handshake_timeout,
                    idle_timeout_s=idle_timeout,
                    enroll_per_source=enroll_connections_per_source,
                    enroll_total=enroll_connections,
                    enroll_failures_per_minute=enroll_failures_per_minute,
                ),
            )
        )  # fmt: skip
    except StartupError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


# What `admin-cert --out` writes; the first is the group's commit point.
_OPERATOR_FILES = ("operator.crt", "operator.key", "ca.crt")


@main.command("admin-cert")
@_STATE_DIR_OPTION
@click.option("--name", required=True, help="The operator's name, as the audit log shows it.")
@click.option("--role", type=click.Choice(["admin", "viewer"]), required=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for operator.crt, operator.key and ca.crt (point BULKHEAD_CREDENTIALS here).",
)
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option("--ca-cert", type=click.Path(dir_okay=False, path_type=Path), help="Your own CA.")
@click.option("--ca-key", type=click.Path(dir_okay=False, path_type=Path))
def admin_cert(  # noqa: PLR0917 - click passes options positionally
    state_dir: Path,
    name: str,
    role: str,
    out: Path,
    days: int,
    ca_cert: Path | None,
    ca_key: Path | None,
) -> None:
    """Issue an operator certificate for the `bulkhead` CLI (run on the controller host,
    with the same --ca-cert/--ca-key as the controller if it uses your own CA)."""
    try:
        # Before issuing: a refused --out must leave no certificate that nobody holds.
        check_private_dir(out, _OPERATOR_FILES)
        store, ca = open_state(state_dir, ca_cert=ca_cert, ca_key=ca_key)
        cert_pem, key_pem = ca.issue_operator(name, role, timedelta(days=days))
        certificate = certificate_from_pem(cert_pem)
        with store.transaction():
            store.put_certificate(
                format(certificate.serial_number, "x"),
                identity_from_certificate(certificate).uri,
                int(certificate.not_valid_after_utc.timestamp() * 1000),
            )
            store.add_audit(
                "local:admin-cert", "operator.certificate.issued", f"operator/{name}",
                {"role": role, "days": days},
            )  # fmt: skip
        contents = (cert_pem, key_pem, ca.certificate_pem)
        files = [PrivateFile(*pair) for pair in zip(_OPERATOR_FILES, contents, strict=True)]
        write_private_group(out, files)
    except (StartupError, PkiError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"wrote {out}/operator.crt, operator.key, ca.crt ({role} '{name}', {days} days)")
    click.echo(f"use it with: export BULKHEAD_CREDENTIALS={out}")


@main.command("revoke-operator")
@_STATE_DIR_OPTION
@click.option("--name", required=True, help="The operator whose certificates to revoke.")
def revoke_operator(state_dir: Path, name: str) -> None:
    """Revoke every certificate issued to an operator (run on the controller host); the
    running controller refuses them from the next call on."""
    try:
        store, _ = open_state(state_dir, ca_cert=None, ca_key=None)
        with store.transaction():
            count = sum(
                store.revoke_certificates(Identity("operator", name, role).uri)
                for role in OPERATOR_ROLES
            )
            store.add_audit(
                "local:revoke-operator", "operator.revoked", f"operator/{name}",
                {"certificates": count},
            )  # fmt: skip
    except (StartupError, PkiError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if count == 0:
        click.echo(f"error: no live certificates for operator '{name}'", err=True)
        sys.exit(1)
    click.echo(f"revoked {count} certificate(s) of operator '{name}'")
