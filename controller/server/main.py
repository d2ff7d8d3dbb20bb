"""bulkhead-controller's command line: run the controller (controller/server/serve.py), issue
and revoke operator certificates."""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import timedelta
from pathlib import Path

import click

from bulkhead.privatefile import PrivateFile, check_private_dir, write_private_group
from controller.core import DEFAULT_OFFLINE_AFTER_S
from controller.enrollment import DEFAULT_AGENT_CERT_TTL
from controller.host_reports import DEFAULT_HOST_LIMITS, HostLimits
from controller.pki import (
    OPERATOR_ROLES,
    Identity,
    PkiError,
    certificate_from_pem,
    identity_from_certificate,
)
from controller.policy.names import label_key_problem
from controller.server.connection_limits import (
    DEFAULT_HANDSHAKE_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    ConnectionLimits,
)
from controller.server.enrollment_front import DEFAULT_PER_SOURCE, DEFAULT_TOTAL
from controller.server.enrollment_throttle import DEFAULT_FAILURES_PER_MINUTE
from controller.server.serve import (
    DEFAULT_LISTEN,
    DEFAULT_STATE_DIR,
    StartupError,
    open_state,
    serve,
)


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
