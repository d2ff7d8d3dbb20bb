"""The controller's gRPC surface over real mutual TLS on loopback: authentication,
roles, enrollment, revocation, renewal, and the stream protocol."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.keytool import generate_key, key_pem, make_csr
from bulkhead.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from bulkhead.v1.contract import ruleset_hash
from controller.core import Controller
from controller.pki import CertificateAuthority
from controller.server.admin_servicer import AdminServicer
from controller.server.agent_servicer import AgentServicer
from controller.server.enrollment_servicer import EnrollmentServicer
from controller.server.serve import SERVER_OPTIONS
from tests.pki_support import (
    CHANNEL_OPTIONS,
    agent_credentials,
    anonymous_credentials,
    make_trusting_controller,
    operator_credentials,
    server_credentials,
)

POLICY = {
    "apiVersion": "bulkhead/v1",
    "kind": "Policy",
    "metadata": {"name": "web-db"},
    "spec": {"rules": [{"from": {"app": "web"}, "to": {"app": "db"}, "ports": ["tcp/5432"]}]},
}


@dataclass
class Running:
    core: Controller
    ca: CertificateAuthority
    target: str  # mTLS port
    enroll_target: str  # server-only TLS port
    state_dir: Path

    def channel(
        self, credentials: grpc.ChannelCredentials, *, enroll: bool = False
    ) -> grpc.aio.Channel:
        target = self.enroll_target if enroll else self.target
        return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)

    def admin(self, role: str = "admin") -> grpc.aio.Channel:
        return self.channel(operator_credentials(self.ca, "alice", role, self.core))

    def agent(self, agent_id: str) -> grpc.aio.Channel:
        return self.channel(agent_credentials(self.ca, agent_id, self.core))


async def start(tmp_path: Path, **options: Any) -> tuple[grpc.aio.Server, Running]:
    core = make_trusting_controller(tmp_path, **options)
    ca = CertificateAuthority.load_or_create(tmp_path / "pki")
    server = grpc.aio.server(options=SERVER_OPTIONS)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(core), server)
    agent_pb2_grpc.add_EnrollmentServiceServicer_to_server(
        EnrollmentServicer(core.enrollment), server
    )
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(core), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(ca))
    enroll_port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(ca, require_client=False)
    )
    await server.start()
    return server, Running(core, ca, f"127.0.0.1:{port}", f"127.0.0.1:{enroll_port}", tmp_path)


def run_scenario(
    tmp_path: Path, test: Callable[[Running], Awaitable[None]], **options: Any
) -> None:
    """Run an async test body against a fresh controller (made with OPTIONS), stopping the
    server afterwards."""

    async def body() -> None:
        server, running = await start(tmp_path, **options)
        try:
            await test(running)
        finally:
            await server.stop(None)

    asyncio.run(body())


def scenario(test: object) -> object:
    """run_scenario as a decorator, with the default options."""

    def run(tmp_path: Path) -> None:
        run_scenario(tmp_path, test)  # type: ignore[arg-type]

    run.__name__ = test.__name__  # type: ignore[attr-defined]
    return run


class Outbox:
    def __init__(self, *first: agent_pb2.AgentMessage) -> None:
        self.queue: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        for message in first:
            self.queue.put_nowait(message)

    async def drain(self) -> AsyncIterator[agent_pb2.AgentMessage]:
        while True:
            yield await self.queue.get()


def hello(agent_id: str, app: str, address: str) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(agent_id=agent_id, labels={"app": app}, addresses=[address])
    )


async def expect_status(call: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(call, 5)  # type: ignore[arg-type]
    assert raised.value.code() == code, raised.value.details()
    return raised.value.details() or ""


@scenario
async def test_stream_snapshot_ack_and_admin_view(r: Running) -> None:
    async with r.admin() as admin_channel, r.agent("db") as channel:
        admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
        await admin.Apply(admin_pb2.ApplyRequest(documents=[json.dumps(POLICY)]))
        outbox = Outbox(hello("db", "db", "198.18.0.11"))
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect(outbox.drain())
        first = await asyncio.wait_for(call.read(), 5)
        snap = first.snapshot
        await outbox.queue.put(
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
        call.cancel()


@scenario
async def test_messages_far_larger_than_a_tls_frame_cross_both_ways(r: Running) -> None:
    # SERVER_OPTIONS caps the controller's TLS frames at a few KB (memory per stream):
    # a 20,000-address IP list goes up in an Apply and down in a snapshot, whole.
    hosts = [f"198.19.{i // 250}.{i % 250 + 1}" for i in range(20_000)]
    iplist = {
        "apiVersion": "bulkhead/v1",
        "kind": "IPList",
        "metadata": {"name": "many"},
        "spec": {"cidrs": [f"{host}/32" for host in hosts]},
    }
    policy = json.loads(json.dumps(POLICY))
    policy["spec"]["rules"][0]["from"] = {"iplist": "many"}
    async with r.admin() as admin_channel, r.agent("db") as channel:
        admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
        await admin.Apply(
            admin_pb2.ApplyRequest(documents=[json.dumps(iplist), json.dumps(policy)])
        )
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect(
            Outbox(hello("db", "db", "198.18.0.11")).drain()
        )
        snapshot = (await asyncio.wait_for(call.read(), 10)).snapshot
        assert snapshot.ByteSize() > 200_000
        assert ruleset_hash(snapshot.ruleset) == snapshot.hash
        received = {entry for s in snapshot.ruleset.sets for entry in [*s.hosts, *s.networks]}
        assert len(received) == len(hosts)
        call.cancel()


@scenario
async def test_clients_without_a_valid_certificate_get_nothing(r: Running) -> None:
    request = admin_pb2.ListAgentsRequest()
    # No client certificate: the main port's handshake fails; the enrollment port lets
    # the connection through but every method except GetCA/Enroll refuses it.
    async with r.channel(anonymous_credentials(r.ca)) as channel:
        await expect_status(
            admin_pb2_grpc.AdminServiceStub(channel).ListAgents(request, timeout=3),
            grpc.StatusCode.UNAVAILABLE,
        )
    async with r.channel(anonymous_credentials(r.ca), enroll=True) as channel:
        details = await expect_status(
            admin_pb2_grpc.AdminServiceStub(channel).ListAgents(request),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert "client certificate" in details
        stream = agent_pb2_grpc.AgentServiceStub(channel).Connect(
            Outbox(hello("db", "db", "198.18.0.11")).drain()
        )
        await expect_status(stream.read(), grpc.StatusCode.UNAUTHENTICATED)
    # A certificate from another CA, on either port.
    other_ca = CertificateAuthority.load_or_create(r.state_dir / "other-ca")
    for enroll in (False, True):
        async with r.channel(
            operator_credentials(other_ca, "mallory", "admin"), enroll=enroll
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await admin_pb2_grpc.AdminServiceStub(channel).ListAgents(request, timeout=3)
            assert raised.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.UNAUTHENTICATED,
            )
    # Plaintext.
    async with grpc.aio.insecure_channel(r.target) as channel:
        await expect_status(
            admin_pb2_grpc.AdminServiceStub(channel).ListAgents(request, timeout=3),
            grpc.StatusCode.UNAVAILABLE,
        )
    assert r.core.agents() == []


@scenario
async def test_viewer_reads_but_cannot_change_and_agents_cannot_administer(r: Running) -> None:
    async with r.admin("viewer") as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        await admin.ListAgents(admin_pb2.ListAgentsRequest())
        details = await expect_status(
            admin.Apply(admin_pb2.ApplyRequest(documents=[json.dumps(POLICY)])),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert "viewer" in details
        await expect_status(
            admin.CreateToken(admin_pb2.CreateTokenRequest(ttl_seconds=60, uses=1)),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    async with r.agent("web") as channel:
        await expect_status(
            admin_pb2_grpc.AdminServiceStub(channel).ListAgents(admin_pb2.ListAgentsRequest()),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    assert r.core.list_resources("Policy") == []
    assert r.core.audit(0, 100) == []


async def _enroll(r: Running, token: str, agent_id: str) -> agent_pb2.EnrollResponse:
    async with r.channel(anonymous_credentials(r.ca), enroll=True) as channel:
        stub = agent_pb2_grpc.EnrollmentServiceStub(channel)
        ca = await stub.GetCA(agent_pb2.GetCARequest())
        assert ca.ca_pem.encode() == r.ca.certificate_pem
        csr = make_csr(generate_key(), agent_id).decode()
        response: agent_pb2.EnrollResponse = await stub.Enroll(
            agent_pb2.EnrollRequest(token=token, agent_id=agent_id, csr_pem=csr, hostname=agent_id)
        )
        return response


@scenario
async def test_tokens_are_single_use_expire_and_can_be_revoked(r: Running) -> None:
    async with r.admin() as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        created = await admin.CreateToken(
            admin_pb2.CreateTokenRequest(labels={"app": "web"}, ttl_seconds=3600, uses=1)
        )
        response = await _enroll(r, created.token, "web")
        assert response.labels == {"app": "web"}
        assert "BEGIN CERTIFICATE" in response.certificate_pem
        used = await expect_status(
            _enroll(r, created.token, "web2"), grpc.StatusCode.UNAUTHENTICATED
        )
        assert "already used" in used
        revoked = await admin.CreateToken(admin_pb2.CreateTokenRequest(ttl_seconds=3600, uses=5))
        await admin.RevokeToken(admin_pb2.RevokeTokenRequest(token_id=revoked.info.token_id))
        assert "revoked" in await expect_status(
            _enroll(r, revoked.token, "web3"), grpc.StatusCode.UNAUTHENTICATED
        )
        short = await admin.CreateToken(admin_pb2.CreateTokenRequest(ttl_seconds=1, uses=5))
        await asyncio.sleep(1.1)
        assert "expired" in await expect_status(
            _enroll(r, short.token, "web4"), grpc.StatusCode.UNAUTHENTICATED
        )
        forged = created.token[:-1] + ("0" if created.token[-1] != "0" else "1")
        await expect_status(_enroll(r, forged, "web5"), grpc.StatusCode.UNAUTHENTICATED)
        audit = await admin.ListAudit(admin_pb2.ListAuditRequest())
        actions = [(e.actor, e.action) for e in audit.entries]
        assert ("operator:alice", "token.created") in actions
        assert ("agent:web", "agent.enrolled") in actions
        assert ("operator:alice", "token.revoked") in actions


def test_revoked_agent_is_cut_within_a_second_and_cannot_reconnect(tmp_path: Path) -> None:
    # Certificates of 1 min (+ 5 min backdated for clock skew): in their last third at
    # once, so the one enrollment issues can be renewed.
    run_scenario(tmp_path, _revoked_agent, agent_cert_ttl=timedelta(minutes=1))


async def _revoked_agent(r: Running) -> None:
    token, _ = r.core.enrollment.create_token({"app": "db"}, 600, 1, actor="operator:test")
    key = generate_key()
    async with r.channel(anonymous_credentials(r.ca), enroll=True) as channel:
        issued = await agent_pb2_grpc.EnrollmentServiceStub(channel).Enroll(
            agent_pb2.EnrollRequest(
                token=token, agent_id="db", csr_pem=make_csr(key, "db").decode(), hostname="db"
            )
        )
    credentials = grpc.ssl_channel_credentials(
        r.ca.certificate_pem, key_pem(key), issued.certificate_pem.encode()
    )
    async with r.channel(credentials) as channel, r.admin() as admin_channel:
        outbox = Outbox(hello("db", "db", "198.18.0.11"))
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect(outbox.drain())
        await asyncio.wait_for(call.read(), 5)
        # Renewal over the existing stream.
        await outbox.queue.put(
            agent_pb2.AgentMessage(
                renew=agent_pb2.RenewCertificate(csr_pem=make_csr(generate_key(), "db").decode())
            )
        )
        renewed = await asyncio.wait_for(call.read(), 5)
        assert renewed.WhichOneof("body") == "certificate"
        assert renewed.certificate.certificate_pem != issued.certificate_pem
        # Revocation cuts the live stream at once.
        admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
        started = time.monotonic()
        revoked = await admin.RevokeAgent(admin_pb2.RevokeAgentRequest(agent_id="db"))
        assert revoked.certificates == 2
        details = await expect_status(call.read(), grpc.StatusCode.UNAUTHENTICATED)
        assert time.monotonic() - started < 1.0
        assert "revoked" in details
        listed = await admin.ListAgents(admin_pb2.ListAgentsRequest())
        assert listed.agents[0].revoked
    # ... and the certificate is refused from then on.
    async with r.channel(credentials) as channel:
        again = agent_pb2_grpc.AgentServiceStub(channel).Connect(
            Outbox(hello("db", "db", "198.18.0.11")).drain()
        )
        assert "revoked" in await expect_status(again.read(), grpc.StatusCode.UNAUTHENTICATED)
    # Re-enrolling needs a new token; the old identity's certificates are all revoked.
    token2, _ = r.core.enrollment.create_token({}, 600, 1, actor="operator:test")
    await _enroll(r, token2, "db")


@scenario
async def test_enrolling_an_id_that_is_already_live_is_refused(r: Running) -> None:
    first, _ = r.core.enrollment.create_token({}, 600, 1, actor="operator:test")
    second, _ = r.core.enrollment.create_token({}, 600, 1, actor="operator:test")
    await _enroll(r, first, "web")
    details = await expect_status(_enroll(r, second, "web"), grpc.StatusCode.FAILED_PRECONDITION)
    assert "already enrolled" in details


@scenario
async def test_first_message_must_be_hello(r: Running) -> None:
    async with r.agent("db") as channel:
        beat = agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sent_unix_ms=1))
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect(Outbox(beat).drain())
        details = await expect_status(call.read(), grpc.StatusCode.INVALID_ARGUMENT)
        assert "first message must be hello" in details


@scenario
async def test_invalid_apply_is_invalid_argument_with_field(r: Running) -> None:
    async with r.admin() as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        bad = json.loads(json.dumps(POLICY))
        bad["spec"]["rules"][0]["to"] = {"cidr": "198.18.0.300/24"}
        details = await expect_status(
            admin.Apply(admin_pb2.ApplyRequest(documents=[json.dumps(bad)])),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "spec.rules[0].to" in details
        listed = await admin.ListResources(admin_pb2.ListResourcesRequest(kind="Policy"))
        assert list(listed.resources) == []
        await expect_status(
            admin.DescribeAgent(admin_pb2.DescribeAgentRequest(agent_id="nope")),
            grpc.StatusCode.NOT_FOUND,
        )


@scenario
async def test_bad_address_update_ends_the_stream_with_the_reason(r: Running) -> None:
    async with r.agent("db") as channel:
        bad = agent_pb2.AgentMessage(addresses=agent_pb2.AddressUpdate(addresses=["not-an-ip"]))
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect(
            Outbox(hello("db", "db", "198.18.0.11"), bad).drain()
        )

        async def read_until_error() -> None:
            while True:
                await asyncio.wait_for(call.read(), 5)

        details = await expect_status(read_until_error(), grpc.StatusCode.INVALID_ARGUMENT)
        assert "addresses[0]" in details


def test_second_controller_cannot_share_the_port(tmp_path: Path) -> None:
    async def body() -> None:
        ca = CertificateAuthority.load_or_create(tmp_path / "pki")
        first = grpc.aio.server(options=SERVER_OPTIONS)
        port = first.add_secure_port("127.0.0.1:0", server_credentials(ca))
        await first.start()
        try:
            second = grpc.aio.server(options=SERVER_OPTIONS)
            with pytest.raises(RuntimeError):
                second.add_secure_port(f"127.0.0.1:{port}", server_credentials(ca))
        finally:
            await first.stop(None)

    asyncio.run(body())


@scenario
async def test_a_ca_signed_certificate_never_recorded_is_refused(r: Running) -> None:
    # Signed by the controller's CA but never issued through it (e.g. an organisation CA
    # given with --ca-cert that also signs other things): no Bulkhead identity.
    async with r.channel(operator_credentials(r.ca, "stranger", "admin")) as channel:
        details = await expect_status(
            admin_pb2_grpc.AdminServiceStub(channel).ListAgents(admin_pb2.ListAgentsRequest()),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert "not issued by this controller" in details


@scenario
async def test_flow_reports_are_acknowledged_and_one_sent_again_counts_once(r: Running) -> None:
    now_ms = int(time.time() * 1000)
    report = agent_pb2.FlowReport(
        flows=[
            agent_pb2.Flow(
                direction=agent_pb2.FLOW_DIRECTION_INBOUND, local_address="198.18.0.11",
                peer_address="198.18.0.10", port=5432, protocol="tcp",
                verdict=agent_pb2.VERDICT_ALLOWED, count=3, first_seen_unix_ms=now_ms,
                last_seen_unix_ms=now_ms,
            )
        ],
        epoch=42, sequence=1,
    )  # fmt: skip
    bad = agent_pb2.FlowReport(flows=[report.flows[0]], epoch=42, sequence=2)
    bad.flows[0].port = 0

    async def send_and_read_acks(*reports: agent_pb2.FlowReport) -> list[agent_pb2.FlowsStored]:
        async with r.agent("db") as channel:
            outbox = Outbox(hello("db", "db", "198.18.0.11"))
            call = agent_pb2_grpc.AgentServiceStub(channel).Connect(outbox.drain())
            assert (await asyncio.wait_for(call.read(), 5)).WhichOneof("body") == "snapshot"
            for sent in reports:
                await outbox.queue.put(agent_pb2.AgentMessage(flows=sent))
            acks = [(await asyncio.wait_for(call.read(), 5)).flows_stored for _ in reports]
            call.cancel()
            return acks

    # The first stream "breaks" after the controller stored the report: it comes again.
    assert [a.sequence for a in await send_and_read_acks(report)] == [1]
    again, refused = await send_and_read_acks(report, bad)
    assert (again.epoch, again.sequence, again.error) == (42, 1, "")
    assert refused.sequence == 2
    assert "flows[0].port: 0 is not a port number" in refused.error, "and the stream stayed up"
    async with r.admin() as admin_channel:
        admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
        listed = await admin.ListFlows(admin_pb2.ListFlowsRequest())
    assert [f.count for f in listed.flows] == [3]
