"""Deltas on the wire: the controller sends set changes against what the agent
acknowledged, and a complete snapshot whenever it cannot (rules changed, base unknown,
the agent refused)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from bulkhead.v1 import agent_pb2, ruleset_pb2
from bulkhead.v1.contract import apply_set_changes, ruleset_hash
from controller import applied
from controller.core import Controller
from controller.desired import DesiredRuleset, StateMessages, part_digests_of
from controller.errors import Unavailable
from controller.sessions import AgentSession
from controller.store.sqlite_store import SqliteStore
from tests.pki_support import make_trusting_controller

OPERATOR = "operator:test"


def policy(port: int) -> str:
    return json.dumps(
        {
            "apiVersion": "bulkhead/v1",
            "kind": "Policy",
            "metadata": {"name": "web-db"},
            "spec": {
                "rules": [{"from": {"app": "web"}, "to": {"app": "db"}, "ports": [f"tcp/{port}"]}]
            },
        }
    )


def hello(
    agent_id: str, app: str, address: str, held: tuple[int, str] = (0, "")
) -> agent_pb2.Hello:
    return agent_pb2.Hello(
        agent_id=agent_id, hostname=agent_id, labels={"app": app}, addresses=[address],
        applied_revision=held[0], applied_hash=held[1],
    )  # fmt: skip


class FakeAgent:
    """The agent's side: holds a ruleset, applies snapshots and deltas, acks."""

    def __init__(self, core: Controller, agent_id: str, app: str, address: str) -> None:
        self.core, self.agent_id = core, agent_id
        self.app, self.address = app, address
        self.ruleset = ruleset_pb2.Ruleset()
        self.revision, self.hash = 0, ""
        self.kinds: list[str] = []
        self.session = self.connect()

    def connect(self) -> AgentSession:
        held = (self.revision, self.hash)
        self.session = self.core.connect(
            self.agent_id, hello(self.agent_id, self.app, self.address, held)
        )
        return self.session

    def receive(self, *, ack: bool = True) -> str | None:
        """Take and handle the pending message; its kind (None if nothing came)."""
        message = self.session.take()
        if message is None:
            return None
        kind: str | None = message.WhichOneof("body")
        assert kind is not None
        self.kinds.append(kind)
        if kind == "snapshot":
            revision, digest, ruleset = (
                message.snapshot.revision, message.snapshot.hash, message.snapshot.ruleset
            )  # fmt: skip
        elif kind == "delta":
            assert message.delta.base_hash == self.hash, "a delta against what we hold"
            revision, digest = message.delta.revision, message.delta.hash
            ruleset = apply_set_changes(self.ruleset, message.delta.sets)
        else:
            return kind
        assert ruleset_hash(ruleset) == digest
        if ack:
            self.ruleset, self.revision, self.hash = ruleset, revision, digest
            self.core.acknowledged(
                self.agent_id, agent_pb2.Ack(revision=revision, hash=digest, ok=True)
            )
        return kind


def fleet(core: Controller) -> tuple[FakeAgent, FakeAgent]:
    core.apply([policy(5432)], actor=OPERATOR)
    web, db = (
        FakeAgent(core, "web", "web", "198.18.0.10"),
        FakeAgent(core, "db", "db", "198.18.0.11"),
    )
    assert web.receive() == "snapshot"
    assert db.receive() == "snapshot"
    # db connected after web: web's peer set is not involved (web only has egress to db).
    web.receive()
    db.receive()
    return web, db


def test_a_peer_that_moves_reaches_the_agent_as_a_delta_against_its_ack(tmp_path: Path) -> None:
    core = make_trusting_controller(tmp_path)
    _, db = fleet(core)
    core.addresses_changed("web", ["198.18.0.50"])
    assert db.receive() == "delta"
    assert list(db.ruleset.sets[0].hosts) == ["198.18.0.50"]
    assert core.agent("db").applied_hash == core.desired("db").hash
    core.addresses_changed("web", ["198.18.0.51", "2001:db8::51"])
    assert db.receive() == "delta"
    assert list(db.ruleset.sets[0].hosts) == ["198.18.0.51", "2001:db8::51"]
    assert core.pushes.deltas == 2


def test_a_rule_change_is_sent_as_a_snapshot(tmp_path: Path) -> None:
    core = make_trusting_controller(tmp_path)
    _, db = fleet(core)
    core.apply([policy(5433)], actor=OPERATOR)
    assert db.receive() == "snapshot"
    assert db.ruleset.rules[0].ports[0].first == 5433


def test_an_agent_that_cannot_apply_a_delta_gets_a_snapshot(tmp_path: Path) -> None:
    core = make_trusting_controller(tmp_path)
    _, db = fleet(core)
    core.addresses_changed("web", ["198.18.0.50"])
    message = db.session.take()
    assert message is not None
    assert message.WhichOneof("body") == "delta"
    refused = agent_pb2.Ack(
        revision=message.delta.revision, hash=message.delta.hash, ok=False,
        error="delta is against something else", need_snapshot=True,
    )  # fmt: skip
    core.acknowledged("db", refused)
    assert db.receive() == "snapshot"
    assert list(db.ruleset.sets[0].hosts) == ["198.18.0.50"]
    assert core.agent("db").last_error == "", "asking for a snapshot is not a failure"


