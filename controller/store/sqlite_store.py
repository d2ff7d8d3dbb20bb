"""Durable controller state in SQLite (WAL): agents, resources, revisions.

One process owns the database; every write is one transaction, so a crash
leaves either the old or the new state, never half a policy batch.

Agents are also held in memory (one process owns the store, so the table cannot change
behind it): reads cost a copy, not a query and three JSON decodes, and what agents report
at a high rate (hellos, acks) can be written in batches (put_agent_later,
put_applied_later, write_unwritten).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from controller.store.agent_event_store import AgentEventStore
from controller.store.flow_store import FlowStore

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    agent_id         TEXT PRIMARY KEY,
    hostname         TEXT NOT NULL DEFAULT '',
    reported_labels  TEXT NOT NULL DEFAULT '{}',
    label_overrides  TEXT NOT NULL DEFAULT '{}',
    addresses        TEXT NOT NULL DEFAULT '[]',
    mode             INTEGER NOT NULL DEFAULT 0,
    baseline         BLOB NOT NULL DEFAULT x'',
    applied_revision INTEGER NOT NULL DEFAULT 0,
    applied_hash     TEXT NOT NULL DEFAULT '',
    applied_parts    BLOB NOT NULL DEFAULT x'',
    last_error       TEXT NOT NULL DEFAULT '',
    first_seen_ms    INTEGER NOT NULL,
    last_seen_ms     INTEGER NOT NULL,
    reported_addresses TEXT NOT NULL DEFAULT '[]',
    refused_addresses  TEXT NOT NULL DEFAULT '{}',
    allowed_ranges     TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS ruleset_parts (
    digest  BLOB PRIMARY KEY,
    content BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS resources (
    kind     TEXT NOT NULL,
    name     TEXT NOT NULL,
    document TEXT NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id      TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    labels        TEXT NOT NULL DEFAULT '{}',
    uses          INTEGER NOT NULL,
    used          INTEGER NOT NULL DEFAULT 0,
    expires_ms    INTEGER NOT NULL,
    revoked       INTEGER NOT NULL DEFAULT 0,
    created_by    TEXT NOT NULL,
    created_ms    INTEGER NOT NULL,
    addresses     TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS certificates (
    serial       TEXT PRIMARY KEY,
    identity     TEXT NOT NULL,
    not_after_ms INTEGER NOT NULL,
    revoked      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS certificates_identity ON certificates(identity);
CREATE TABLE IF NOT EXISTS audit (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms  INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revisions (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    revision INTEGER NOT NULL,
    at_ms    INTEGER NOT NULL,
    kind     TEXT NOT NULL,
    name     TEXT NOT NULL,
    action   TEXT NOT NULL,
    document TEXT
);
"""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class AgentRecord:
    agent_id: str
    hostname: str = ""
    reported_labels: dict[str, str] = field(default_factory=dict)
    # The operator's labels (token, `bulkhead label`): only these are compiled, with the
    # reported keys the controller is told to trust. None marks a key the operator removed.
    label_overrides: dict[str, str | None] = field(default_factory=dict)
    # Accepted addresses: compiled into peers' sets (controller/address_claims.py).
    addresses: list[str] = field(default_factory=list)
    mode: int = 0
    baseline: bytes = b""
    applied_revision: int = 0
    applied_hash: str = ""
    # The acknowledged ruleset, when known (the base of policy deltas): the digests of its
    # parts, which are stored once each in ruleset_parts (controller.desired).
    applied_parts: bytes = b""
    last_error: str = ""
    first_seen_ms: int = 0
    last_seen_ms: int = 0
    # Everything the host last reported, and the reported addresses not accepted (why).
    reported_addresses: list[str] = field(default_factory=list)
    refused_addresses: dict[str, str] = field(default_factory=dict)
    # CIDRs its addresses must fall in (from its token or the operator); empty: any.
    allowed_ranges: list[str] = field(default_factory=list)

    def labels_with(self, trusted_keys: frozenset[str] = frozenset()) -> dict[str, str]:
        """The labels policy is compiled from: the operator's, plus the reported labels
        of TRUSTED_KEYS that the operator did not set or remove."""
        merged = {k: v for k, v in self.reported_labels.items() if k in trusted_keys}
        for key, value in self.label_overrides.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        return merged

    @property
    def labels(self) -> dict[str, str]:
        """The operator's labels (a controller that trusts host keys adds those)."""
        return self.labels_with()


