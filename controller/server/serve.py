"""The running controller: its store and CA opened, the main gRPC port (mTLS, agents and
operators), the enrollment port, metrics and the periodic jobs, until SIGTERM."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import grpc

from bulkhead import sdnotify
from bulkhead.channel import SERVER_STREAM_OPTIONS
from bulkhead.v1 import admin_pb2_grpc, agent_pb2_grpc
from controller.core import DEFAULT_OFFLINE_AFTER_S, Controller
from controller.enrollment import DEFAULT_AGENT_CERT_TTL, Enrollment
from controller.gc_tuning import tune_for_many_streams
from controller.host_reports import DEFAULT_HOST_LIMITS, HostLimits
from controller.metrics import serve_metrics
from controller.pki import CertificateAuthority, PkiError
from controller.server.admin_servicer import AdminServicer
from controller.server.agent_servicer import AgentServicer
from controller.server.connection_limits import ConnectionLimits, main_port_options
from controller.server.enrollment_port import (
    EnrollmentPort,
    EnrollmentPortError,
    audit_throttled_to,
    start_enrollment_port,
)
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
    enrollment = Enrollment(
        store, ca, agent_cert_ttl=agent_cert_ttl, max_labels=host_limits.max_labels
    )
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