def test_after_a_failed_apply_the_next_change_is_a_snapshot(tmp_path: Path) -> None:
    core = make_trusting_controller(tmp_path)
    _, db = fleet(core)
    core.addresses_changed("web", ["198.18.0.50"])
    message = db.session.take()
    assert message is not None
    failed = agent_pb2.Ack(
        revision=message.delta.revision, hash=message.delta.hash, ok=False, error="nft: EPERM"
    )
    core.acknowledged("db", failed)
    assert db.session.take() is None, "a refused apply is not retried by itself"
    assert core.agent("db").last_error == "nft: EPERM"
    core.addresses_changed("web", ["198.18.0.51"])
    assert db.receive() == "snapshot", "db still holds the older ruleset, not the delta's base"


def test_the_acknowledged_base_survives_a_controller_restart(tmp_path: Path) -> None:
    core = make_trusting_controller(tmp_path)
    _, db = fleet(core)
    core.flush_last_seen()  # as a stopping controller does (acks are written in batches)
    restarted = make_trusting_controller(tmp_path)
    db.core = restarted
    db.connect()
    assert db.receive() == "in_sync"
    restarted.addresses_changed("web", ["198.18.0.50"])
    assert db.receive() == "delta"


def test_agents_taking_the_same_step_are_sent_one_shared_message(tmp_path: Path) -> None:
    core = make_trusting_controller(tmp_path)
    core.apply([policy(5432)], actor=OPERATOR)
    web = FakeAgent(core, "web", "web", "198.18.0.10")
    replicas = [FakeAgent(core, f"db-{i}", "db", f"198.18.0.{20 + i}") for i in range(3)]
    for agent in (web, *replicas):
        while agent.receive() is not None:
            pass
    # A rule change: the replicas' rulesets are equal, so one snapshot serves all three.
    core.apply([policy(5433)], actor=OPERATOR)
    taken = [agent.session.take() for agent in replicas]
    assert all(message is not None and message.HasField("snapshot") for message in taken)
    assert taken[0] is taken[1] is taken[2]
    for agent, message in zip(replicas, taken, strict=True):
        assert message is not None
        core.acknowledged(agent.agent_id, agent_pb2.Ack(
            revision=message.snapshot.revision, hash=message.snapshot.hash, ok=True,
        ))  # fmt: skip
    # A peer moves: the same delta from the same base, built once.
    core.addresses_changed("web", ["198.18.0.50"])
    deltas = [agent.session.take() for agent in replicas]
    assert all(message is not None and message.HasField("delta") for message in deltas)
    assert deltas[0] is deltas[1] is deltas[2]
    assert core.pushes.snapshots >= 3, "each shared message still counts once per agent"


def test_shared_messages_are_bounded_by_the_size_of_their_rulesets() -> None:
    def state(revision: int, hosts: int) -> DesiredRuleset:
        address_set = ruleset_pb2.AddressSet(
            name="peers", hosts=[f"198.18.{i // 250}.{i % 250}" for i in range(hosts)]
        )
        return DesiredRuleset.from_ruleset(revision, ruleset_pb2.Ruleset(sets=[address_set]))

    small, large = state(1, 10), state(2, 1000)
    messages = StateMessages(budget=large.size + small.size)
    first = messages.step(None, small)
    assert messages.step(None, state(1, 10)) is first, "equal content, equal message"
    messages.step(None, large)
    assert len(messages) == 2
    messages.step(None, state(3, 1000))  # over budget: the least recently used go
    assert len(messages) == 1
    assert messages.step(None, small) is not first


def test_an_agent_holding_something_else_gets_a_snapshot(tmp_path: Path) -> None:
    core = make_trusting_controller(tmp_path)
    _, db = fleet(core)
    db.session.close()
    db.hash = "f" * 64  # e.g. it restored an older saved snapshot
    db.connect()
    assert db.receive() == "snapshot"


def test_acknowledged_rulesets_are_stored_as_shared_parts_and_pruned(tmp_path: Path) -> None:
    core = make_trusting_controller(tmp_path)
    web, _ = fleet(core)
    web_before = set(part_digests_of(core.agent("web").applied_parts))
    second = FakeAgent(core, "db-2", "db", "198.18.0.12")  # holds what db holds
    assert second.receive() == "snapshot"
    assert web.receive() == "delta"  # its set of db members grew
    assert core.agent("db").applied_parts == core.agent("db-2").applied_parts
    held = {d for a in ("web", "db") for d in part_digests_of(core.agent(a).applied_parts)}
    core.flush_last_seen()
    store = SqliteStore(tmp_path / "c.db")
    stale = web_before - held  # web's set before db-2 joined: nobody holds it any more
    assert stale
    assert store.part_digests() == held | stale, "each part once, however many hold it"
    store.close()
    make_trusting_controller(tmp_path)
    store = SqliteStore(tmp_path / "c.db")
    assert store.part_digests() == held, "parts nobody holds are dropped at start"
    store.close()


