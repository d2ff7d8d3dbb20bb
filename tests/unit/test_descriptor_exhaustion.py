"""Replay of issue 17's "descriptor exhaustion": idle TCP connections to the enrollment port
of a real controller process held to 1,024 descriptors with prlimit.

Before the enrollment front, 1,100 idle connections from one host took every descriptor
for gRPC's 120 s handshake timeout: nobody, operators included, could connect meanwhile.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bulkhead.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from tests.controller_process import (
    ControllerProcess,
    running_controller,
    set_descriptor_limit,
)

DESCRIPTOR_LIMIT = 1_024  # what a unit without LimitNOFILE gets
IDLE_CONNECTIONS = 1_100
ATTACKER = "127.0.0.2"  # one source; the operator and the enrolling host are 127.0.0.1
CALL_DEADLINE_S = 5.0  # a bound on the calls, never an assertion of speed
OPEN_BOUND_S = 120.0  # the whole flood of connects ends within this, whatever happens
WAIT_CLOSE_S = 30.0


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


@contextmanager
def idle_connections(target: str, count: int, source: str) -> Iterator[list[socket.socket]]:
    """COUNT TCP connections from SOURCE to TARGET that send nothing, closed at the end."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 256:  # this process holds them all at once
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1024), hard))
    opened: list[socket.socket] = []
    deadline = time.monotonic() + OPEN_BOUND_S
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            sock = socket.socket()
            opened.append(sock)
            sock.settimeout(3)
            sock.bind((source, 0))
            try:
                sock.connect(_split(target))
            except OSError:
                continue  # refused or dropped: still part of the attempt
        yield opened
    finally:
        for sock in opened:
            sock.close()


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """True once the server closed SOCK (EOF or reset); False if it stays open that long."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def _list_agents_and_get_ca(controller: ControllerProcess) -> None:
    async with controller.admin_channel() as channel:
        await admin_pb2_grpc.AdminServiceStub(channel).ListAgents(
            admin_pb2.ListAgentsRequest(), timeout=CALL_DEADLINE_S
        )
    async with controller.anonymous_channel() as channel:
        reply = await agent_pb2_grpc.EnrollmentServiceStub(channel).GetCA(
            agent_pb2.GetCARequest(), timeout=CALL_DEADLINE_S
        )
    assert "BEGIN CERTIFICATE" in reply.ca_pem


def test_idle_connections_from_one_source_lock_nobody_out(tmp_path: Path) -> None:
    # A handshake timeout as long as gRPC's default: only the per-source cap can save it.
    with running_controller(tmp_path, "--handshake-timeout", "120") as controller:
        set_descriptor_limit(controller.pid, DESCRIPTOR_LIMIT)
        with idle_connections(controller.enroll_listen, IDLE_CONNECTIONS, ATTACKER) as flood:
            assert len(flood) == IDLE_CONNECTIONS
            asyncio.run(_list_agents_and_get_ca(controller))
            # The attacker's next connection is closed at once, not held for 120 s.
            with idle_connections(controller.enroll_listen, 1, ATTACKER) as (one_more,):
                assert closed_by_server(one_more, WAIT_CLOSE_S)
            assert controller.alive(), controller.log_text()
        assert controller.alive(), controller.log_text()


@pytest.mark.parametrize("port", ["main", "enrollment"])
def test_a_connection_that_never_handshakes_is_closed_after_the_timeout(
    tmp_path: Path, port: str
) -> None:
    with running_controller(tmp_path, "--handshake-timeout", "1") as controller:
        target = controller.listen if port == "main" else controller.enroll_listen
        with idle_connections(target, 1, "127.0.0.1") as (silent,):
            # gRPC's default would hold it 120 s; the bound is far above the 1 s asked for.
            assert closed_by_server(silent, WAIT_CLOSE_S)
        assert controller.alive(), controller.log_text()
