"""Deeply nested input through the real gRPC Apply: refused as INVALID_ARGUMENT, not a crash.

Replays issue 17's "Recursion" attack: a selector nested 300 deep, or 100,000 `!`s, used
to fail as UNKNOWN with a traceback in the controller log. Each refusal must leave the
stored resources, the revision and the audit log as they were, and log no traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from bulkhead.v1 import admin_pb2, admin_pb2_grpc
from tests.unit.test_controller_grpc import POLICY, Running, expect_status, start

Stub = Any  # the generated AdminServiceStub is untyped


def policy_with_selector(selector: str) -> str:
    rule = {"from": {"selector": selector}, "to": {"app": "db"}, "ports": ["tcp/5432"]}
    document = {**POLICY, "metadata": {"name": "deep"}, "spec": {"rules": [rule]}}
    return json.dumps(document)


async def stored_state(r: Running, admin: Stub) -> object:
    """Every stored resource with its revision, the current revision, and the audit log."""
    resources = [r.core.list_resources(kind) for kind in ("Policy", "IPList")]
    # A dry run of an unchanged document answers the current revision and stores nothing.
    unchanged = admin_pb2.ApplyRequest(documents=[json.dumps(POLICY)], dry_run=True)
    revision = (await admin.Apply(unchanged)).revision
    audit = [(a.actor, a.action, a.target, a.detail) for a in r.core.audit(0, 1000)]
    return resources, revision, audit


def run_against_controller(
    tmp_path: Path, body: Callable[[Running, Stub], Awaitable[None]]
) -> None:
    """Run BODY with an admin stub against a fresh controller that holds one policy."""

    async def main() -> None:
        server, running = await start(tmp_path)
        try:
            async with running.admin() as channel:
                admin = admin_pb2_grpc.AdminServiceStub(channel)
                await admin.Apply(admin_pb2.ApplyRequest(documents=[json.dumps(POLICY)]))
                await body(running, admin)
        finally:
            await server.stop(None)

    asyncio.run(main())


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()
        assert "Traceback" not in record.getMessage()
    assert "Traceback" not in caplog.text


def refused_apply(tmp_path: Path, caplog: pytest.LogCaptureFixture, documents: list[str]) -> str:
    """Apply DOCUMENTS, expect INVALID_ARGUMENT and no change; return the status details."""
    caplog.set_level(logging.DEBUG)
    details: list[str] = []

    async def body(r: Running, admin: Stub) -> None:
        before = await stored_state(r, admin)
        call = admin.Apply(admin_pb2.ApplyRequest(documents=documents))
        details.append(await expect_status(call, grpc.StatusCode.INVALID_ARGUMENT))
        assert await stored_state(r, admin) == before

    run_against_controller(tmp_path, body)
    assert_no_traceback(caplog)
    return details[0]


def test_a_selector_nested_300_deep_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    details = refused_apply(tmp_path, caplog, [policy_with_selector("(" * 300 + "a" + ")" * 300)])
    assert details.startswith("document 1 (Policy deep): spec.rules[0].from.selector: ")
    assert "nested deeper than 32 levels of '(' and '!' at column 33" in details
    assert len(details) < 300  # the selector is quoted shortened, not whole


def test_a_selector_of_100000_negations_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    details = refused_apply(tmp_path, caplog, [policy_with_selector("!" * 100_000 + "a")])
    assert details.startswith("document 1 (Policy deep): spec.rules[0].from.selector: ")
    assert details.endswith("100001 characters; a selector may have at most 16384")


def test_a_chain_of_negations_within_the_length_limit_is_refused_for_depth(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    details = refused_apply(tmp_path, caplog, [policy_with_selector("!" * 10_000 + "a")])
    assert details.endswith("nested deeper than 32 levels of '(' and '!' at column 33")


def test_a_document_nested_100000_deep_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    details = refused_apply(tmp_path, caplog, [json.dumps(POLICY), deep])
    assert details == (
        "document 2: nested deeper than 32 levels of mappings and lists at line 1 column 33"
    )


UNEXPECTED = {
    "recursion": (
        RecursionError("maximum recursion depth exceeded"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "the request is nested too deeply to process",
    ),
    "bug": (
        KeyError("bug"),
        grpc.StatusCode.INTERNAL,
        "internal error (KeyError); the controller log has details",
    ),
}


@pytest.mark.parametrize("case", UNEXPECTED)
def test_an_unexpected_exception_is_mapped_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    # Stands for any bug or parser limit not yet found: gRPC alone would answer UNKNOWN
    # with the exception's text and log its traceback on every call.
    raised, code, details = UNEXPECTED[case]
    caplog.set_level(logging.DEBUG)

    async def body(r: Running, admin: Stub) -> None:
        def fail(*args: object, **kwargs: object) -> None:
            raise raised

        monkeypatch.setattr(r.core, "apply", fail)
        call = admin.Apply(admin_pb2.ApplyRequest(documents=[json.dumps(POLICY)]))
        assert await expect_status(call, code) == details

    run_against_controller(tmp_path, body)
    mapped = [rec for rec in caplog.records if rec.name == "controller.server.errors"]
    assert len(mapped) == 1
    # A bug keeps its one traceback for whoever fixes it; a recursion limit needs none.
    assert (mapped[0].exc_info is not None) == (case == "bug")
    others = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert others == mapped, [rec.getMessage() for rec in others]
