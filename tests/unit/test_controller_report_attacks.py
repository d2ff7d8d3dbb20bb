"""Issue 17's report attacks replayed over real mutual TLS by an agent holding its own
certificate: flow injection, a 2^40 count, an audit flood and a renewal flood. Each is
refused, and the tables it aimed at are byte-identical before and after."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from agent.keytool import generate_key, make_csr
from bulkhead.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from controller.enrollment import MAX_RENEWALS_PER_CERTIFICATE, Presented
from controller.metrics import ControllerCollector
from controller.pki import CertificateAuthority, certificate_from_pem, identity_from_certificate
from tests.pki_support import agent_credentials, issued_credentials
from tests.unit.cli_support import Target, run
from tests.unit.test_controller_grpc import POLICY, Outbox, Running, hello, scenario

WEB, DB, NOBODY = "198.18.0.10", "198.18.0.11", "198.18.0.99"
IN = agent_pb2.FLOW_DIRECTION_INBOUND
OUT = agent_pb2.FLOW_DIRECTION_OUTBOUND
NOW_MS = int(time.time() * 1000)  # flows older than the retention (7 days) are pruned


def table(r: Running, name: str) -> list[tuple[object, ...]]:
    """Every row of table NAME, read over a connection of its own (what `sqlite3` shows)."""
    with sqlite3.connect(r.state_dir / "c.db") as db:
        return db.execute(f"SELECT * FROM {name} ORDER BY rowid").fetchall()


def flow(
    local: str, peer: str, direction: agent_pb2.FlowDirection = IN, count: int = 1
) -> agent_pb2.Flow:
    return agent_pb2.Flow(
        direction=direction, local_address=local, peer_address=peer, port=5432,
        protocol="tcp", verdict=agent_pb2.VERDICT_ALLOWED, count=count,
        first_seen_unix_ms=NOW_MS, last_seen_unix_ms=NOW_MS,
    )  # fmt: skip


Call = grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.ControllerMessage]


class Stream:
    """An agent's stream, past its hello and first ruleset."""

    def __init__(self, call: Call, outbox: Outbox) -> None:
        self.call = call
        self.outbox = outbox
        self.sequence = 0
        self.certificates: list[str] = []  # renewed certificates received

    @classmethod
    async def open(cls, channel: grpc.aio.Channel, agent_id: str, address: str) -> Stream:
        outbox = Outbox(hello(agent_id, agent_id, address))
        call: Call = agent_pb2_grpc.AgentServiceStub(channel).Connect(outbox.drain())
        first = await asyncio.wait_for(call.read(), 5)
        assert isinstance(first, agent_pb2.ControllerMessage)
        assert first.WhichOneof("body") in ("snapshot", "in_sync")
        return cls(call, outbox)

    async def read(self) -> agent_pb2.ControllerMessage:
        message = await asyncio.wait_for(self.call.read(), 10)
        assert isinstance(message, agent_pb2.ControllerMessage), "the stream ended"
        return message

    async def send(self, message: agent_pb2.AgentMessage) -> None:
        await self.outbox.queue.put(message)

    async def report(self, *flows: agent_pb2.Flow) -> tuple[agent_pb2.FlowsStored, list[str]]:
        """Send one acknowledged report; its answer, and what the controller sent before
        it (the stream is ordered: everything sent earlier was handled by then)."""
        self.sequence += 1
        sent = agent_pb2.FlowReport(flows=flows, epoch=77, sequence=self.sequence)
        await self.send(agent_pb2.AgentMessage(flows=sent))
        before: list[str] = []
        while (message := await self.read()).WhichOneof("body") != "flows_stored":
            before.append(message.WhichOneof("body") or "")
            if message.WhichOneof("body") == "certificate":
                self.certificates.append(message.certificate.certificate_pem)
        assert message.flows_stored.sequence == self.sequence
        return message.flows_stored, before


# -- flow injection ---------------------------------------------------------------------


