"""The controller's gRPC surface on a real in-process server over loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from bulkhead.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from controller.core import Controller
from controller.server.admin_servicer import AdminServicer
from controller.server.agent_servicer import AgentServicer
from controller.server.main import SERVER_OPTIONS
from controller.store.sqlite_store import SqliteStore

POLICY = {
    "apiVersion": "bulkhead/v1",
    "kind": "Policy",
    "metadata": {"name": "web-db"},
    "spec": {"rules": [{"from": {"app": "web"}, "to": {"app": "db"}, "ports": ["tcp/5432"]}]},
}


async def start(tmp_path: Path) -> tuple[grpc.aio.Server, str]:
    core = Controller(SqliteStore(tmp_path / "c.db"))
    server = grpc.aio.server(options=SERVER_OPTIONS)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(core), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def messages(
    *items: agent_pb2.AgentMessage, hold: float = 5.0
) -> AsyncIterator[agent_pb2.AgentMessage]:
    for item in items:
        yield item
    await asyncio.sleep(hold)  # keep our side open while the test reads


def test_stream_snapshot_ack_and_admin_view(tmp_path: Path) -> None:
    async def scenario() -> None:
        server, target = await start(tmp_path)
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                admin = admin_pb2_grpc.AdminServiceStub(channel)
                await admin.Apply(admin_pb2.ApplyRequest(documents=[json.dumps(POLICY)]))
                outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
                await outbox.put(
                    agent_pb2.AgentMessage(
                        hello=agent_pb2.Hello(
                            agent_id="db", labels={"app": "db"}, addresses=["198.18.0.11"]
                        )
                    )
                )

                async def drain() -> AsyncIterator[agent_pb2.AgentMessage]:
                    while True:
                        yield await outbox.get()

                call = agent_pb2_grpc.AgentServiceStub(channel).Connect(drain())
                first = await asyncio.wait_for(call.read(), 5)
                assert first.WhichOneof("body") == "snapshot"
                snap = first.snapshot
                await outbox.put(
                    agent_pb2.AgentMessage(
                        ack=agent_pb2.Ack(revision=snap.revision, hash=snap.hash, ok=True)
                    )
                )
                for _ in range(50):
                    listed = await admin.ListAgents(admin_pb2.ListAgentsRequest())
                    if listed.agents[0].applied_hash == snap.hash:
                        break
                    await asyncio.sleep(0.05)
                summary = listed.agents[0]
                assert summary.connected
                assert summary.applied_revision == summary.desired_revision == snap.revision
                detail = await admin.DescribeAgent(admin_pb2.DescribeAgentRequest(agent_id="db"))
                assert detail.ruleset == snap.ruleset
                call.cancel()
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_first_message_must_be_hello(tmp_path: Path) -> None:
    async def scenario() -> None:
        server, target = await start(tmp_path)
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                beat = agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sent_unix_ms=1))
                call = agent_pb2_grpc.AgentServiceStub(channel).Connect(messages(beat))
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call.read()
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "first message must be hello" in (raised.value.details() or "")
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_invalid_apply_is_invalid_argument_with_field(tmp_path: Path) -> None:
    async def scenario() -> None:
        server, target = await start(tmp_path)
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                admin = admin_pb2_grpc.AdminServiceStub(channel)
                bad = json.loads(json.dumps(POLICY))
                bad["spec"]["rules"][0]["to"] = {"cidr": "198.18.0.300/24"}
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await admin.Apply(admin_pb2.ApplyRequest(documents=[json.dumps(bad)]))
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "spec.rules[0].to" in (raised.value.details() or "")
                listed = await admin.ListResources(admin_pb2.ListResourcesRequest(kind="Policy"))
                assert list(listed.resources) == []
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await admin.DescribeAgent(admin_pb2.DescribeAgentRequest(agent_id="nope"))
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_second_controller_cannot_share_the_port(tmp_path: Path) -> None:
    async def scenario() -> None:
        first = grpc.aio.server(options=SERVER_OPTIONS)
        port = first.add_insecure_port("127.0.0.1:0")
        await first.start()
        try:
            second = grpc.aio.server(options=SERVER_OPTIONS)
            with pytest.raises(RuntimeError):
                second.add_insecure_port(f"127.0.0.1:{port}")
        finally:
            await first.stop(None)

    asyncio.run(scenario())


def test_bad_address_update_ends_the_stream_with_the_reason(tmp_path: Path) -> None:
    async def scenario() -> None:
        server, target = await start(tmp_path)
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                hello = agent_pb2.AgentMessage(
                    hello=agent_pb2.Hello(agent_id="db", addresses=["198.18.0.11"])
                )
                bad = agent_pb2.AgentMessage(
                    addresses=agent_pb2.AddressUpdate(addresses=["not-an-address"])
                )
                call = agent_pb2_grpc.AgentServiceStub(channel).Connect(messages(hello, bad))

                async def read_until_error() -> None:
                    while True:
                        await asyncio.wait_for(call.read(), 5)

                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await read_until_error()
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "addresses[0]" in (raised.value.details() or "")
        finally:
            await server.stop(None)

    asyncio.run(scenario())