def test_a_running_controller_drops_parts_nobody_holds_once_they_pile_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(applied, "PARTS_SLACK", 0)
    core = make_trusting_controller(tmp_path)
    _, db = fleet(core)
    for last in range(50, 56):  # web moves six times: db acks six versions of its set
        core.addresses_changed("web", [f"198.18.0.{last}"])
        assert db.receive() == "delta"
    held = {d for a in ("web", "db") for d in part_digests_of(core.agent(a).applied_parts)}
    store = SqliteStore(tmp_path / "c.db")
    assert store.part_digests() > held
    core.flush_last_seen()
    assert store.part_digests() == held
    store.close()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_older_database_is_migrated_keeping_its_agents(tmp_path: Path, version: int) -> None:
    core = make_trusting_controller(tmp_path)
    fleet(core)
    core.flush_last_seen()
    applied = core.agent("db").applied_hash
    assert applied
    assert core.agent("db").applied_parts
    connection = sqlite3.connect(tmp_path / "c.db")
    # The shape of that version: desired state per agent (and, in 2, the applied ruleset).
    old_columns = ["desired_revision INTEGER NOT NULL DEFAULT 0", "desired_hash TEXT NOT NULL "
                   "DEFAULT ''", "desired_ruleset BLOB NOT NULL DEFAULT x''"]  # fmt: skip
    if version == 2:
        old_columns.append("applied_ruleset BLOB NOT NULL DEFAULT x''")
    if version < 3:
        for column in old_columns:
            connection.execute(f"ALTER TABLE agents ADD COLUMN {column}")
        connection.execute("ALTER TABLE agents DROP COLUMN applied_parts")
    # Version 3 had no reported addresses, refusals or allowed ranges.
    for column in ("reported_addresses", "refused_addresses", "allowed_ranges"):
        connection.execute(f"ALTER TABLE agents DROP COLUMN {column}")
    connection.execute("ALTER TABLE tokens DROP COLUMN addresses")
    connection.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
    connection.commit()
    connection.close()
    store = SqliteStore(tmp_path / "c.db")
    migrated = store.get_agent("db")
    assert migrated is not None
    assert migrated.applied_hash == applied
    if version < 3:
        assert migrated.applied_parts == b""  # content unknown: one snapshot after the upgrade
    # What the agent reported before is what it reports until it says otherwise.
    assert migrated.reported_addresses == migrated.addresses == ["198.18.0.11"]
    assert migrated.allowed_ranges == []
    store.close()
    connection = sqlite3.connect(tmp_path / "c.db")
    assert (
        connection.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "4"
    )
    columns = {row[1] for row in connection.execute("PRAGMA table_info(agents)")}
    assert not {"desired_hash", "desired_ruleset", "applied_ruleset"} & columns
    connection.close()


def test_an_agent_that_does_not_answer_is_cut_marked_and_resynced(tmp_path: Path) -> None:
    core = make_trusting_controller(tmp_path, stuck_after_s=0.05)
    web, db = fleet(core)
    core.apply([policy(5433)], actor=OPERATOR)
    assert web.receive() == "snapshot"  # web answers at once
    assert db.receive(ack=False) == "snapshot"  # db takes it and never answers
    time.sleep(0.1)
    assert core.check_stuck() == {"db"}
    assert db.session.closed
    assert isinstance(db.session.failure, Unavailable)
    assert core.is_stuck("db")
    assert not core.is_stuck("web")
    assert core.is_connected("web"), "the others keep their streams"
    assert [r.action for r in core.audit(0, 100)].count("agent.stuck") == 1
    core.disconnect(db.session)
    db.connect()  # it comes back, still holding the older ruleset: resynced
    assert db.receive() in ("snapshot", "delta")
    assert not core.is_stuck("db")
    assert db.ruleset.rules[0].ports[0].first == 5433


def test_a_state_never_taken_off_the_stream_counts_as_stuck(tmp_path: Path) -> None:
    core = make_trusting_controller(tmp_path, stuck_after_s=0.05)
    web, _ = fleet(core)
    core.apply([policy(5433)], actor=OPERATOR)  # offered to db, never taken
    assert web.receive() == "snapshot"
    assert core.check_stuck() == set(), "not yet"
    time.sleep(0.1)
    assert core.check_stuck() == {"db"}


def test_an_answering_agent_is_never_stuck(tmp_path: Path) -> None:
    core = make_trusting_controller(tmp_path, stuck_after_s=0.05)
    agents = fleet(core)
    for port in (5433, 5434):
        core.apply([policy(port)], actor=OPERATOR)
        assert [agent.receive() for agent in agents] == ["snapshot", "snapshot"]
        time.sleep(0.06)
    assert core.check_stuck() == set()