@scenario
async def test_flows_for_an_address_the_reporter_does_not_hold_are_refused_whole(
    r: Running,
) -> None:
    async with r.agent("db") as db_channel, r.agent("web") as web_channel:
        db = await Stream.open(db_channel, "db", DB)
        web = await Stream.open(web_channel, "web", WEB)
        stored, _ = await db.report(flow(DB, WEB, count=3))
        assert stored.error == ""
        flows, reports = table(r, "flows"), table(r, "flow_reports")
        assert len(flows) == len(reports) == 1
        async with r.admin() as admin_channel:
            admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
            view = await admin.ListFlows(admin_pb2.ListFlowsRequest())
            # db's own address as the local end: rewriting db's row of web -> db.
            hijack, _ = await web.report(flow(DB, WEB, count=2**20))
            # An address no agent holds, and flows invented between two others.
            invented, _ = await web.report(flow(NOBODY, DB, OUT), flow("203.0.113.9", DB, OUT))
            # One foreign flow among legitimate ones refuses the batch whole.
            mixed, _ = await web.report(flow(WEB, DB, OUT), flow(DB, WEB))
            assert "flows[0].local_address: 198.18.0.11 is not one of this agent's" in hijack.error
            assert "flows[0].local_address: 198.18.0.99" in invented.error
            assert "flows[1].local_address: 203.0.113.9" in invented.error
            assert "flows[1].local_address: 198.18.0.11" in mixed.error
            assert "flows[0]" not in mixed.error
            assert table(r, "flows") == flows
            assert table(r, "flow_reports") == reports
            assert await admin.ListFlows(admin_pb2.ListFlowsRequest()) == view
            assert r.core.observations.refused_by_agent == {("web", "foreign_address"): 3}
            # The stream stayed up, and web's own flows are stored.
            fine, _ = await web.report(flow(WEB, DB, OUT))
            assert fine.error == ""
            assert len(table(r, "flows")) == len(flows) + 1
    metrics = {m.name: m for m in ControllerCollector(r.core).collect()}
    [sample] = metrics["bulkhead_controller_agent_flow_reports_refused"].samples
    assert (sample.labels, sample.value) == ({"agent": "web", "reason": "foreign_address"}, 3)


@scenario
async def test_an_address_accepted_a_moment_ago_is_not_refused(r: Running) -> None:
    async with r.agent("web") as channel:
        web = await Stream.open(channel, "web", WEB)
        r.core.workloads()  # the cached view now lacks the address web is about to add
        await web.send(
            agent_pb2.AgentMessage(addresses=agent_pb2.AddressUpdate(addresses=[WEB, NOBODY]))
        )
        stored, _ = await web.report(flow(NOBODY, DB, OUT))
        assert stored.error == ""
        assert r.core.observations.refused_by_agent == {}


@scenario
async def test_counts_beyond_the_bound_are_refused_and_a_legitimate_report_passes(
    r: Running,
) -> None:
    async with r.agent("web") as channel:
        web = await Stream.open(channel, "web", WEB)
        flows = table(r, "flows")
        huge, _ = await web.report(flow(WEB, DB, OUT, count=2**40))
        assert "flows[0].count: 1099511627776 is not between 1 and 360000000" in huge.error
        # Each flow within the bound, together beyond an hour's budget.
        summed, _ = await web.report(*(flow(WEB, DB, OUT, count=300_000_000) for _ in (1, 2)))
        assert "the counts add up to 600000000, more than the 360000000" in summed.error
        assert table(r, "flows") == flows
        assert r.core.observations.refused_by_agent == {
            ("web", "invalid"): 1,
            ("web", "count_budget"): 1,
        }
        fine, _ = await web.report(flow(WEB, DB, OUT, count=300_000_000))
        assert fine.error == ""
        # What is left of the budget refills at 100,000 a second: not 100,000,000 soon.
        after = table(r, "flows")
        more, _ = await web.report(flow(WEB, DB, OUT, count=100_000_000))
        assert "more than the" in more.error
        assert table(r, "flows") == after
        assert [row[10] for row in after] == [300_000_000]  # the count column


# -- audit flood ------------------------------------------------------------------------


def _operator_files(r: Running) -> Path:
    """Operator credentials on the controller's record, as `admin-cert --out` writes them."""
    cert, key = r.ca.issue_operator("alice", "admin", timedelta(hours=1))
    certificate = certificate_from_pem(cert)
    r.core.enrollment.record_certificate(certificate, identity_from_certificate(certificate).uri)
    directory = r.state_dir / "operator"
    directory.mkdir()
    (directory / "operator.crt").write_bytes(cert)
    (directory / "operator.key").write_bytes(key)
    (directory / "ca.crt").write_bytes(r.ca.certificate_pem)
    return directory


@scenario
async def test_three_thousand_tamper_reports_make_one_row_apart_from_the_operators(
    r: Running,
) -> None:
    async with r.admin() as admin_channel, r.agent("web") as channel:
        admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
        await admin.Apply(admin_pb2.ApplyRequest(documents=[json.dumps(POLICY)]))
        audit = table(r, "audit")
        web = await Stream.open(channel, "web", WEB)
        event = agent_pb2.TamperEvent(detected_unix_ms=5, description="set web_v4 changed")
        for _ in range(3000):
            await web.send(agent_pb2.AgentMessage(tamper=event))
        await web.report(flow(WEB, DB, OUT))  # handled after every tamper report
        # 3,000 tamper reports, and the hello's addresses (one agent.addresses event).
        assert r.core.agent_events.received == 3001
        assert table(r, "audit") == audit, "the operators' audit is untouched"
        assert len(table(r, "agent_events")) <= 3
        default = await admin.ListAudit(admin_pb2.ListAuditRequest())
        assert [e.action for e in default.entries] == ["policy.created"]
        both = await admin.ListAudit(admin_pb2.ListAuditRequest(include_agents=True))
        assert [
            (e.action, e.actor, e.repeated_count)
            for e in both.entries
            if e.action != "agent.addresses"
        ] == [("policy.created", "operator:alice", 0), ("agent.tamper", "agent:web", 3000)]
        target = Target(r.target, _operator_files(r))
        shown = await asyncio.to_thread(run, target, "audit")
        with_agents = await asyncio.to_thread(run, target, "audit", "--agents")
    assert shown.exit_code == 0, shown.stderr
    assert "policy.created" in shown.stdout
    assert "agent.tamper" not in shown.stdout
    assert with_agents.exit_code == 0, with_agents.stderr
    assert "agent.tamper (x3000)" in with_agents.stdout
    assert "policy.created" in with_agents.stdout