@dataclass
class TokenRecord:
    token_id: str
    secret_sha256: str
    labels: dict[str, str]
    uses: int
    used: int
    expires_ms: int
    revoked: bool
    created_by: str
    created_ms: int
    addresses: list[str] = field(default_factory=list)  # allowed ranges of its agents


@dataclass(frozen=True)
class AuditRecord:
    at_ms: int
    actor: str
    action: str
    target: str
    detail: str


@dataclass(frozen=True)
class StoredResource:
    kind: str
    name: str
    document: str
    revision: int


class StoreCorrupt(Exception):
    """The database exists but is not a Bulkhead store we can read."""


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self._agents: dict[str, AgentRecord] = {}
        self._staged: dict[str, AgentRecord] | None = None  # put in the open transaction
        self._unwritten: set[str] = set()  # in memory, row not written yet
        self._unwritten_applied: set[str] = set()  # only the ack's columns not written yet
        try:
            # Readable by the controller alone: token hashes, certificates, audit, flows.
            # SQLite gives the -wal and -shm files the database file's permissions.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            self._check_version()
            rows = self._db.execute("SELECT * FROM agents").fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(f"{path}: not a usable Bulkhead store ({exc})") from exc
        self._agents = {row["agent_id"]: _agent_from_row(row) for row in rows}

    def _check_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif row["value"] in ("1", "2", "3"):
            self._migrate_from(int(row["value"]))
        elif row["value"] != str(SCHEMA_VERSION):
            raise StoreCorrupt(
                f"schema version {row['value']} (this controller reads {SCHEMA_VERSION})"
            )

    def _migrate_from(self, version: int) -> None:
        # Version 2 kept each agent's acknowledged ruleset whole, and 1 and 2 its desired
        # one; 3 keeps acknowledged rulesets as shared parts and desired state in memory
        # only. The old content is dropped: each agent gets one snapshot after the upgrade.
        # Version 4 keeps what a host reports apart from what the controller accepted
        # (addresses, allowed ranges); until re-reported, the addresses count as reported.
        old_columns = ["desired_revision", "desired_hash", "desired_ruleset"]
        if version == 2:
            old_columns.append("applied_ruleset")
        with self.transaction():
            if version < 3:
                self._db.execute(
                    "ALTER TABLE agents ADD COLUMN applied_parts BLOB NOT NULL DEFAULT x''"
                )
                for column in old_columns:
                    self._db.execute(f"ALTER TABLE agents DROP COLUMN {column}")
            for column, default in (
                ("reported_addresses", "'[]'"),
                ("refused_addresses", "'{}'"),
                ("allowed_ranges", "'[]'"),
            ):
                self._db.execute(
                    f"ALTER TABLE agents ADD COLUMN {column} TEXT NOT NULL DEFAULT {default}"
                )
            self._db.execute("UPDATE agents SET reported_addresses = addresses")
            self._db.execute("ALTER TABLE tokens ADD COLUMN addresses TEXT NOT NULL DEFAULT '[]'")
            self._db.execute(
                "UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),)
            )

    def close(self) -> None:
        if self._unwritten or self._unwritten_applied:
            with self.transaction():
                self.write_unwritten()
        self._db.close()

    def flow_store(self, **limits: int) -> FlowStore:
        """The flows table, on this store's connection (see flow_store.py)."""
        return FlowStore(self._db, **limits)

    def agent_event_store(self) -> AgentEventStore:
        """The agent events table, on this store's connection (see agent_event_store.py)."""
        return AgentEventStore(self._db)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together or not at all."""
        self._db.execute("BEGIN IMMEDIATE")
        self._staged = {}
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            self._staged = None
            raise
        self._db.execute("COMMIT")
        staged, self._staged = self._staged, None
        self._agents.update(staged)

    # -- revisions ---------------------------------------------------------------

    def current_revision(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()
        return int(row["value"]) if row else 0

    def next_revision(self) -> int:
        """Allocate the next revision number; call inside a transaction."""
        revision = self.current_revision() + 1
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES ('revision', ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (str(revision),),
        )
        return revision

    def record_revision(
        self, revision: int, kind: str, name: str, action: str, document: str | None
    ) -> None:
        self._db.execute(
            "INSERT INTO revisions(revision, at_ms, kind, name, action, document) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (revision, now_ms(), kind, name, action, document),
        )

    # -- ruleset parts --------------------------------------------------------------

    def put_parts(self, parts: Mapping[bytes, bytes]) -> None:
        """Store parts by digest (content-addressed: one already there stays)."""
        self._db.executemany(
            "INSERT OR IGNORE INTO ruleset_parts(digest, content) VALUES (?, ?)", parts.items()
        )

    def get_parts(self, digests: Sequence[bytes]) -> dict[bytes, bytes]:
        """The stored parts among DIGESTS, by digest."""
        found: dict[bytes, bytes] = {}
        for digest in set(digests):
            row = self._db.execute(
                "SELECT content FROM ruleset_parts WHERE digest=?", (digest,)
            ).fetchone()
            if row is not None:
                found[digest] = bytes(row["content"])
        return found

    def part_digests(self) -> set[bytes]:
        return {bytes(r[0]) for r in self._db.execute("SELECT digest FROM ruleset_parts")}

    def prune_parts(self, keep: set[bytes]) -> int:
        """Delete every part not in KEEP; call inside a transaction. Returns how many."""
        unused = [(d,) for d in self.part_digests() if d not in keep]
        self._db.executemany("DELETE FROM ruleset_parts WHERE digest=?", unused)
        return len(unused)

    # -- resources ----------------------------------------------------------------

    def get_resource(self, kind: str, name: str) -> StoredResource | None:
        row = self._db.execute(
            "SELECT kind, name, document, revision FROM resources WHERE kind=? AND name=?",
            (kind, name),
        ).fetchone()
        return StoredResource(**dict(row)) if row else None

    def list_resources(self, kind: str | None = None) -> list[StoredResource]:
        if kind is None:
            rows = self._db.execute(
                "SELECT kind, name, document, revision FROM resources ORDER BY kind, name"
            ).fetchall()
        else:
            rows = self._db.execute(
                "SELECT kind, name, document, revision FROM resources WHERE kind=? ORDER BY name",
                (kind,),
            ).fetchall()
        return [StoredResource(**dict(r)) for r in rows]

    def put_resource(self, kind: str, name: str, document: str, revision: int) -> None:
        self._db.execute(
            "INSERT INTO resources(kind, name, document, revision) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(kind, name) DO UPDATE SET document=excluded.document, "
            "revision=excluded.revision",
            (kind, name, document, revision),
        )

    def delete_resource(self, kind: str, name: str) -> bool:
        cur = self._db.execute("DELETE FROM resources WHERE kind=? AND name=?", (kind, name))
        return cur.rowcount > 0

    # -- tokens, certificates, audit -----------------------------------------------------

    def put_token(self, token: TokenRecord) -> None:
        self._db.execute(
            "INSERT INTO tokens(token_id, secret_sha256, labels, uses, used, expires_ms, revoked, "
            "created_by, created_ms, addresses) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(token_id) DO UPDATE SET used=excluded.used, revoked=excluded.revoked",
            (
                token.token_id,
                token.secret_sha256,
                _dump(token.labels),
                token.uses,
                token.used,
                token.expires_ms,
                int(token.revoked),
                token.created_by,
                token.created_ms,
                _dump(token.addresses),
            ),
        )

    def get_token(self, token_id: str) -> TokenRecord | None:
        row = self._db.execute("SELECT * FROM tokens WHERE token_id=?", (token_id,)).fetchone()
        return _token_from_row(row) if row else None

    def list_tokens(self) -> list[TokenRecord]:
        rows = self._db.execute("SELECT * FROM tokens ORDER BY created_ms").fetchall()
        return [_token_from_row(r) for r in rows]

    def put_certificate(self, serial: str, identity: str, not_after_ms: int) -> None:
        self._db.execute(
            "INSERT INTO certificates(serial, identity, not_after_ms) VALUES (?, ?, ?)",
            (serial, identity, not_after_ms),
        )

    def revoke_certificates(self, identity: str) -> int:
        cur = self._db.execute(
            "UPDATE certificates SET revoked=1 WHERE identity=? AND revoked=0", (identity,)
        )
        return cur.rowcount

    def certificate_status(self, serial: str) -> tuple[str, bool] | None:
        """(identity, revoked) of a recorded certificate, None if never recorded."""
        row = self._db.execute(
            "SELECT identity, revoked FROM certificates WHERE serial=?", (serial,)
        ).fetchone()
        return (row["identity"], bool(row["revoked"])) if row else None

    def live_certificates(self, identity: str, at_ms: int) -> list[tuple[str, int]]:
        """(serial, not_after_ms) of IDENTITY's certificates that are unrevoked and unexpired."""
        rows = self._db.execute(
            "SELECT serial, not_after_ms FROM certificates "
            "WHERE identity=? AND revoked=0 AND not_after_ms>? ORDER BY not_after_ms",
            (identity, at_ms),
        ).fetchall()
        return [(r["serial"], r["not_after_ms"]) for r in rows]

    def latest_live_certificates(self, prefix: str, at_ms: int) -> dict[str, int]:
        """The latest not_after_ms of the unrevoked, unexpired certificates of every
        identity starting with PREFIX."""
        rows = self._db.execute(
            "SELECT identity, MAX(not_after_ms) AS latest FROM certificates "
            "WHERE substr(identity, 1, ?) = ? AND revoked=0 AND not_after_ms>? GROUP BY identity",
            (len(prefix), prefix, at_ms),
        ).fetchall()
        return {r["identity"]: r["latest"] for r in rows}

    def agent_revoked(self, identity: str) -> bool:
        """IDENTITY had certificates and every one of them is revoked."""
        row = self._db.execute(
            "SELECT COUNT(*) AS total, SUM(revoked) AS revoked FROM certificates WHERE identity=?",
            (identity,),
        ).fetchone()
        return bool(row["total"]) and row["revoked"] == row["total"]

    def fully_revoked_identities(self, prefix: str) -> set[str]:
        """Identities starting with PREFIX that had certificates, all of them revoked."""
        rows = self._db.execute(
            "SELECT identity FROM certificates WHERE substr(identity, 1, ?) = ? "
            "GROUP BY identity HAVING SUM(revoked) = COUNT(*)",
            (len(prefix), prefix),
        ).fetchall()
        return {r["identity"] for r in rows}

    def has_certificates(self, identity: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM certificates WHERE identity=? LIMIT 1", (identity,)
        ).fetchone()
        return row is not None

    def add_audit(self, actor: str, action: str, target: str, detail: Mapping[str, object]) -> None:
        self._db.execute(
            "INSERT INTO audit(at_ms, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
            (now_ms(), actor, action, target, json.dumps(detail, sort_keys=True)),
        )

    def list_audit(self, since_ms: int = 0, limit: int = 1000) -> list[AuditRecord]:
        rows = self._db.execute(
            "SELECT at_ms, actor, action, target, detail FROM audit WHERE at_ms>=? "
            "ORDER BY id DESC LIMIT ?",
            (since_ms, limit),
        ).fetchall()
        return [AuditRecord(**dict(r)) for r in reversed(rows)]

    # -- agents -------------------------------------------------------------------

    def get_agent(self, agent_id: str) -> AgentRecord | None:
        """A copy: changing it changes nothing until it is put back."""
        found = self._current(agent_id)
        return _copy(found) if found is not None else None

    def touch_agents(self, seen_ms: Mapping[str, int]) -> None:
        """Move agents' last-seen times forward (never back); call inside a transaction."""
        self._db.executemany(
            "UPDATE agents SET last_seen_ms = max(last_seen_ms, ?) WHERE agent_id = ?",
            [(ms, agent_id) for agent_id, ms in seen_ms.items()],
        )
        for agent_id, ms in seen_ms.items():
            found = self._current(agent_id)
            if found is not None:
                touched = _copy(found)
                touched.last_seen_ms = max(touched.last_seen_ms, ms)
                self._stage(touched)

    def list_agents(self) -> list[AgentRecord]:
        merged = {**self._agents, **(self._staged or {})}
        return [_copy(merged[agent_id]) for agent_id in sorted(merged)]

    def agents_last_seen(self) -> dict[str, int]:
        """Every agent's last-seen time as stored, without copying 10,000 records."""
        merged = {**self._agents, **(self._staged or {})}
        return {agent_id: agent.last_seen_ms for agent_id, agent in merged.items()}

    def put_agent_later(self, agent: AgentRecord) -> None:
        """Keep AGENT now and write it with the next write_unwritten: for what agents report
        at a high rate, which they report again if it is lost in a crash."""
        self._agents[agent.agent_id] = _stored(agent)
        self._unwritten.add(agent.agent_id)
        self._unwritten_applied.discard(agent.agent_id)

    def put_applied_later(self, agent: AgentRecord) -> None:
        """As put_agent_later, for an ack: AGENT differs from the stored record only in its
        applied state, last error and last seen. Those are set on the record kept (no copy
        made: 10,000 acks per change) and the batch writes those columns alone (no JSON
        encoding of labels and addresses)."""
        kept = self._agents.get(agent.agent_id)
        if kept is None or (self._staged is not None and agent.agent_id in self._staged):
            self.put_agent_later(agent)  # not the case for an ack; written whole
            return
        kept.applied_revision, kept.applied_hash = agent.applied_revision, agent.applied_hash
        kept.applied_parts, kept.last_error = agent.applied_parts, agent.last_error
        kept.last_seen_ms = agent.last_seen_ms or now_ms()
        if agent.agent_id not in self._unwritten:
            self._unwritten_applied.add(agent.agent_id)

    def write_unwritten(self) -> int:
        """Write the agents kept by put_agent_later and put_applied_later; call inside a
        transaction. Returns how many."""
        unwritten, self._unwritten = self._unwritten, set()
        applied, self._unwritten_applied = self._unwritten_applied - unwritten, set()
        for agent_id in sorted(unwritten):
            self._write_agent(self._agents[agent_id])
        rows = [
            (a.applied_revision, a.applied_hash, a.applied_parts, a.last_error, a.last_seen_ms,
             a.agent_id)
            for a in (self._agents[agent_id] for agent_id in sorted(applied))
        ]  # fmt: skip
        self._db.executemany(
            "UPDATE agents SET applied_revision=?, applied_hash=?, applied_parts=?, "
            "last_error=?, last_seen_ms=? WHERE agent_id=?",
            rows,
        )
        return len(unwritten) + len(rows)

    def _current(self, agent_id: str) -> AgentRecord | None:
        if self._staged is not None and agent_id in self._staged:
            return self._staged[agent_id]
        return self._agents.get(agent_id)

    def _stage(self, agent: AgentRecord) -> None:
        if self._staged is not None:
            self._staged[agent.agent_id] = agent
        else:  # autocommit: the write is done
            self._agents[agent.agent_id] = agent

    def put_agent(self, agent: AgentRecord) -> None:
        """Write the agent (visible to reads at once, kept when the transaction commits)."""
        stored = _stored(agent)
        self._write_agent(stored)
        self._stage(stored)
        self._unwritten.discard(agent.agent_id)
        self._unwritten_applied.discard(agent.agent_id)

    def _write_agent(self, agent: AgentRecord) -> None:
        self._db.execute(
            "INSERT INTO agents(agent_id, hostname, reported_labels, label_overrides, addresses, "
            "mode, baseline, applied_revision, applied_hash, applied_parts, last_error, "
            "first_seen_ms, last_seen_ms, reported_addresses, refused_addresses, allowed_ranges) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(agent_id) DO UPDATE SET hostname=excluded.hostname, "
            "reported_labels=excluded.reported_labels, label_overrides=excluded.label_overrides, "
            "addresses=excluded.addresses, mode=excluded.mode, baseline=excluded.baseline, "
            "applied_revision=excluded.applied_revision, applied_hash=excluded.applied_hash, "
            "applied_parts=excluded.applied_parts, last_error=excluded.last_error, "
            "last_seen_ms=excluded.last_seen_ms, reported_addresses=excluded.reported_addresses, "
            "refused_addresses=excluded.refused_addresses, "
            "allowed_ranges=excluded.allowed_ranges",
            (
                agent.agent_id,
                agent.hostname,
                _dump(agent.reported_labels),
                _dump(agent.label_overrides),
                _dump(agent.addresses),
                agent.mode,
                agent.baseline,
                agent.applied_revision,
                agent.applied_hash,
                agent.applied_parts,
                agent.last_error,
                agent.first_seen_ms,
                agent.last_seen_ms,
                _dump(agent.reported_addresses),
                _dump(agent.refused_addresses),
                _dump(agent.allowed_ranges),
            ),
        )


