"""Replay of issue 17's "unseen guessing" against a real controller process: thousands of
enrollments with wrong secrets from one source.

Before, all 14,330 attempts of the attack were answered, and nothing logged, counted or
audited them. Now the source is throttled after its allowance of failures, the failures
show in the log (a few lines, not thousands), in a metric and in one audit entry, the
store is untouched, and another source enrolls as usual.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import sqlite3
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc

from agent.keytool import generate_key, make_csr
from bulkhead.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from tests.controller_process import ControllerProcess, forwarded_from, running_controller

FAILURES_PER_MINUTE = 6  # one more every 10 s once spent
ATTEMPTS = 3_000
IN_FLIGHT = 100
CALL_DEADLINE_S = 10.0
ATTACK_BOUND_S = 120.0
RETRY_BOUND_S = 60.0  # waiting for the allowance to refill, never an assertion
OTHER_SOURCE = "127.0.0.2"

Snapshot = dict[str, list[tuple[object, ...]]]


def store_snapshot(controller: ControllerProcess) -> Snapshot:
    """What a guessed enrollment would change: tokens (used counts), agents, certificates."""
    database = sqlite3.connect(f"file:{controller.state_dir / 'controller.db'}?mode=ro", uri=True)
    try:
        return {
            table: database.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("tokens", "agents", "certificates")
        }
    finally:
        database.close()


def audit_actions(controller: ControllerProcess) -> list[tuple[str, str, str]]:
    database = sqlite3.connect(f"file:{controller.state_dir / 'controller.db'}?mode=ro", uri=True)
    try:
        rows = database.execute("SELECT actor, action, target FROM audit ORDER BY id").fetchall()
    finally:
        database.close()
    return [(str(actor), str(action), str(target)) for actor, action, target in rows]


def metric(controller: ControllerProcess, name: str, labels: str = "") -> float:
    url = f"http://127.0.0.1:{controller.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name}{labels} not in the metrics:\n{text}"
    return float(found.group(1))


def enroll_request(token: str, agent_id: str) -> agent_pb2.EnrollRequest:
    csr = make_csr(generate_key(), agent_id).decode()
    return agent_pb2.EnrollRequest(token=token, agent_id=agent_id, csr_pem=csr, hostname=agent_id)


async def create_token(controller: ControllerProcess) -> str:
    async with controller.admin_channel() as channel:
        created = await admin_pb2_grpc.AdminServiceStub(channel).CreateToken(
            admin_pb2.CreateTokenRequest(labels={"app": "web"}, ttl_seconds=3600, uses=2),
            timeout=CALL_DEADLINE_S,
        )
    return str(created.token)


async def enroll(channel: grpc.aio.Channel, request: agent_pb2.EnrollRequest) -> grpc.StatusCode:
    try:
        await agent_pb2_grpc.EnrollmentServiceStub(channel).Enroll(request, timeout=CALL_DEADLINE_S)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def guess(controller: ControllerProcess, token: str) -> Counter[grpc.StatusCode]:
    """ATTEMPTS enrollments with the real token id and random secrets, IN_FLIGHT at a time."""
    token_id, _, fingerprint = token.split(".")
    # One CSR for all: the store is refused before it would be read.
    request = enroll_request(token, "guesser")
    codes: Counter[grpc.StatusCode] = Counter()
    async with controller.anonymous_channel() as channel:
        for start in range(0, ATTEMPTS, IN_FLIGHT):
            batch = []
            for _ in range(min(IN_FLIGHT, ATTEMPTS - start)):
                wrong = agent_pb2.EnrollRequest()
                wrong.CopyFrom(request)
                wrong.token = f"{token_id}.{secrets.token_urlsafe(32)}.{fingerprint}"
                batch.append(enroll(channel, wrong))
            codes.update(await asyncio.gather(*batch))
    return codes


async def enroll_from(
    controller: ControllerProcess, source: str, token: str, agent_id: str
) -> grpc.StatusCode:
    async with (
        forwarded_from(source, controller.enroll_listen) as address,
        controller.anonymous_channel(address) as channel,
    ):
        return await enroll(channel, enroll_request(token, agent_id))


async def enroll_when_allowed(controller: ControllerProcess, token: str) -> grpc.StatusCode:
    """Enroll from 127.0.0.1 with the right token, retrying while the source is throttled."""
    deadline = time.monotonic() + RETRY_BOUND_S
    async with controller.anonymous_channel() as channel:
        while True:
            code = await enroll(channel, enroll_request(token, "web-1"))
            if code != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                return code
            await asyncio.sleep(1)


def test_guessing_secrets_is_throttled_counted_logged_and_changes_nothing(
    tmp_path: Path,
) -> None:
    failures_per_minute = str(FAILURES_PER_MINUTE)
    with running_controller(
        tmp_path, "--enroll-failures-per-minute", failures_per_minute
    ) as controller:

        async def attack() -> None:
            token = await create_token(controller)
            before = store_snapshot(controller)

            codes = await asyncio.wait_for(guess(controller, token), ATTACK_BOUND_S)

            refused = codes[grpc.StatusCode.RESOURCE_EXHAUSTED]
            failed = codes[grpc.StatusCode.UNAUTHENTICATED]
            assert failed + refused == ATTEMPTS, codes
            # The allowance, plus one per 10 s the attack lasted: far from all of them.
            assert FAILURES_PER_MINUTE <= failed < 100, codes
            assert store_snapshot(controller) == before
            assert (
                metric(
                    controller,
                    "bulkhead_controller_enrollment_failures_total",
                    '{code="UNAUTHENTICATED"}',
                )
                == failed
            )
            assert metric(controller, "bulkhead_controller_enrollment_throttled_total") == refused

            # Another source is not throttled: its host enrolls at once.
            assert await enroll_from(controller, OTHER_SOURCE, token, "db-1") == grpc.StatusCode.OK
            # The guessing source, with the right token, once its allowance refills.
            assert await enroll_when_allowed(controller, token) == grpc.StatusCode.OK

        asyncio.run(attack())
        audit = audit_actions(controller)
        log = controller.log_text()

    assert audit.count(("controller", "enrollment.throttled", "source/127.0.0.1")) == 1
    assert [entry for entry in audit if entry[1] == "enrollment.throttled"] == [
        ("controller", "enrollment.throttled", "source/127.0.0.1")
    ]
    lines = [line for line in log.splitlines() if "enrollment from 127.0.0.1" in line]
    assert len(lines) == 2, lines  # the first failure and the throttle, not thousands
    assert "failed: UNAUTHENTICATED 'token: not issued by this controller'" in lines[0]
    assert "throttled" in lines[1]
    assert "enrollment from 127.0.0.2" not in log
