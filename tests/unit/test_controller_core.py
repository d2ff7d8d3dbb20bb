"""Controller core against a real SQLite store: apply, push decisions, labels, restarts."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from bulkhead.v1 import agent_pb2, ruleset_pb2
from bulkhead.v1.contract import apply_set_changes, ruleset_hash
from controller.core import Controller
from controller.errors import Conflict, InvalidArgument, NotFound, Unavailable
from controller.sessions import AgentSession
from tests.pki_support import make_trusting_controller

OPERATOR = "operator:test"
WEB_DB = {
    "apiVersion": "bulkhead/v1",
    "kind": "Policy",
    "metadata": {"name": "web-db"},
    "spec": {"rules": [{"from": {"app": "web"}, "to": {"app": "db"}, "ports": ["tcp/5432"]}]},
}


def hello(agent_id: str, app: str, address: str, **kw: object) -> agent_pb2.Hello:
    return agent_pb2.Hello(
        agent_id=agent_id,
        hostname=agent_id,
        labels={"app": app},
        addresses=[address],
        mode=agent_pb2.MODE_ENFORCE,
        **kw,  # type: ignore[arg-type]
    )


def for_agent(message: agent_pb2.Hello) -> tuple[str, agent_pb2.Hello]:
    """Connect arguments as the servicer passes them: the id from the certificate."""
    return message.agent_id, message


def take(session: AgentSession) -> agent_pb2.ControllerMessage | None:
    """The pending message of a session without waiting (None if nothing is pending)."""
    return session.take()


def received(
    message: agent_pb2.ControllerMessage, held: ruleset_pb2.Ruleset | None = None
) -> ruleset_pb2.Ruleset:
    """The ruleset an agent holding HELD has after MESSAGE (a snapshot, or a delta
    against HELD), its hash checked as the agent checks it."""
    if message.WhichOneof("body") == "snapshot":
        return message.snapshot.ruleset
    assert message.WhichOneof("body") == "delta"
    assert held is not None, "a delta needs the ruleset it is against"
    ruleset = apply_set_changes(held, message.delta.sets)
    assert ruleset_hash(ruleset) == message.delta.hash
    return ruleset


def revision_of(message: agent_pb2.ControllerMessage) -> int:
    body = message.WhichOneof("body")
    return message.snapshot.revision if body == "snapshot" else message.delta.revision


@pytest.fixture
def core(tmp_path: Path) -> Controller:
    return make_trusting_controller(tmp_path)


def connect_three(core: Controller) -> dict[str, AgentSession]:
    sessions = {
        "web": core.connect(*for_agent(hello("web", "web", "198.18.0.10"))),
        "db": core.connect(*for_agent(hello("db", "db", "198.18.0.11"))),
        "other": core.connect(*for_agent(hello("other", "other", "198.18.0.12"))),
    }
    for name, session in sessions.items():
        message = take(session)
        assert message is not None
        assert message.WhichOneof("body") == "snapshot", name
        core.acknowledged(
            name,
            agent_pb2.Ack(revision=message.snapshot.revision, hash=message.snapshot.hash, ok=True),
        )
    return sessions


def test_policy_pushes_only_to_agents_whose_ruleset_changed(core: Controller) -> None:
    sessions = connect_three(core)
    changes, revision = core.apply([json.dumps(WEB_DB)], actor=OPERATOR)
    assert [(c.kind, c.name, c.action) for c in changes] == [("Policy", "web-db", "created")]
    assert revision > 0
    web, db, other = (take(sessions[n]) for n in ("web", "db", "other"))
    assert other is None
    assert web is not None
    assert db is not None
    web_rules = web.snapshot.ruleset.rules
    assert [r.direction for r in web_rules] == [ruleset_pb2.DIRECTION_EGRESS]
    db_sets = {s.name: list(s.hosts) for s in db.snapshot.ruleset.sets}
    assert db_sets[db.snapshot.ruleset.rules[0].peer_set] == ["198.18.0.10"]
    assert web.snapshot.revision > revision - 1


def test_reapplying_same_document_is_unchanged_and_pushes_nothing(core: Controller) -> None:
    sessions = connect_three(core)
    core.apply([json.dumps(WEB_DB)], actor=OPERATOR)
    for session in sessions.values():
        take(session)
    changes, _ = core.apply([json.dumps(WEB_DB)], actor=OPERATOR)
    assert changes[0].action == "unchanged"
    assert all(take(s) is None for s in sessions.values())


def test_invalid_batch_stores_nothing(core: Controller) -> None:
    bad = json.loads(json.dumps(WEB_DB))
    bad["metadata"]["name"] = "second"
    bad["spec"]["rules"][0]["ports"] = ["tcp/99999"]
    with pytest.raises(InvalidArgument) as raised:
        core.apply([json.dumps(WEB_DB), json.dumps(bad)], actor=OPERATOR)
    assert any("ports[0]" in p for p in raised.value.problems)
    assert core.list_resources("Policy") == []


def test_unknown_iplist_reference_is_rejected(core: Controller) -> None:
    doc = json.loads(json.dumps(WEB_DB))
    doc["spec"]["rules"][0]["to"] = {"iplist": "office"}
    with pytest.raises(InvalidArgument, match="iplist 'office' does not exist"):
        core.apply([json.dumps(doc)], actor=OPERATOR)


def test_iplist_in_use_cannot_be_deleted(core: Controller) -> None:
    iplist = {
        "apiVersion": "bulkhead/v1",
        "kind": "IPList",
        "metadata": {"name": "office"},
        "spec": {"cidrs": ["198.19.0.0/24"]},
    }
    doc = json.loads(json.dumps(WEB_DB))
    doc["spec"]["rules"][0]["to"] = {"iplist": "office"}
    core.apply([json.dumps(iplist), json.dumps(doc)], actor=OPERATOR)
    with pytest.raises(Conflict, match="used by policy web-db"):
        core.delete("IPList", "office", actor=OPERATOR)
    core.delete("Policy", "web-db", actor=OPERATOR)
    core.delete("IPList", "office", actor=OPERATOR)
    with pytest.raises(NotFound):
        core.delete("IPList", "office", actor=OPERATOR)


def test_relabel_moves_agent_into_policy(core: Controller) -> None:
    sessions = connect_three(core)
    core.apply([json.dumps(WEB_DB)], actor=OPERATOR)
    db_first = take(sessions["db"])
    assert db_first is not None
    db_before = received(db_first)
    for session in sessions.values():
        take(session)
    assert core.label("other", {"app": "web"}, [], actor=OPERATOR) == {"app": "web"}
    other, db = take(sessions["other"]), take(sessions["db"])
    assert other is not None
    assert other.snapshot.ruleset.rules[0].direction == ruleset_pb2.DIRECTION_EGRESS
    assert db is not None
    assert db.WhichOneof("body") == "delta", "only db's peer set changed"
    assert sorted(received(db, db_before).sets[0].hosts) == ["198.18.0.10", "198.18.0.12"]


def test_bad_label_changes_nothing(core: Controller) -> None:
    connect_three(core)
    with pytest.raises(InvalidArgument, match=r"labels\.app: .no spaces allowed.: label values"):
        core.label("web", {"app": "no spaces allowed"}, [], actor=OPERATOR)
    assert core.compiled_labels(core.agent("web")) == {"app": "web"}


def test_restart_resyncs_with_in_sync_and_keeps_everything(tmp_path: Path) -> None:
    core = make_trusting_controller(tmp_path)
    sessions = connect_three(core)
    core.apply([json.dumps(WEB_DB)], actor=OPERATOR)
    applied = {}
    for name, session in sessions.items():
        message = take(session)
        if message is not None:
            snap = message.snapshot
            core.acknowledged(name, agent_pb2.Ack(revision=snap.revision, hash=snap.hash, ok=True))
    for agent in core.agents():
        desired = core.desired(agent.agent_id)
        applied[agent.agent_id] = (desired.revision, desired.hash)
    revision_before = max(r for r, _ in applied.values())
    core.flush_last_seen()  # as a stopping controller does (acks are written in batches)

    restarted = make_trusting_controller(tmp_path)
    assert [name for name, _, _ in restarted.list_resources("Policy")] == ["web-db"]
    rev, digest = applied["db"]
    session = restarted.connect(
        "db", hello("db", "db", "198.18.0.11", applied_revision=rev, applied_hash=digest)
    )
    message = take(session)
    assert message is not None
    assert message.WhichOneof("body") == "in_sync"
    assert message.in_sync.revision == rev
    _, revision_after = restarted.apply(
        [json.dumps({**WEB_DB, "metadata": {"name": "x"}})], actor=OPERATOR
    )
    assert revision_after > revision_before, "revisions must keep growing across restarts"


def test_invalid_hello_names_the_fields(core: Controller) -> None:
    bad = agent_pb2.Hello(agent_id="Bad Id", addresses=["300.1.1.1"], labels={"k": "v v"})
    with pytest.raises(InvalidArgument) as raised:
        core.connect("bad-id-from-cert", bad)
    text = str(raised.value)
    assert "hello.addresses[0]" in text
    assert "hello.labels.k" in text


def test_new_stream_for_same_agent_closes_the_old(core: Controller) -> None:
    first = core.connect(*for_agent(hello("web", "web", "198.18.0.10")))
    second = core.connect(*for_agent(hello("web", "web", "198.18.0.10")))
    assert first.closed
    assert not second.closed
    core.disconnect(first)  # a late disconnect of the old stream must not drop the new one
    assert core.is_connected("web")


def test_address_change_updates_peer_sets_not_rules(core: Controller) -> None:
    sessions = connect_three(core)
    core.apply([json.dumps(WEB_DB)], actor=OPERATOR)
    before = take(sessions["db"])
    take(sessions["web"])
    assert before is not None
    core.addresses_changed("web", ["198.18.0.10", "198.18.0.50", "2001:db8::10"])
    after = take(sessions["db"])
    assert after is not None, "db must be told about web's new address"
    assert after.WhichOneof("body") == "delta", "only set elements changed"
    assert [c.name for c in after.delta.sets] == [before.snapshot.ruleset.sets[0].name]
    assert list(after.delta.sets[0].add_hosts) == ["198.18.0.50", "2001:db8::10"]
    assert after.delta.base_hash == before.snapshot.hash
    now = received(after, before.snapshot.ruleset)
    assert list(now.rules) == list(before.snapshot.ruleset.rules)
    assert list(now.sets[0].hosts) == ["198.18.0.10", "198.18.0.50", "2001:db8::10"]
    assert revision_of(after) > before.snapshot.revision
    assert take(sessions["other"]) is None
    with pytest.raises(InvalidArgument, match=r"addresses\[0\]"):
        core.addresses_changed("web", ["not-an-ip"])


def test_a_change_back_while_one_is_in_flight_is_sent_not_taken_for_in_sync(
    core: Controller,
) -> None:
    # web enforces H0; H1 (policy) is in flight; the policy is deleted (desired H0 again)
    # before web acks H1. Web will hold H1, so "in sync with H0" would be wrong: H0 is sent.
    sessions = connect_three(core)
    core.apply([json.dumps(WEB_DB)], actor=OPERATOR)
    in_flight = take(sessions["web"])
    assert in_flight is not None
    core.delete("Policy", "web-db", actor=OPERATOR)
    offered = take(sessions["web"])
    assert offered is not None, "web would keep the deleted policy's rules"
    assert offered.WhichOneof("body") == "snapshot"
    assert offered.snapshot.hash == core.desired("web").hash
    snap = in_flight.snapshot
    core.acknowledged("web", agent_pb2.Ack(revision=snap.revision, hash=snap.hash, ok=True))
    assert take(sessions["web"]) is None, "H0 is already on its way; nothing to resend"


def test_unusable_addresses_are_refused(core: Controller) -> None:
    bad = ("2001:db8::1%eth0", "0.0.0.0", "::", "224.0.0.1", "127.0.0.1", "fe80::1")
    message = hello("web", "web", "198.18.0.10")
    message.addresses.extend(bad)
    session = core.connect(*for_agent(message))
    agent = core.agent("web")
    assert agent.addresses == ["198.18.0.10"], "only the workload address is compiled"
    assert sorted(agent.refused_addresses) == sorted(bad)
    notice = take(session)
    assert notice is not None
    assert notice.WhichOneof("body") == "addresses_refused"
    assert len(notice.addresses_refused.refused) == len(bad)
    garbled = hello("db", "db", "198.18.0.11")
    garbled.addresses.append("no-ip")
    with pytest.raises(InvalidArgument, match=r"hello\.addresses\[1\]: 'no-ip'"):
        core.connect(*for_agent(garbled))


def test_out_of_range_revisions_and_long_hostnames_are_refused(core: Controller) -> None:
    # uint64 on the wire, SQLite integers in the store: found by the hello fuzzer.
    with pytest.raises(InvalidArgument, match=r"hello\.applied_revision"):
        core.connect(*for_agent(hello("web", "web", "198.18.0.1", applied_revision=2**63)))
    long_name = hello("web", "web", "198.18.0.1")
    long_name.hostname = "h" * 254
    with pytest.raises(InvalidArgument, match=r"hello\.hostname"):
        core.connect(*for_agent(long_name))
    core.connect(*for_agent(hello("web", "web", "198.18.0.1")))
    with pytest.raises(InvalidArgument, match=r"ack\.revision"):
        core.acknowledged("web", agent_pb2.Ack(revision=2**64 - 1, ok=True))


def test_identity_comes_from_the_certificate_not_the_hello(core: Controller) -> None:
    sessions = connect_three(core)
    core.apply([json.dumps(WEB_DB)], actor=OPERATOR)
    take(sessions["db"])
    # "other" claims to be db in its hello: it stays other and gets other's (empty) ruleset.
    impostor = core.connect("other", hello("db", "other", "198.18.0.12"))
    message = take(impostor)
    assert message is not None
    assert core.is_connected("db"), "db's own stream must be left alone"
    assert take(sessions["db"]) is None, "db must not be disturbed"
    rules = [] if message.WhichOneof("body") == "in_sync" else message.snapshot.ruleset.rules
    assert all(r.direction != ruleset_pb2.DIRECTION_INGRESS for r in rules)


def test_changes_are_audited_with_the_operator(core: Controller) -> None:
    connect_three(core)
    core.apply([json.dumps(WEB_DB)], actor="operator:alice")
    core.label("other", {"app": "web"}, [], actor="operator:bob")
    core.delete("Policy", "web-db", actor="operator:alice")
    entries = [(e.actor, e.action, e.target) for e in core.audit(0, 100)]
    assert entries == [
        ("operator:alice", "policy.created", "policy/web-db"),
        ("operator:bob", "agent.labelled", "agent/other"),
        ("operator:alice", "policy.deleted", "policy/web-db"),
    ]


def test_token_labels_win_over_labels_the_host_reports(core: Controller, tmp_path: Path) -> None:
    from agent.keytool import generate_key, make_csr

    text, _ = core.enrollment.create_token({"app": "web"}, 3600, 1, actor=OPERATOR)
    core.enrollment.enroll(text, "newhost", make_csr(generate_key(), "newhost"), "newhost")
    core.connect("newhost", hello("newhost", "db", "198.18.0.20"))
    assert core.agent("newhost").labels == {"app": "web"}


def _silence(core: Controller, session: AgentSession) -> None:
    core.disconnect(session)
    time.sleep(0.12)  # past the 0.1 s threshold these tests use


def test_offline_agents_are_shown_and_isolated_only_when_asked(tmp_path: Path) -> None:
    for isolation in (False, True):
        core = make_trusting_controller(tmp_path / str(isolation), offline_after_s=0.1,
                               offline_isolation=isolation)  # fmt: skip
        sessions = connect_three(core)
        core.apply([json.dumps(WEB_DB)], actor=OPERATOR)
        first = take(sessions["db"])
        assert first is not None
        held = received(first)
        _silence(core, sessions["web"])
        assert core.check_offline() == {"web"}
        assert core.is_offline(core.agent("web"))
        pushed = take(sessions["db"])
        if isolation:
            assert pushed is not None, "db must drop the offline web's address"
            held = received(pushed, held)
            assert list(held.sets[0].hosts) == []
        else:
            assert pushed is None, "without isolation nothing changes for db"
        # web comes back: its address returns to db's set.
        core.connect(*for_agent(hello("web", "web", "198.18.0.10")))
        if isolation:
            back = take(sessions["db"])
            assert back is not None
            assert list(received(back, held).sets[0].hosts) == ["198.18.0.10"]


def test_host_label_change_recompiles_its_peers(core: Controller) -> None:
    sessions = connect_three(core)
    core.apply([json.dumps(WEB_DB)], actor=OPERATOR)
    first = take(sessions["db"])
    assert first is not None
    core.config_changed("other", agent_pb2.ConfigChange(labels={"app": "web"}))
    db = take(sessions["db"])
    assert db is not None
    assert sorted(received(db, received(first)).sets[0].hosts) == ["198.18.0.10", "198.18.0.12"]
    with pytest.raises(InvalidArgument, match=r"config\.labels"):
        core.config_changed("other", agent_pb2.ConfigChange(labels={"bad key": "x"}))


def test_revoking_an_agent_takes_its_addresses_out_of_its_peers_sets(core: Controller) -> None:
    from agent.keytool import generate_key, make_csr

    sessions = connect_three(core)
    token, _ = core.enrollment.create_token({}, 600, 1, actor=OPERATOR)
    core.enrollment.enroll(token, "web", make_csr(generate_key(), "web"), "web")
    core.apply([json.dumps(WEB_DB)], actor=OPERATOR)
    before = take(sessions["db"])
    assert before is not None
    assert list(before.snapshot.ruleset.sets[0].hosts) == ["198.18.0.10"]
    core.revoke_agent("web", actor=OPERATOR)
    after = take(sessions["db"])
    assert after is not None, "db must be told to stop trusting web's address"
    assert list(received(after, before.snapshot.ruleset).sets[0].hosts) == []


def test_an_expired_enrollment_cannot_be_taken_over_with_another_token(tmp_path: Path) -> None:
    from datetime import timedelta

    from agent.keytool import generate_key, make_csr
    from controller.enrollment import Enrollment
    from controller.pki import CertificateAuthority
    from controller.store.sqlite_store import SqliteStore

    store = SqliteStore(tmp_path / "c.db")
    enrollment = Enrollment(
        store, CertificateAuthority.load_or_create(tmp_path / "pki"),
        agent_cert_ttl=timedelta(seconds=1),
    )  # fmt: skip
    first, _ = enrollment.create_token({"app": "db"}, 600, 1, actor=OPERATOR)
    enrollment.enroll(first, "db", make_csr(generate_key(), "db"), "db")
    time.sleep(1.2)  # db's certificate has expired; db is not revoked
    second, _ = enrollment.create_token({"app": "web"}, 600, 1, actor=OPERATOR)
    with pytest.raises(Conflict, match="already enrolled; revoke it first"):
        enrollment.enroll(second, "db", make_csr(generate_key(), "db"), "mallory")


def test_heartbeats_are_written_in_batches_and_never_move_back(core: Controller) -> None:
    core.connect(*for_agent(hello("web", "web", "198.18.0.10")))
    stored = core.agent("web").last_seen_ms
    time.sleep(0.01)
    core.heartbeat("web")
    assert core.agent("web").last_seen_ms == stored, "not written per heartbeat"
    assert core.last_seen_ms(core.agent("web")) > stored, "but already counted"
    assert core.flush_last_seen() == 1
    flushed = core.agent("web").last_seen_ms
    assert flushed > stored
    core._seen_ms["web"] = stored  # an older time cannot overwrite a newer one
    core.flush_last_seen()
    assert core.agent("web").last_seen_ms == flushed
    assert core.flush_last_seen() == 0


def test_shutdown_ends_every_stream_with_unavailable_so_agents_reconnect(
    core: Controller,
) -> None:
    sessions = connect_three(core)
    assert core.close_all() == 3
    for session in sessions.values():
        assert session.closed
        assert isinstance(session.failure, Unavailable)
        assert "shutting down" in str(session.failure)
        assert asyncio.run(session.next_message()) is None


def test_agents_with_the_same_rules_share_one_desired_ruleset_per_revision(
    core: Controller,
) -> None:
    core.apply([json.dumps(WEB_DB)], actor=OPERATOR)
    for name, address in (("db-1", "198.18.0.21"), ("db-2", "198.18.0.22")):
        core.connect(*for_agent(hello(name, "db", address)))
    core.connect(*for_agent(hello("web", "web", "198.18.0.10")))
    first = core.desired("db-1")
    assert core.desired("db-2") is first  # its hash is computed once for the group
    assert list(first.ruleset().sets[0].hosts) == ["198.18.0.10"]
    core.connect(*for_agent(hello("web-2", "web", "198.18.0.11")))
    after = core.desired("db-2")
    assert after is not first
    assert after.revision > first.revision
    assert core.desired("db-1") is after
    assert list(after.ruleset().sets[0].hosts) == ["198.18.0.10", "198.18.0.11"]
    assert after.hash == ruleset_hash(after.ruleset())


def test_a_waiting_stream_wakes_for_an_offer_and_survives_a_cancelled_wait(
    core: Controller,
) -> None:
    session = core.connect(*for_agent(hello("web", "web", "198.18.0.10")))
    assert take(session) is not None  # the first snapshot

    async def scenario() -> agent_pb2.ControllerMessage | None:
        waiting = asyncio.create_task(session.next_message())
        await asyncio.sleep(0)
        waiting.cancel()  # the stream went away while it waited
        with pytest.raises(asyncio.CancelledError):
            await waiting
        session.offer(agent_pb2.ControllerMessage(in_sync=agent_pb2.InSync(revision=7)))
        # Offered before anyone waits: the next wait returns it at once.
        first = await asyncio.wait_for(session.next_message(), 1)
        assert first is not None
        assert first.in_sync.revision == 7
        waiting = asyncio.create_task(session.next_message())
        await asyncio.sleep(0)
        assert not waiting.done()
        session.send(agent_pb2.ControllerMessage(in_sync=agent_pb2.InSync(revision=8)))
        return await asyncio.wait_for(waiting, 1)

    message = asyncio.run(scenario())
    assert message is not None
    assert message.in_sync.revision == 8
