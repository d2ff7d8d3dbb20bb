"""bulkhead-sim: one simulated agent's answers to controller messages (no network)."""

from __future__ import annotations

import pytest

from bulkhead.v1 import agent_pb2, ruleset_pb2
from bulkhead.v1.contract import ruleset_hash
from controller.sim.agents import ResyncNeeded, SimAgent
from controller.sim.credentials import AgentCredentials


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _agent(clock: FakeClock) -> SimAgent:
    return SimAgent(
        "sim-000001",
        AgentCredentials(b"key", b"cert"),
        b"ca",
        labels={"app": "app1"},
        addresses=["198.18.0.2"],
        controller="127.0.0.1:50151",
        clock=clock,
    )


def _snapshot(
    revision: int, port: int, *, hash_text: str | None = None
) -> agent_pb2.ControllerMessage:
    ruleset = ruleset_pb2.Ruleset(
        sets=[ruleset_pb2.AddressSet(name="peers", hosts=["198.18.0.3"])],
        rules=[
            ruleset_pb2.Rule(
                direction=ruleset_pb2.DIRECTION_INGRESS,
                protocol=ruleset_pb2.PROTOCOL_TCP,
                ports=[ruleset_pb2.PortRange(first=port, last=port)],
                peer_set="peers",
                action=ruleset_pb2.ACTION_ALLOW,
            )
        ],
    )
    snapshot = agent_pb2.PolicySnapshot(
        revision=revision, hash=hash_text or ruleset_hash(ruleset), ruleset=ruleset
    )
    return agent_pb2.ControllerMessage(snapshot=snapshot)


def test_hello_carries_labels_addresses_and_what_was_applied() -> None:
    agent = _agent(FakeClock())
    agent.applied_revision, agent.applied_hash = 7, "abc"
    hello = agent.hello()
    assert (hello.agent_id, dict(hello.labels), list(hello.addresses)) == (
        "sim-000001", {"app": "app1"}, ["198.18.0.2"],
    )  # fmt: skip
    assert (hello.applied_revision, hello.applied_hash) == (7, "abc")


def test_a_snapshot_is_acked_ok_with_its_revision_and_hash_and_its_arrival_kept() -> None:
    clock = FakeClock()
    agent = _agent(clock)
    message = _snapshot(5, 8080)
    answer = agent.handle(message)
    assert answer is not None
    assert answer.ack == agent_pb2.Ack(revision=5, hash=message.snapshot.hash, ok=True)
    assert (agent.applied_revision, agent.applied_hash) == (5, message.snapshot.hash)
    assert agent.arrivals == {5: 100.0}
    assert (agent.up, agent.synced_at) == (True, 100.0)


def test_a_snapshot_whose_hash_does_not_match_is_refused() -> None:
    agent = _agent(FakeClock())
    answer = agent.handle(_snapshot(5, 8080, hash_text="0" * 64))
    assert answer is not None
    assert not answer.ack.ok
    assert "hash" in answer.ack.error
    assert (agent.applied_revision, agent.applied_hash, agent.hash_mismatches) == (0, "", 1)


def test_first_arrival_after_a_revision() -> None:
    clock = FakeClock()
    agent = _agent(clock)
    agent.handle(_snapshot(3, 8080))
    clock.now = 101.0
    agent.handle(_snapshot(9, 8081))
    clock.now = 102.0
    agent.handle(_snapshot(12, 8082))
    assert agent.first_arrival_after(2) == 100.0
    assert agent.first_arrival_after(3) == 101.0
    assert agent.first_arrival_after(12) is None


def test_the_same_revision_keeps_its_first_arrival() -> None:
    clock = FakeClock()
    agent = _agent(clock)
    agent.handle(_snapshot(3, 8080))
    clock.now = 150.0
    agent.handle(_snapshot(3, 8080))
    assert agent.arrivals == {3: 100.0}
    assert agent.snapshots == 2


def test_in_sync_with_what_the_agent_holds_needs_no_answer() -> None:
    agent = _agent(FakeClock())
    snapshot = _snapshot(4, 8080)
    agent.handle(snapshot)
    in_sync = agent_pb2.InSync(revision=4, hash=snapshot.snapshot.hash)
    assert agent.handle(agent_pb2.ControllerMessage(in_sync=in_sync)) is None
    assert agent.in_syncs == 1


def test_in_sync_with_another_hash_asks_for_a_resync() -> None:
    agent = _agent(FakeClock())
    in_sync = agent_pb2.InSync(revision=4, hash="f" * 64)
    with pytest.raises(ResyncNeeded):
        agent.handle(agent_pb2.ControllerMessage(in_sync=in_sync))


def test_a_connections_request_gets_an_empty_table_with_a_reason() -> None:
    agent = _agent(FakeClock())
    request = agent_pb2.ConnectionsRequest(request_id="r1")
    answer = agent.handle(agent_pb2.ControllerMessage(connections_request=request))
    assert answer is not None
    assert answer.connections.request_id == "r1"
    assert not answer.connections.connections
    assert answer.connections.error


def _delta(base: agent_pb2.ControllerMessage, add: str) -> agent_pb2.ControllerMessage:
    after = ruleset_pb2.Ruleset()
    after.CopyFrom(base.snapshot.ruleset)
    after.sets[0].hosts.append(add)
    delta = agent_pb2.PolicyDelta(
        base_revision=base.snapshot.revision, base_hash=base.snapshot.hash,
        revision=base.snapshot.revision + 1, hash=ruleset_hash(after),
        sets=[agent_pb2.SetChange(name="peers", add_hosts=[add])],
    )  # fmt: skip
    return agent_pb2.ControllerMessage(delta=delta)


def test_a_delta_is_applied_to_what_the_agent_holds_and_acked() -> None:
    clock = FakeClock()
    agent = _agent(clock)
    base = _snapshot(4, 8080)
    agent.handle(base)
    clock.now = 101.0
    message = _delta(base, "198.18.0.9")
    answer = agent.handle(message)
    assert answer is not None
    assert answer.ack == agent_pb2.Ack(revision=5, hash=message.delta.hash, ok=True)
    assert list(agent.ruleset.sets[0].hosts) == ["198.18.0.3", "198.18.0.9"]
    assert (agent.deltas, agent.arrivals[5]) == (1, 101.0)


def test_a_delta_against_another_ruleset_asks_for_a_snapshot() -> None:
    agent = _agent(FakeClock())
    base = _snapshot(4, 8080)
    answer = agent.handle(_delta(base, "198.18.0.9"))  # it holds nothing yet
    assert answer is not None
    assert (answer.ack.ok, answer.ack.need_snapshot) == (False, True)
    agent.handle(base)
    forged = _delta(base, "198.18.0.9")
    forged.delta.hash = "0" * 64
    answer = agent.handle(forged)
    assert answer is not None
    assert (answer.ack.ok, answer.ack.need_snapshot, agent.hash_mismatches) == (False, True, 1)
    assert agent.applied_hash == base.snapshot.hash
