"""bulkhead-controller: the gRPC control plane."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click
import grpc

from bulkhead.v1 import admin_pb2_grpc, agent_pb2_grpc
from controller.core import Controller
from controller.server.admin_servicer import AdminServicer
from controller.server.agent_servicer import AgentServicer
from controller.store.sqlite_store import SqliteStore, StoreCorrupt

log = logging.getLogger("bulkhead.controller")

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


async def serve(listen: str, state_dir: Path) -> None:
    _lock_state_dir(state_dir)
    try:
        store = SqliteStore(state_dir / "controller.db")
    except StoreCorrupt as exc:
        raise StartupError(str(exc)) from exc
    try:
        core = Controller(store)
    except RuntimeError as exc:  # stored resources that no longer validate
        raise StartupError(str(exc)) from exc
    server = grpc.aio.server(options=SERVER_OPTIONS)
    _add_agent_service(AgentServicer(core), server)
    _add_admin_service(AdminServicer(core), server)
    try:
        server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise StartupError(
            f"cannot listen on {listen}: address in use or not local ({exc})"
        ) from exc
    await server.start()
    log.info("listening on %s, state in %s", listen, state_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.stop(grace=2)
    store.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT to serve on.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="Where the SQLite store lives.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
def main(listen: str, state_dir: Path, log_level: str) -> None:
    """Run the Bulkhead controller."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(listen, state_dir))
    except StartupError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
