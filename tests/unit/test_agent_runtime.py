"""Agent config, persisted state and the enforcer, with a recording in-memory backend."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, split_host_port
from agent.dataplane.backend import DataplaneError, RulesetError
from agent.dataplane.baseline import Baseline, Mode
from agent.enforcer import Enforcer
from agent.link import Backoff, ControllerLink, ResyncNeeded
from agent.state import (
    SNAPSHOT_FILE,
    AppliedSnapshot,
    StateCorrupt,
    load_snapshot,
    save_snapshot,
)
from bulkhead.v1 import agent_pb2, ruleset_pb2
from bulkhead.v1.contract import legacy_ruleset_hash, ruleset_hash

ENFORCE = Baseline(Mode.ENFORCE, (), (), ())


class RecordingBackend:
    """Stands in for the kernel: remembers what is loaded; can be told to refuse."""

    def __init__(self) -> None:
        self.loaded: ruleset_pb2.Ruleset | None = None
        self.applies = 0
        self.refuse: str | None = None

    def apply(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
        if self.refuse:
            raise DataplaneError(self.refuse)
        self.applies += 1
        self.loaded = ruleset

    def update_elements(
        self,
        changes: Sequence[agent_pb2.SetChange],
        result: ruleset_pb2.Ruleset,
        baseline: Baseline,
    ) -> bool:
        return False  # deltas are applied whole

    def remove(self) -> None:
        self.loaded = None

    def is_present(self) -> bool:
        return self.loaded is not None

    def state_fingerprint(self) -> str:  # the Backend protocol (tamper detection)
        return str(self.loaded)


def sample_ruleset() -> ruleset_pb2.Ruleset:
    return ruleset_pb2.Ruleset(
        sets=[ruleset_pb2.AddressSet(name="p_web", hosts=["198.18.0.10"])],
        rules=[
            ruleset_pb2.Rule(
                direction=ruleset_pb2.DIRECTION_INGRESS,
                protocol=ruleset_pb2.PROTOCOL_TCP,
                ports=[ruleset_pb2.PortRange(first=5432, last=5432)],
                peer_set="p_web",
                action=ruleset_pb2.ACTION_ALLOW,
                policy="web-db",
                id="abc",
            )
        ],
    )


def snapshot(revision: int = 7) -> agent_pb2.PolicySnapshot:
    ruleset = sample_ruleset()
    return agent_pb2.PolicySnapshot(revision=revision, hash=ruleset_hash(ruleset), ruleset=ruleset)


class Cuts:
    def __init__(self) -> None:
        self.calls = 0
        self.judged_by: list[tuple[ruleset_pb2.Ruleset, tuple[str, ...]]] = []

    def __call__(
        self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline, addrs: Sequence[str]
    ) -> int:
        self.calls += 1
        self.judged_by.append((ruleset, tuple(addrs)))
        return 0


# -- config --------------------------------------------------------------------------


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "a.yaml"
    good.write_text("agent_id: web\ncontroller: 198.18.0.1:50151\nlabels: {app: web}\n")
    config = load_config(good)
    assert config.mode is Mode.ENFORCE
    assert config.failsafe.inbound == ["tcp/22"]
    bad = tmp_path / "b.yaml"
    bad.write_text(
        "agent_id: Web One\ncontroller: nohost\nmode: loud\nfailsafe: {inbound: [tcp/0]}\nx: 1\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_config(bad)
    text = str(raised.value)
    for field in ("agent_id:", "controller:", "mode:", "failsafe.inbound:", "x: unknown setting"):
        assert field in text
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_controller_address_must_be_an_ip_literal() -> None:
    assert split_host_port("[2001:db8::1]:50151") == ("2001:db8::1", 50151)
    assert split_host_port("198.18.0.1:7") == ("198.18.0.1", 7)
    with pytest.raises(ValueError, match="ADDRESS:PORT"):
        split_host_port("198.18.0.1")
    with pytest.raises(ValueError, match="DNS lookups"):
        split_host_port("ctl.example:7")
    with pytest.raises(ValueError, match="in brackets"):
        split_host_port("2001:db8::1:50151")


def test_config_refuses_labels_the_controller_would_refuse(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("agent_id: web\ncontroller: 198.18.0.1:1\nlabels: {'bad key!': x}\n")
    with pytest.raises(ConfigError, match=r"labels: .*label keys are"):
        load_config(path)
    path.write_bytes(b"agent_id: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)
    path.write_text("agent_id: web\ncontroller: 198.18.0.1:1\nheartbeat_interval: .inf\n")
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        load_config(path)


# -- state ---------------------------------------------------------------------------


def test_snapshot_round_trip_and_corruption(tmp_path: Path) -> None:
    ruleset = sample_ruleset()
    save_snapshot(tmp_path, AppliedSnapshot(3, ruleset_hash(ruleset), ruleset))
    loaded = load_snapshot(tmp_path)
    assert loaded is not None
    assert loaded.ruleset == ruleset
    assert (tmp_path / SNAPSHOT_FILE).stat().st_mode & 0o777 == 0o600
    text = (tmp_path / SNAPSHOT_FILE).read_text()
    (tmp_path / SNAPSHOT_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(StateCorrupt, match="unreadable"):
        load_snapshot(tmp_path)
    (tmp_path / SNAPSHOT_FILE).write_text(
        text.replace('"revision": 3', '"revision": 4').replace(ruleset_hash(ruleset), "0" * 64)
    )
    with pytest.raises(StateCorrupt, match="does not match its hash"):
        load_snapshot(tmp_path)


def test_a_state_file_with_the_older_hash_is_read_and_rekeyed(tmp_path: Path) -> None:
    ruleset = sample_ruleset()
    save_snapshot(tmp_path, AppliedSnapshot(3, legacy_ruleset_hash(ruleset), ruleset))
    loaded = load_snapshot(tmp_path)
    assert loaded is not None
    assert loaded.ruleset == ruleset
    assert loaded.hash == ruleset_hash(ruleset) != legacy_ruleset_hash(ruleset)


# -- enforcer ------------------------------------------------------------------------


def test_restore_without_state_enforces_the_baseline(tmp_path: Path) -> None:
    backend = RecordingBackend()
    Enforcer(backend, ENFORCE, tmp_path).restore()
    assert backend.loaded == ruleset_pb2.Ruleset()


def test_restore_reapplies_saved_snapshot(tmp_path: Path) -> None:
    first = Enforcer(RecordingBackend(), ENFORCE, tmp_path, cut_flows=Cuts())
    first.apply(snapshot(), [])
    backend = RecordingBackend()
    restarted = Enforcer(backend, ENFORCE, tmp_path)
    restarted.restore()
    assert backend.loaded == sample_ruleset()
    assert restarted.applied_revision == 7


def test_corrupt_state_keeps_rules_in_kernel(tmp_path: Path) -> None:
    (tmp_path / SNAPSHOT_FILE).write_text("{garbage")
    backend = RecordingBackend()
    backend.loaded = sample_ruleset()  # what the previous agent left in the kernel
    Enforcer(backend, ENFORCE, tmp_path).restore()
    assert backend.applies == 0
    assert backend.loaded == sample_ruleset()


def test_apply_acks_persists_and_cuts_after_the_ack(tmp_path: Path) -> None:
    backend, cuts = RecordingBackend(), Cuts()
    enforcer = Enforcer(backend, ENFORCE, tmp_path, cut_flows=cuts)
    ack = enforcer.apply(snapshot(), ["198.18.0.11"])
    assert ack.ok
    assert ack.revision == 7
    assert load_snapshot(tmp_path) is not None
    assert cuts.calls == 0, "the ack does not wait for the conntrack cut"
    enforcer.cut_pending()
    assert cuts.calls == 1
    assert cuts.judged_by == [(sample_ruleset(), ("198.18.0.11",))]
    enforcer.cut_pending()
    assert cuts.calls == 1, "one cut per apply"
    again = enforcer.apply(snapshot(8), [])  # same content: acknowledged, not re-applied
    assert again.ok
    assert backend.applies == 1


def test_quick_cuts_are_verified_by_a_thorough_one_once_they_settle(tmp_path: Path) -> None:
    now = [100.0]
    quick, thorough = Cuts(), Cuts()
    enforcer = Enforcer(
        RecordingBackend(), ENFORCE, tmp_path, cut_flows=quick, verify_flows=thorough,
        clock=lambda: now[0],
    )  # fmt: skip
    assert not enforcer.verification_due()
    for revision in (7, 8):  # a burst: the check waits until it is over
        newer = snapshot(revision)
        newer.ruleset.rules[0].ports[0].first = newer.ruleset.rules[0].ports[0].last = revision
        newer.hash = ruleset_hash(newer.ruleset)
        assert enforcer.apply(newer, ["198.18.0.11"]).ok
        enforcer.cut_pending()
        now[0] += 4.0
        assert not enforcer.verification_due()
    now[0] += 1.0  # 5 s after the last quick cut
    assert enforcer.verification_due()
    enforcer.verify_cut()
    assert quick.calls == 2
    assert thorough.judged_by == [(newer.ruleset, ("198.18.0.11",))], "the ruleset in force"
    assert not enforcer.verification_due()
    assert enforcer.verify_cut() == 0
    assert thorough.calls == 1


def test_quick_cuts_every_few_seconds_are_still_verified_within_30_s(tmp_path: Path) -> None:
    now = [0.0]
    enforcer = Enforcer(
        RecordingBackend(), ENFORCE, tmp_path, cut_flows=Cuts(), verify_flows=Cuts(),
        clock=lambda: now[0],
    )  # fmt: skip
    assert enforcer.apply(snapshot(), []).ok
    while now[0] < 30.0:
        assert not enforcer.verification_due()
        enforcer._cut_due = (sample_ruleset(), ())  # as every apply of a new policy does
        enforcer.cut_pending()
        now[0] += 3.0
    assert enforcer.verification_due()


def test_without_a_thorough_cut_nothing_is_verified(tmp_path: Path) -> None:
    enforcer = Enforcer(RecordingBackend(), ENFORCE, tmp_path, cut_flows=Cuts())
    assert enforcer.apply(snapshot(), []).ok
    enforcer.cut_pending()
    assert not enforcer.verification_due()


def test_visibility_mode_cuts_nothing(tmp_path: Path) -> None:
    cuts = Cuts()
    enforcer = Enforcer(
        RecordingBackend(), Baseline(Mode.VISIBILITY, (), (), ()), tmp_path, cut_flows=cuts
    )
    assert enforcer.apply(snapshot(), []).ok
    enforcer.cut_pending()
    assert cuts.calls == 0


def test_refused_or_tampered_snapshot_is_nacked_and_not_persisted(tmp_path: Path) -> None:
    backend = RecordingBackend()
    backend.refuse = "Could not process rule: No such file or directory"
    enforcer = Enforcer(backend, ENFORCE, tmp_path, cut_flows=Cuts())
    ack = enforcer.apply(snapshot(), [])
    assert not ack.ok
    assert "No such file" in ack.error
    assert load_snapshot(tmp_path) is None
    backend.refuse = None
    forged = snapshot()
    forged.hash = "0" * 64
    ack = enforcer.apply(forged, [])
    assert not ack.ok
    assert "hash mismatch" in ack.error
    assert backend.applies == 0


def test_backoff_is_jittered_and_capped() -> None:
    backoff = Backoff(initial=0.5, maximum=4.0)
    delays = [backoff.next_delay() for _ in range(20)]
    assert all(0.25 <= d <= 4.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 10, "delays must not be in lockstep"


def test_failed_cut_still_acks_and_failed_save_does_not(tmp_path: Path) -> None:
    def broken_cut(ruleset: ruleset_pb2.Ruleset, baseline: Baseline, addrs: Sequence[str]) -> int:
        raise DataplaneError("conntrack netlink: permission denied")

    enforcer = Enforcer(RecordingBackend(), ENFORCE, tmp_path, cut_flows=broken_cut)
    assert enforcer.apply(snapshot(), []).ok
    assert enforcer.cut_pending() == 0, "the rules are in force; a failed cut is logged"
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    unsaved = Enforcer(RecordingBackend(), ENFORCE, blocked, cut_flows=Cuts())
    ack = unsaved.apply(snapshot(), [])
    assert not ack.ok
    assert "not saved" in ack.error


def test_saved_snapshot_refused_by_backend_keeps_kernel_rules(tmp_path: Path) -> None:
    Enforcer(RecordingBackend(), ENFORCE, tmp_path, cut_flows=Cuts()).apply(snapshot(), [])

    class Strict(RecordingBackend):
        def apply(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
            if ruleset.rules:
                raise RulesetError("rules[0].ports[0]: newly refused")
            super().apply(ruleset, baseline)

    kept = Strict()
    kept.loaded = sample_ruleset()
    Enforcer(kept, ENFORCE, tmp_path).restore()
    assert kept.loaded == sample_ruleset(), "the table in the kernel must stay"
    empty = Strict()
    Enforcer(empty, ENFORCE, tmp_path).restore()
    assert empty.loaded == ruleset_pb2.Ruleset(), "with nothing loaded, the baseline is applied"


def test_in_sync_for_a_ruleset_we_do_not_enforce_forces_a_resync(tmp_path: Path) -> None:
    enforcer = Enforcer(RecordingBackend(), ENFORCE, tmp_path, cut_flows=Cuts())
    link = ControllerLink(
        "198.18.0.1:1", agent_id="web", state_dir=tmp_path, enforcer=enforcer,
        make_hello=agent_pb2.Hello, discover=list, heartbeat_interval=5, address_poll_interval=2,
    )  # fmt: skip
    message = agent_pb2.ControllerMessage(in_sync=agent_pb2.InSync(revision=3, hash="ab" * 32))
    outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
    with pytest.raises(ResyncNeeded):
        asyncio.run(link._handle(message, outbox))


def test_commit_confirm_rolls_back_a_ruleset_that_cuts_off_the_controller(tmp_path: Path) -> None:
    backend = RecordingBackend()
    reachable = iter([True, False])
    enforcer = Enforcer(
        backend, ENFORCE, tmp_path, cut_flows=Cuts(), confirm=lambda: next(reachable)
    )
    assert enforcer.apply(snapshot(7), []).ok
    newer = sample_ruleset()
    newer.rules[0].ports[0].first = newer.rules[0].ports[0].last = 6000
    bad = agent_pb2.PolicySnapshot(revision=8, hash=ruleset_hash(newer), ruleset=newer)
    ack = enforcer.apply(bad, [])
    assert not ack.ok
    assert "rolled back" in ack.error
    assert backend.loaded == sample_ruleset(), "the previous ruleset must be back"
    assert enforcer.applied_revision == 7
    saved = load_snapshot(tmp_path)
    assert saved is not None
    assert saved.revision == 7


def test_the_commit_confirm_probe_is_reset_not_left_in_time_wait() -> None:
    # A FIN close would leave a TIME_WAIT socket and conntrack entry for 2 minutes per
    # apply, which every later conntrack cut reads and judges.
    import socket

    from agent.confirm import controller_reachable
    from agent.dataplane.baseline import Endpoint

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert controller_reachable([Endpoint("127.0.0.1", server.getsockname()[1])], within=1.0)
        accepted, _ = server.accept()
        with accepted, pytest.raises(ConnectionResetError):
            accepted.recv(1)


def test_controller_reachable_needs_a_new_connection(tmp_path: Path) -> None:
    import socket

    from agent.confirm import controller_reachable
    from agent.dataplane.baseline import Endpoint

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert controller_reachable([Endpoint("127.0.0.1", port)], within=1.0)
    assert not controller_reachable([Endpoint("127.0.0.1", port)], within=0.3)


# -- deltas --------------------------------------------------------------------------


def delta_to(hosts: list[str], base: agent_pb2.PolicySnapshot) -> agent_pb2.PolicyDelta:
    after = ruleset_pb2.Ruleset()
    after.CopyFrom(base.ruleset)
    after.sets[0].hosts[:] = hosts
    before_hosts = set(base.ruleset.sets[0].hosts)
    change = agent_pb2.SetChange(
        name="p_web",
        add_hosts=[h for h in hosts if h not in before_hosts],
        remove_hosts=[h for h in base.ruleset.sets[0].hosts if h not in hosts],
    )
    return agent_pb2.PolicyDelta(
        base_revision=base.revision, base_hash=base.hash, revision=base.revision + 1,
        hash=ruleset_hash(after), sets=[change],
    )  # fmt: skip


def test_a_delta_changes_what_is_enforced_and_is_persisted(tmp_path: Path) -> None:
    backend = RecordingBackend()
    enforcer = Enforcer(backend, ENFORCE, tmp_path, cut_flows=Cuts())
    base = snapshot()
    assert enforcer.apply(base, []).ok
    delta = delta_to(["198.18.0.10", "198.18.0.20"], base)
    ack = enforcer.apply_delta(delta, [])
    assert ack.ok, ack.error
    assert (ack.revision, ack.hash) == (8, delta.hash)
    assert backend.loaded is not None
    assert list(backend.loaded.sets[0].hosts) == ["198.18.0.10", "198.18.0.20"]
    assert list(backend.loaded.rules) == list(base.ruleset.rules)
    saved = load_snapshot(tmp_path)
    assert saved is not None
    assert (saved.revision, saved.hash) == (8, delta.hash)
    assert enforcer.applied_hash == delta.hash


def test_a_delta_that_does_not_fit_asks_for_a_snapshot_and_changes_nothing(
    tmp_path: Path,
) -> None:
    backend = RecordingBackend()
    enforcer = Enforcer(backend, ENFORCE, tmp_path, cut_flows=Cuts())
    base = snapshot()
    nothing_held = enforcer.apply_delta(delta_to(["198.18.0.20"], base), [])
    assert (nothing_held.ok, nothing_held.need_snapshot) == (False, True)
    assert enforcer.apply(base, []).ok
    other_base = delta_to(["198.18.0.20"], base)
    other_base.base_hash = "0" * 64
    wrong_result = delta_to(["198.18.0.20"], base)
    wrong_result.hash = "1" * 64
    removes_absent = delta_to(["198.18.0.20"], base)
    removes_absent.sets[0].remove_hosts[:] = ["198.18.0.99"]
    for bad, why in (
        (other_base, "this host holds"),
        (wrong_result, "does not match its hash"),
        (removes_absent, "does not hold"),
    ):
        ack = enforcer.apply_delta(bad, [])
        assert (ack.ok, ack.need_snapshot) == (False, True)
        assert why in ack.error
    assert backend.applies == 1
    assert enforcer.applied_hash == base.hash
    saved = load_snapshot(tmp_path)
    assert saved is not None
    assert saved.hash == base.hash
    backend.remove()  # someone deleted the table: the delta has nothing to change
    ack = enforcer.apply_delta(delta_to(["198.18.0.20"], base), [])
    assert (ack.ok, ack.need_snapshot) == (False, True)


def test_only_a_delta_that_removes_peers_cuts_and_then_by_the_latest_ruleset(
    tmp_path: Path,
) -> None:
    cuts = Cuts()
    enforcer = Enforcer(RecordingBackend(), ENFORCE, tmp_path, cut_flows=cuts)
    base = snapshot()
    assert enforcer.apply(base, []).ok
    enforcer.cut_pending()
    grow = delta_to(["198.18.0.10", "198.18.0.20"], base)
    assert enforcer.apply_delta(grow, []).ok
    enforcer.cut_pending()
    assert cuts.calls == 1, "adding peers cannot end an allowed connection"
    shrink = delta_to(["198.18.0.20"], enforcer_snapshot(enforcer))
    assert enforcer.apply_delta(shrink, []).ok
    regrow = delta_to(["198.18.0.20", "198.18.0.30"], enforcer_snapshot(enforcer))
    assert enforcer.apply_delta(regrow, []).ok  # before the cut ran: it judges by this one
    enforcer.cut_pending()
    assert cuts.calls == 2
    assert list(cuts.judged_by[-1][0].sets[0].hosts) == ["198.18.0.20", "198.18.0.30"]


def enforcer_snapshot(enforcer: Enforcer) -> agent_pb2.PolicySnapshot:
    assert enforcer.current is not None
    held = agent_pb2.PolicySnapshot(revision=enforcer.current.revision, hash=enforcer.current.hash)
    held.ruleset.CopyFrom(enforcer.current.ruleset)
    return held
