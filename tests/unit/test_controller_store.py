"""SQLite store: durability across reopen, atomic transactions, revision counter."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from controller.store.sqlite_store import AgentRecord, SqliteStore, StoreCorrupt


def test_state_survives_reopen(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    with store.transaction():
        revision = store.next_revision()
        store.put_resource("Policy", "web-db", '{"x": 1}', revision)
        store.put_agent(
            AgentRecord(
                agent_id="web",
                reported_labels={"app": "web"},
                label_overrides={"env": "prod"},
                reported_addresses=["198.18.0.10", "198.18.0.99"],
                addresses=["198.18.0.10"],
                refused_addresses={"198.18.0.99": "held by agent db"},
                allowed_ranges=["198.18.0.0/24"],
            )
        )
    store.close()
    reopened = SqliteStore(tmp_path / "c.db")
    assert reopened.current_revision() == 1
    stored = reopened.get_resource("Policy", "web-db")
    assert stored is not None
    assert stored.document == '{"x": 1}'
    agent = reopened.get_agent("web")
    assert agent is not None
    # Only the operator's labels are compiled; the host's stay apart.
    assert agent.labels == {"env": "prod"}
    assert agent.reported_labels == {"app": "web"}
    assert agent.labels_with(frozenset({"app"})) == {"app": "web", "env": "prod"}
    assert agent.reported_addresses == ["198.18.0.10", "198.18.0.99"]
    assert agent.addresses == ["198.18.0.10"]
    assert agent.refused_addresses == {"198.18.0.99": "held by agent db"}
    assert agent.allowed_ranges == ["198.18.0.0/24"]


def test_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")

    class Boom(Exception):
        pass

    def write_then_fail() -> None:
        with store.transaction():
            store.put_resource("Policy", "a", "{}", store.next_revision())
            raise Boom

    with pytest.raises(Boom):
        write_then_fail()
    assert store.list_resources() == []
    assert store.current_revision() == 0


def test_agents_in_memory_follow_the_transaction_and_copies_are_not_the_store(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "c.db")
    with store.transaction():
        store.put_agent(AgentRecord(agent_id="web", addresses=["198.18.0.1"]))
    seen_inside: list[list[str]] = []

    def put_then_fail() -> None:
        with store.transaction():
            store.put_agent(AgentRecord(agent_id="web", addresses=["198.18.0.2"]))
            seen_inside.append(addresses(store))
            raise RuntimeError

    with pytest.raises(RuntimeError):
        put_then_fail()
    assert seen_inside == [["198.18.0.2"]], "a put is read back inside its transaction"
    assert addresses(store) == ["198.18.0.1"], "a rolled-back put is not kept"
    copy = store.get_agent("web")
    assert copy is not None
    copy.addresses.append("198.18.0.9")
    assert store.list_agents()[0].addresses == ["198.18.0.1"]


def test_an_agent_put_later_is_read_at_once_and_written_in_the_batch(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    with store.transaction():
        store.put_agent(AgentRecord(agent_id="web"))
    acked = store.get_agent("web")
    assert acked is not None
    acked.applied_revision = 7
    store.put_agent_later(acked)
    assert applied_revision(store) == 7
    assert applied_revision(SqliteStore(tmp_path / "c.db")) == 0, "not written yet"
    with store.transaction():
        assert store.write_unwritten() == 1
    assert applied_revision(SqliteStore(tmp_path / "c.db")) == 7
    acked.applied_revision = 8
    store.put_agent_later(acked)
    store.close()  # writes what is left
    assert applied_revision(SqliteStore(tmp_path / "c.db")) == 8


def test_an_ack_put_later_writes_its_columns_and_never_hides_a_pending_full_write(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "c.db")
    with store.transaction():
        store.put_agent(AgentRecord(agent_id="web", hostname="old"))
        store.put_agent(AgentRecord(agent_id="db", hostname="db-1"))
    hello = store.get_agent("web")
    assert hello is not None
    hello.hostname = "new"  # a hello: the whole row is written later
    store.put_agent_later(hello)
    read_before = store.get_agent("db")
    for agent_id, revision in (("web", 7), ("db", 9)):
        acked = store.get_agent(agent_id)
        assert acked is not None
        acked.applied_revision, acked.applied_hash = revision, f"h{revision}"
        acked.applied_parts, acked.last_error, acked.last_seen_ms = b"p", "", 1234
        store.put_applied_later(acked)
    assert read_before is not None
    assert read_before.applied_revision == 0, "a record read earlier is a copy, left as it was"
    with store.transaction():
        assert store.write_unwritten() == 2
    reopened = SqliteStore(tmp_path / "c.db")
    web, db = reopened.get_agent("web"), reopened.get_agent("db")
    assert web is not None
    assert db is not None
    assert (web.hostname, web.applied_revision, web.applied_hash) == ("new", 7, "h7")
    assert (db.hostname, db.applied_revision, db.applied_parts, db.last_seen_ms) == (
        "db-1", 9, b"p", 1234,
    )  # fmt: skip
    acked = store.get_agent("db")
    assert acked is not None
    acked.last_error = "apply failed"
    store.put_applied_later(acked)
    store.close()  # writes what is left
    db = SqliteStore(tmp_path / "c.db").get_agent("db")
    assert db is not None
    assert db.last_error == "apply failed"


def test_agents_last_seen_includes_a_put_inside_the_open_transaction(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    with store.transaction():
        store.put_agent(AgentRecord(agent_id="web", last_seen_ms=5))
        store.put_agent(AgentRecord(agent_id="db", last_seen_ms=6))
        assert store.agents_last_seen() == {"web": 5, "db": 6}
    assert store.agents_last_seen() == {"web": 5, "db": 6}


def addresses(store: SqliteStore) -> list[str]:
    agent = store.get_agent("web")
    assert agent is not None
    return agent.addresses


def applied_revision(store: SqliteStore) -> int:
    agent = store.get_agent("web")
    assert agent is not None
    return agent.applied_revision


def test_label_overrides_win_and_remove() -> None:
    agent = AgentRecord(
        agent_id="x",
        reported_labels={"app": "web", "env": "prod"},
        label_overrides={"app": "db", "env": None},
    )
    assert agent.labels == {"app": "db"}


def test_garbage_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreCorrupt, match="not a usable Bulkhead store"):
        SqliteStore(path)


def test_a_new_database_and_its_journal_are_readable_by_the_controller_alone(
    tmp_path: Path,
) -> None:
    path = tmp_path / "controller.db"
    store = SqliteStore(path)
    store.put_resource("Policy", "p", "{}", 1)  # a write, so the WAL files exist
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in tmp_path.iterdir()}
    store.close()
    assert modes["controller.db"] == 0o600
    assert all(mode == 0o600 for mode in modes.values()), modes


def test_latest_live_certificates_of_the_fleet_match_each_identity_asked_alone(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "c.db")
    with store.transaction():
        store.put_certificate("1", "agent:web", 5_000)
        store.put_certificate("2", "agent:web", 9_000)  # renewed: the later one counts
        store.put_certificate("3", "agent:db", 8_000)
        store.put_certificate("4", "agent:old", 500)  # expired
        store.put_certificate("5", "operator:alice", 9_000)  # not an agent
        store.put_certificate("6", "agent:gone", 9_000)
        store.revoke_certificates("agent:gone")
    latest = store.latest_live_certificates("agent:", 1_000)
    assert latest == {"agent:web": 9_000, "agent:db": 8_000}
    for identity in ("agent:web", "agent:db", "agent:old", "agent:gone"):
        alone = store.live_certificates(identity, 1_000)
        assert latest.get(identity, 0) == (alone[-1][1] if alone else 0)