# -- renewal flood ----------------------------------------------------------------------


async def _renewal_flood(
    r: Running, ttl: timedelta
) -> tuple[list[tuple[object, ...]], list[str], list[str]]:
    """300 renewal requests on one stream opened with a certificate of TTL: the
    certificates table before them, what came back before the report that follows them,
    and the certificates among it."""
    csr = make_csr(generate_key(), "web").decode()
    async with r.channel(agent_credentials(r.ca, "web", r.core, ttl=ttl)) as channel:
        web = await Stream.open(channel, "web", WEB)
        certificates = table(r, "certificates")
        renew = agent_pb2.AgentMessage(renew=agent_pb2.RenewCertificate(csr_pem=csr))
        for _ in range(300):
            await web.send(renew)
        stored, before = await web.report(flow(WEB, DB, OUT))
        assert stored.error == "", "the stream stayed up"
        web.call.cancel()
        return certificates, before, web.certificates


@scenario
async def test_renewals_before_the_last_third_of_the_life_are_refused(r: Running) -> None:
    certificates, before, _ = await _renewal_flood(r, timedelta(hours=1))
    assert before == [], "no certificate was issued"
    assert table(r, "certificates") == certificates
    [refused] = [e for e in r.core.agent_events.list(0, 10) if e.action != "agent.addresses"]
    assert (refused.action, refused.repeated_count) == ("agent.renewal_refused", 300)
    assert "renewed in the last third" in json.loads(refused.detail)["reason"]


@scenario
async def test_three_hundred_renewals_on_one_stream_issue_one_certificate(r: Running) -> None:
    # A 1 min certificate, backdated 5 min for clock skew: in its last third.
    certificates, before, [issued] = await _renewal_flood(r, timedelta(minutes=1))
    assert before == ["certificate"]
    certificate = x509.load_pem_x509_certificate(issued.encode())
    new_row = (
        format(certificate.serial_number, "x"),
        "spiffe://bulkhead/agent/web",
        int(certificate.not_valid_after_utc.timestamp() * 1000),
        0,
    )
    assert table(r, "certificates") == [*certificates, new_row]
    events = {e.action: e.repeated_count for e in r.core.agent_events.list(0, 10)}
    assert events == {"agent.renewed": 1, "agent.renewal_refused": 299, "agent.addresses": 1}


@pytest.mark.parametrize("ttl", [timedelta(hours=24), timedelta(hours=1), timedelta(minutes=10)])
def test_an_agent_asking_at_two_thirds_with_its_clock_a_little_ahead_is_renewed(
    tmp_path: Path, ttl: timedelta
) -> None:
    credentials = issued_credentials(CertificateAuthority.load_or_create(tmp_path), "web", ttl)
    presented = Presented.of(x509.load_pem_x509_certificate(credentials.cert_pem))
    life = credentials.not_after - credentials.not_before
    asks = credentials.not_before + life * 2 / 3  # the agent's clock (agent/identity.py)
    assert credentials.needs_renewal(asks)
    controller_ms = int((asks - timedelta(seconds=5)).timestamp() * 1000)
    assert presented.renewal_opens_ms() <= controller_ms
    halfway_ms = int((credentials.not_before + life / 2).timestamp() * 1000)
    assert presented.renewal_opens_ms() > halfway_ms


@scenario
async def test_reconnecting_with_one_old_certificate_mints_at_most_three(r: Running) -> None:
    # Each stream may renew once; an attacker keeping the old certificate and opening a
    # new stream each time is held to MAX_RENEWALS_PER_CERTIFICATE across streams.
    credentials = agent_credentials(r.ca, "web", r.core, ttl=timedelta(minutes=1))
    csr = make_csr(generate_key(), "web").decode()
    renew = agent_pb2.AgentMessage(renew=agent_pb2.RenewCertificate(csr_pem=csr))
    issued: list[str] = []
    for _ in range(10):
        async with r.channel(credentials) as channel:
            web = await Stream.open(channel, "web", WEB)
            await web.send(renew)
            await web.report(flow(WEB, DB, OUT))
            issued += web.certificates
            web.call.cancel()
    assert len(issued) == MAX_RENEWALS_PER_CERTIFICATE
    refused = [e for e in r.core.agent_events.list(0, 20) if e.action == "agent.renewal_refused"]
    assert "renewed 3 times already" in json.loads(refused[-1].detail)["reason"]
