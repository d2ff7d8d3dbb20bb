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
        store.put_agent(AgentRecord(agent_id="web", reported_labels={"app": "web"}))
    store.close()
    reopened = SqliteStore(tmp_path / "c.db")
    assert reopened.current_revision() == 1
    stored = reopened.get_resource("Policy", "web-db")
    assert stored is not None
    assert stored.document == '{"x": 1}'
    agent = reopened.get_agent("web")
    assert agent is not None
    assert agent.labels == {"app": "web"}


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
