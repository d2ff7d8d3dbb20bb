"""Property-based: malformed and oversized input to the controller ends in a clear
validation error and leaves the stored state exactly as it was."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkhead.v1 import agent_pb2, agent_pb2_grpc
from controller.core import Controller
from controller.errors import InvalidArgument
from controller.resource_catalog import MAX_DOCUMENT_BYTES
from controller.server.agent_servicer import AgentServicer
from tests.pki_support import (
    CHANNEL_OPTIONS,
    agent_credentials,
    make_controller,
    server_credentials,
)

VALID = {
    "apiVersion": "bulkhead/v1",
    "kind": "Policy",
    "metadata": {"name": "web-db"},
    "spec": {"rules": [{"from": {"app": "web"}, "to": {"app": "db"}, "ports": ["tcp/5432"]}]},
}
ACTOR = "operator:fuzz"
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (dict keys and list indexes)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


@st.composite
def mutated_policies(draw: st.DrawFn) -> Any:
    """The valid policy with one place replaced by an arbitrary JSON value."""
    document = json.loads(json.dumps(VALID))
    path = draw(st.sampled_from(_paths(document)[1:]))
    target = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = draw(json_values)
    return document


def _snapshot(core: Controller) -> tuple[Any, ...]:
    return (
        core.list_resources("Policy"),
        core.list_resources("IPList"),
        [(a.agent_id, core.desired(a.agent_id).hash) for a in core.agents()],
    )


# Every controller's state goes under one directory, removed when the module is done.
_SCRATCH = tempfile.TemporaryDirectory(prefix="bh-fuzz-")


@pytest.fixture(autouse=True, scope="module")
def _remove_scratch() -> Iterator[None]:
    yield
    _SCRATCH.cleanup()


def _fresh() -> Controller:
    core = make_controller(Path(tempfile.mkdtemp(dir=_SCRATCH.name)))
    core.apply([json.dumps({**VALID, "metadata": {"name": "existing"}})], actor=ACTOR)
    return core


def _refusal(action: Callable[[], object]) -> InvalidArgument | None:
    """The validation error ACTION raised, or None if it was accepted."""
    try:
        action()
    except InvalidArgument as exc:
        return exc
    return None


def _check(core: Controller, documents: list[str]) -> None:
    before = _snapshot(core)
    refused = _refusal(lambda: core.apply(documents, actor=ACTOR))
    if refused is None:
        return
    assert refused.problems, "an error with no explanation"
    for line in refused.problems:
        assert line.strip(), "an empty error line"
        assert "Traceback" not in line
        assert len(line) < 600, f"an unreadable error line: {line[:200]}..."
    assert _snapshot(core) == before, "a refused apply changed the stored state"


CORE = _fresh()


@SETTINGS
@given(mutated_policies())
def test_mutated_policies_are_stored_whole_or_refused_clearly(document: Any) -> None:
    _check(CORE, [json.dumps(document)])


@SETTINGS
@given(json_values)
def test_arbitrary_json_documents_are_refused_clearly(document: Any) -> None:
    _check(CORE, [json.dumps(document)])


@SETTINGS
@given(st.text(max_size=200))
def test_arbitrary_text_documents_are_refused_clearly(text: str) -> None:
    _check(CORE, [text])


@SETTINGS
@given(st.lists(mutated_policies(), min_size=2, max_size=4))
def test_a_batch_with_one_bad_document_stores_nothing(documents: list[Any]) -> None:
    batch = [json.dumps({**VALID, "metadata": {"name": "batch-ok"}})]
    _check(CORE, batch + [json.dumps(d) for d in documents])


def test_oversized_documents_and_batches_are_refused() -> None:
    core = _fresh()
    before = _snapshot(core)
    huge = json.loads(json.dumps(VALID))
    huge["spec"]["rules"] = huge["spec"]["rules"] * (MAX_DOCUMENT_BYTES // 60)
    for documents in (
        [json.dumps(huge)],
        [json.dumps(VALID)] * 1001,
        ["x" * (2 * MAX_DOCUMENT_BYTES)],
    ):
        refused = _refusal(partial(core.apply, documents, actor=ACTOR))
        assert refused is not None, "an oversized apply was accepted"
        assert "at most" in str(refused)
    assert _snapshot(core) == before


hello_fields = st.fixed_dictionaries(
    {
        "agent_id": st.text(max_size=70),
        "hostname": st.text(max_size=70),
        "labels": st.dictionaries(st.text(max_size=70), st.text(max_size=70), max_size=5),
        "addresses": st.lists(st.text(max_size=45), max_size=5),
        "applied_hash": st.text(max_size=70),
        "applied_revision": st.integers(min_value=0, max_value=2**64 - 1),
        "mode": st.integers(min_value=0, max_value=5),
    }
)


@SETTINGS
@given(hello_fields)
def test_arbitrary_hellos_connect_or_are_refused_clearly(fields: dict[str, Any]) -> None:
    before = _snapshot(CORE)
    hello = agent_pb2.Hello(**fields)
    sessions = []
    refused = _refusal(lambda: sessions.append(CORE.connect("fuzz-agent", hello)))
    for session in sessions:
        CORE.disconnect(session)
    if refused is not None:
        assert refused.problems
        assert all(line.startswith("hello.") for line in refused.problems), refused.problems
        assert _snapshot(CORE) == before


async def _final_status(call: Any) -> grpc.StatusCode | None:
    """How the stream ended: its error status, or None if it answered normally."""
    try:
        await asyncio.wait_for(call.read(), 5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return None


@SETTINGS
@given(st.binary(max_size=300))
def test_undecodable_bytes_on_the_wire_change_nothing(payload: bytes) -> None:
    """Raw bytes as an agent message: a status, never a crash, never a change."""

    async def body() -> None:
        with tempfile.TemporaryDirectory(prefix="bh-fuzz-") as directory:
            core = make_controller(Path(directory))
            from controller.pki import CertificateAuthority

            ca = CertificateAuthority.load_or_create(Path(directory) / "pki")
            server = grpc.aio.server()
            agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(core), server)
            port = server.add_secure_port("127.0.0.1:0", server_credentials(ca))
            await server.start()
            try:
                async with grpc.aio.secure_channel(
                    f"127.0.0.1:{port}",
                    agent_credentials(ca, "fuzz", core),
                    options=CHANNEL_OPTIONS,
                ) as channel:
                    raw = channel.stream_stream(
                        "/bulkhead.v1.AgentService/Connect",
                        request_serializer=None,
                        response_deserializer=None,
                    )

                    async def one() -> Any:
                        yield payload

                    call = raw(one())
                    code = await _final_status(call)
                    call.cancel()
                # Bytes that decode as a valid hello connect "fuzz"; nothing else changes.
                assert code in (grpc.StatusCode.INVALID_ARGUMENT, None), code
                assert all(a.agent_id == "fuzz" for a in core.agents())
            finally:
                await server.stop(None)

    asyncio.run(body())
