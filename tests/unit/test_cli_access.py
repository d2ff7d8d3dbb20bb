"""`bulkhead token ...`, `bulkhead agent revoke` and `bulkhead audit` over mutual TLS,
against the fake AdminService of cli_support.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkhead.v1 import admin_pb2
from tests.unit.cli_support import FakeAdmin, error_lines, run, serving_fake_admin

# 2100-01-01 and 2020-01-01 (UTC): after and before any day the tests run.
FUTURE_MS = 4_102_444_800_000
PAST_MS = 1_577_836_800_000


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[FakeAdmin]:
    with serving_fake_admin(tmp_path) as fake:
        yield fake


def _token_info(
    token_id: str,
    *,
    labels: dict[str, str] | None = None,
    uses: int = 1,
    used: int = 0,
    expires_unix_ms: int = FUTURE_MS,
    revoked: bool = False,
) -> admin_pb2.TokenInfo:
    return admin_pb2.TokenInfo(
        token_id=token_id,
        labels=labels,
        uses=uses,
        used=used,
        expires_unix_ms=expires_unix_ms,
        revoked=revoked,
        created_by="operator:alice",
        created_unix_ms=PAST_MS,
    )


def _created(admin: FakeAdmin) -> None:
    admin.responses["CreateToken"] = admin_pb2.CreateTokenResponse(
        token="bh1.tok-1.secret",
        info=_token_info("tok-1", labels={"app": "web"}, uses=3),
    )


def test_token_create_prints_only_the_token_on_stdout(admin: FakeAdmin) -> None:
    _created(admin)

    result = run(
        admin.target, "token", "create", "--labels", "app=web,env=prod", "--ttl", "2d",
        "--uses", "3",
    )  # fmt: skip

    assert result.exit_code == 0, result.stderr
    assert result.stdout == "bh1.tok-1.secret\n"
    request = admin.only_request("CreateToken")
    assert dict(request.labels) == {"app": "web", "env": "prod"}
    assert (request.ttl_seconds, request.uses) == (2 * 86_400, 3)
    [note] = result.stderr.splitlines()
    assert note.startswith("token tok-1: expires in ")
    assert "(2100-01-01 00:00:00 UTC), 3 uses, labels app=web" in note


def test_token_create_defaults_to_one_use_for_an_hour(admin: FakeAdmin) -> None:
    _created(admin)

    result = run(admin.target, "token", "create")

    assert result.exit_code == 0, result.stderr
    request = admin.only_request("CreateToken")
    assert (dict(request.labels), request.ttl_seconds, request.uses) == ({}, 3_600, 1)


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [("90s", 90), ("10m", 600), ("1h", 3_600), ("45", 45), ("30d", 30 * 86_400)],
)
def test_token_create_ttl_forms(admin: FakeAdmin, ttl: str, seconds: int) -> None:
    _created(admin)

    result = run(admin.target, "token", "create", "--ttl", ttl)

    assert result.exit_code == 0, result.stderr
    assert admin.only_request("CreateToken").ttl_seconds == seconds


@pytest.mark.parametrize(
    ("ttl", "problem"),
    [
        ("0", "the duration must be longer than 0 seconds"),
        ("40d", "the duration can be at most 30d"),
        ("abc", "expected a duration like 90s, 10m, 1h, 2d or a number of seconds"),
    ],
)
def test_token_create_bad_ttl_is_refused_without_a_call(
    admin: FakeAdmin, ttl: str, problem: str
) -> None:
    result = run(admin.target, "token", "create", "--ttl", ttl)

    assert result.exit_code == 2
    assert error_lines(result) == [f"error: --ttl {ttl!r}: {problem}"]
    assert admin.requests == []


def test_token_create_bad_labels_are_refused_without_a_call(admin: FakeAdmin) -> None:
    result = run(admin.target, "token", "create", "--labels", "app=web,prod")

    assert result.exit_code == 2
    assert error_lines(result) == [
        "error: --labels item 'prod': expected key=value (comma separated)"
    ]
    assert admin.requests == []


def test_token_create_json_is_the_whole_response(admin: FakeAdmin) -> None:
    _created(admin)

    result = run(admin.target, "token", "create", "-o", "json")

    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["token"] == "bh1.tok-1.secret"
    assert data["info"]["token_id"] == "tok-1"
    assert data["info"]["uses"] == 3


def test_token_list_shows_each_state(admin: FakeAdmin) -> None:
    admin.responses["ListTokens"] = admin_pb2.ListTokensResponse(
        tokens=[
            _token_info("tok-active", labels={"app": "web"}, uses=2, used=1),
            _token_info("tok-used", used=1),
            _token_info("tok-expired", expires_unix_ms=PAST_MS),
            _token_info("tok-revoked", revoked=True, used=1),
        ]
    )

    result = run(admin.target, "token", "list")

    assert result.exit_code == 0, result.stderr
    admin.only_request("ListTokens")
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line}
    assert rows["ID"] == ["ID", "LABELS", "USED/USES", "EXPIRES", "STATE", "CREATED", "BY"]
    active = rows["tok-active"]
    assert active[:3] == ["tok-active", "app=web", "1/2"]
    assert active[-2:] == ["active", "operator:alice"]
    expires = " ".join(active[3:-2])
    assert expires.startswith("in ")
    assert expires.endswith(" (2100-01-01 00:00:00 UTC)")
    assert rows["tok-used"][-2] == "used"
    assert rows["tok-expired"][-2] == "expired"
    assert " ".join(rows["tok-expired"][3:-2]).endswith(" ago (2020-01-01 00:00:00 UTC)")
    assert rows["tok-revoked"][-2] == "revoked"


def test_token_list_empty(admin: FakeAdmin) -> None:
    admin.responses["ListTokens"] = admin_pb2.ListTokensResponse()

    result = run(admin.target, "token", "list")

    assert result.exit_code == 0, result.stderr
    assert result.stdout == "No tokens.\n"


def test_token_revoke(admin: FakeAdmin) -> None:
    admin.responses["RevokeToken"] = admin_pb2.RevokeTokenResponse()

    result = run(admin.target, "token", "revoke", "tok-1")

    assert result.exit_code == 0, result.stderr
    assert admin.only_request("RevokeToken").token_id == "tok-1"
    assert result.stdout == "token tok-1 revoked\n"


@pytest.mark.parametrize(("count", "noun"), [(2, "certificates"), (1, "certificate")])
def test_agent_revoke_prints_how_many_certificates(admin: FakeAdmin, count: int, noun: str) -> None:
    admin.responses["RevokeAgent"] = admin_pb2.RevokeAgentResponse(certificates=count)

    result = run(admin.target, "agent", "revoke", "web-1")

    assert result.exit_code == 0, result.stderr
    assert admin.only_request("RevokeAgent").agent_id == "web-1"
    assert result.stdout == f"agent/web-1 revoked: {count} {noun} revoked\n"


def _audit() -> admin_pb2.ListAuditResponse:
    return admin_pb2.ListAuditResponse(
        entries=[
            admin_pb2.AuditEntry(
                at_unix_ms=PAST_MS + 61_000,
                actor="operator:alice",
                action="token.create",
                target="token:tok-1",
                detail=json.dumps({"labels": {"app": "web"}, "uses": 1}, indent=2),
            ),
            admin_pb2.AuditEntry(
                at_unix_ms=PAST_MS + 62_000,
                actor="operator:alice",
                action="policy.apply",
                target="policy/web-db",
                detail=json.dumps({"documents": ["x" * 200]}),
            ),
        ]
    )


def test_audit_table_has_compact_and_cut_details(admin: FakeAdmin) -> None:
    admin.responses["ListAudit"] = _audit()

    result = run(admin.target, "audit")

    assert result.exit_code == 0, result.stderr
    request = admin.only_request("ListAudit")
    assert (request.since_unix_ms, request.limit) == (0, 0)
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert lines[0] == "TIME (UTC) ACTOR ACTION TARGET DETAIL"
    assert (
        "2020-01-01 00:01:01 operator:alice token.create token:tok-1 "
        '{"labels":{"app":"web"},"uses":1}'
    ) in lines
    [cut] = [line for line in lines if "policy.apply" in line]
    assert cut.endswith("xxx…")
    assert len(cut.split()[-1]) == 80


def test_audit_json_keeps_the_full_detail(admin: FakeAdmin) -> None:
    admin.responses["ListAudit"] = _audit()

    result = run(admin.target, "audit", "-o", "json")

    assert result.exit_code == 0, result.stderr
    detail = json.loads(result.stdout)["entries"][1]["detail"]
    assert json.loads(detail) == {"documents": ["x" * 200]}


def test_audit_since_and_limit_become_the_request(admin: FakeAdmin) -> None:
    admin.responses["ListAudit"] = admin_pb2.ListAuditResponse()

    before_ms = time.time_ns() // 1_000_000
    result = run(admin.target, "audit", "--since", "10m", "--limit", "5")
    after_ms = time.time_ns() // 1_000_000

    assert result.exit_code == 0, result.stderr
    request = admin.only_request("ListAudit")
    assert before_ms - 600_000 <= request.since_unix_ms <= after_ms - 600_000
    assert request.limit == 5
    assert result.stdout == "No audit entries in the last 10m.\n"


def test_audit_bad_since_is_refused_without_a_call(admin: FakeAdmin) -> None:
    result = run(admin.target, "audit", "--since", "yesterday")

    assert result.exit_code == 2
    assert error_lines(result) == [
        "error: --since 'yesterday': expected a duration like 90s, 10m, 1h, 2d "
        "or a number of seconds"
    ]
    assert admin.requests == []


def test_audit_agents_asks_for_agent_events_and_shows_repeats(admin: FakeAdmin) -> None:
    merged = admin_pb2.AuditEntry(
        at_unix_ms=PAST_MS, actor="agent:web", action="agent.tamper", target="agent/web",
        detail="{}", repeated_count=3000,
    )  # fmt: skip
    admin.responses["ListAudit"] = admin_pb2.ListAuditResponse(entries=[merged])

    result = run(admin.target, "audit", "--agents")

    assert result.exit_code == 0, result.stderr
    assert admin.only_request("ListAudit").include_agents
    assert "agent:web agent.tamper (x3000) agent/web" in " ".join(result.stdout.split())