def _stored(agent: AgentRecord) -> AgentRecord:
    """The copy kept: first and last seen default to now."""
    stored = _copy(agent)
    stored.first_seen_ms = stored.first_seen_ms or now_ms()
    stored.last_seen_ms = stored.last_seen_ms or now_ms()
    return stored


def _copy(agent: AgentRecord) -> AgentRecord:
    # Field by field through __dict__: dataclasses.replace costs four times as much, and
    # this runs for every ack and every agent listed.
    copied = object.__new__(AgentRecord)
    copied.__dict__.update(agent.__dict__)
    copied.reported_labels = dict(agent.reported_labels)
    copied.label_overrides = dict(agent.label_overrides)
    copied.addresses = list(agent.addresses)
    copied.reported_addresses = list(agent.reported_addresses)
    copied.refused_addresses = dict(agent.refused_addresses)
    copied.allowed_ranges = list(agent.allowed_ranges)
    return copied


def _dump(value: Mapping[str, object] | Sequence[object]) -> str:
    return json.dumps(value, sort_keys=True)


def _token_from_row(row: sqlite3.Row) -> TokenRecord:
    return TokenRecord(
        token_id=row["token_id"],
        secret_sha256=row["secret_sha256"],
        labels=json.loads(row["labels"]),
        uses=row["uses"],
        used=row["used"],
        expires_ms=row["expires_ms"],
        revoked=bool(row["revoked"]),
        created_by=row["created_by"],
        created_ms=row["created_ms"],
        addresses=json.loads(row["addresses"]),
    )


def _agent_from_row(row: sqlite3.Row) -> AgentRecord:
    return AgentRecord(
        agent_id=row["agent_id"],
        hostname=row["hostname"],
        reported_labels=json.loads(row["reported_labels"]),
        label_overrides=json.loads(row["label_overrides"]),
        addresses=json.loads(row["addresses"]),
        mode=row["mode"],
        baseline=bytes(row["baseline"]),
        applied_revision=row["applied_revision"],
        applied_hash=row["applied_hash"],
        applied_parts=bytes(row["applied_parts"]),
        last_error=row["last_error"],
        first_seen_ms=row["first_seen_ms"],
        last_seen_ms=row["last_seen_ms"],
        reported_addresses=json.loads(row["reported_addresses"]),
        refused_addresses=json.loads(row["refused_addresses"]),
        allowed_ranges=json.loads(row["allowed_ranges"]),
    )
