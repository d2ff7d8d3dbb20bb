"""gRPC message sizes (bulkhead.channel) as gRPC really applies them, over loopback.

Issue 17: a ruleset of 8.1 MB could never reach its agent, because gRPC's 4 MiB default
receive limit answered RESOURCE_EXHAUSTED. Everything that receives from the controller
now accepts MAX_MESSAGE_BYTES (a ruleset of MAX_RULESET_BYTES plus its envelope), and the
controller sends no more than that and accepts no more than MAX_REQUEST_BYTES.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

import agent.link
import controller.sim.agents
from bulkhead.channel import MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES, MAX_RULESET_BYTES
from bulkhead.v1 import admin_pb2, agent_pb2, ruleset_pb2
from controller.cli.client import AdminClient
from controller.cli.credentials import load_credentials
from controller.pki import CONTROLLER_NAME
from controller.server.serve import SERVER_OPTIONS
from tests.unit.cli_support import serving_fake_admin

Options = Sequence[tuple[str, str | int]]
MIB = 1024 * 1024
GRPC_DEFAULT_RECEIVE_BYTES = 4 * MIB
BIG = 6 * MIB  # the size of a snapshot gRPC's defaults refuse
STREAM_CLIENTS = {
    "agent": agent.link.CHANNEL_OPTIONS,
    "simulator": controller.sim.agents.CHANNEL_OPTIONS,
}


def ruleset_of(size: int) -> ruleset_pb2.Ruleset:
    """A ruleset of at least SIZE bytes: one address set of IPv6 hosts."""
    # Each host costs 23 bytes: 21 characters, a tag and a length.
    hosts = [f"2001:db8:{n >> 16:04x}:{n & 0xFFFF:04x}::1" for n in range(size // 23 + 1)]
    ruleset = ruleset_pb2.Ruleset(sets=[ruleset_pb2.AddressSet(name="peers", hosts=hosts)])
    assert size <= ruleset.ByteSize() < size + 100
    return ruleset


def snapshot_of(size: int) -> bytes:
    """A serialised ControllerMessage carrying a snapshot of at least SIZE bytes."""
    snapshot = agent_pb2.PolicySnapshot(revision=1, ruleset=ruleset_of(size))
    message = agent_pb2.ControllerMessage(snapshot=snapshot).SerializeToString()
    assert len(message) >= size
    return message


def without_tls(options: Options) -> list[tuple[str, str | int]]:
    return [option for option in options if "ssl" not in option[0]]


async def fetch(size: int, client: Options, server: Options) -> int:
    """Have a real server send a message of about SIZE bytes; the size received."""

    async def send(request: bytes, context: object) -> bytes:
        return snapshot_of(int(request))

    handler = grpc.method_handlers_generic_handler(
        "t.Big", {"Send": grpc.unary_unary_rpc_method_handler(send)}
    )
    grpc_server = grpc.aio.server(options=list(server))
    grpc_server.add_generic_rpc_handlers((handler,))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=list(client)) as ch:
            received: bytes = await ch.unary_unary("/t.Big/Send", None, None)(
                str(size).encode(), timeout=30
            )
    finally:
        await grpc_server.stop(None)
    agent_pb2.ControllerMessage.FromString(received)  # arrived whole
    return len(received)


def refused(size: int, client: Options, server: Options) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        asyncio.run(fetch(size, client, server))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return caught.value.details() or ""


def test_the_limits_leave_a_ruleset_its_envelope() -> None:
    assert MAX_MESSAGE_BYTES == MAX_RULESET_BYTES + MIB
    assert MAX_REQUEST_BYTES == GRPC_DEFAULT_RECEIVE_BYTES  # as before, but explicit


def test_grpc_defaults_refuse_a_6_mib_snapshot() -> None:
    # The control: what the agent did before its limits were set.
    assert "larger than max" in refused(BIG, client=[], server=SERVER_OPTIONS)


@pytest.mark.parametrize("receiver", STREAM_CLIENTS)
def test_a_6_mib_snapshot_reaches_the_stream_clients(receiver: str) -> None:
    client = without_tls(STREAM_CLIENTS[receiver])
    assert asyncio.run(fetch(BIG, client, SERVER_OPTIONS)) >= BIG


@pytest.mark.parametrize("receiver", STREAM_CLIENTS)
def test_the_largest_message_the_controller_sends_is_received(receiver: str) -> None:
    client = without_tls(STREAM_CLIENTS[receiver])
    # A ruleset at its cap inside a snapshot: the envelope is bytes, not megabytes.
    received = asyncio.run(fetch(MAX_RULESET_BYTES, client, SERVER_OPTIONS))
    assert MAX_RULESET_BYTES <= received <= MAX_MESSAGE_BYTES


def test_the_controller_sends_nothing_larger_than_the_clients_accept() -> None:
    client = without_tls(agent.link.CHANNEL_OPTIONS)
    details = refused(MAX_MESSAGE_BYTES + 1, client, SERVER_OPTIONS)
    assert f"vs. {MAX_MESSAGE_BYTES})" in details


def test_a_client_refuses_a_message_larger_than_the_limit() -> None:
    # From a server without our limits (gRPC's servers send anything by default).
    client = without_tls(agent.link.CHANNEL_OPTIONS)
    details = refused(MAX_MESSAGE_BYTES + 1, client, server=[])
    assert f"vs. {MAX_MESSAGE_BYTES})" in details


def test_the_controller_refuses_requests_above_its_receive_limit() -> None:
    async def upload() -> None:
        async def accept(request: bytes, context: object) -> bytes:
            return b""

        handler = grpc.method_handlers_generic_handler(
            "t.Big", {"Put": grpc.unary_unary_rpc_method_handler(accept)}
        )
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            # A client without our send limit, as a hostile host would be.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                put = channel.unary_unary("/t.Big/Put", None, None)
                await put(b"x" * MAX_REQUEST_BYTES, timeout=30)  # at the limit: fine
                await put(b"x" * (MAX_REQUEST_BYTES + 1), timeout=30)
        finally:
            await server.stop(None)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        asyncio.run(upload())
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def big_agent_detail() -> admin_pb2.AgentDetail:
    summary = admin_pb2.AgentSummary(agent_id="db", hostname="db")
    return admin_pb2.AgentDetail(summary=summary, ruleset=ruleset_of(BIG))


def test_the_cli_describes_an_agent_with_a_6_mib_ruleset(tmp_path: Path) -> None:
    with serving_fake_admin(tmp_path) as fake:
        fake.responses["DescribeAgent"] = big_agent_detail()
        with AdminClient(fake.address, fake.target.credentials) as client:
            detail = client.describe_agent("db")
    assert detail.ByteSize() >= BIG
    assert detail == fake.responses["DescribeAgent"]


def test_a_cli_channel_with_grpc_defaults_could_not(tmp_path: Path) -> None:
    with serving_fake_admin(tmp_path) as fake:
        fake.responses["DescribeAgent"] = big_agent_detail()
        credentials = load_credentials(fake.target.credentials).channel_credentials()
        options = [("grpc.ssl_target_name_override", CONTROLLER_NAME)]
        with grpc.secure_channel(fake.address, credentials, options=options) as channel:
            describe = channel.unary_unary(
                "/bulkhead.v1.AdminService/DescribeAgent",
                request_serializer=admin_pb2.DescribeAgentRequest.SerializeToString,
                response_deserializer=admin_pb2.AgentDetail.FromString,
            )
            with pytest.raises(grpc.RpcError) as caught:
                describe(admin_pb2.DescribeAgentRequest(agent_id="db"), timeout=30)
    assert isinstance(caught.value, grpc.Call)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
