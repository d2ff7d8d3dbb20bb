"""TamperGuard against a fake backend whose kernel state the tests change; fingerprints of
both backends from canned listings; the link's tamper backlog; the controller's audit."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.dataplane.backend import DataplaneError
from agent.dataplane.baseline import Baseline, Mode, parse_port_spec
from agent.dataplane.fingerprint import ABSENT, compose, describe, differences
from agent.dataplane.iptables.backend import filter_components, ipset_components
from agent.dataplane.iptables.tables import parse_filter
from agent.dataplane.libnftables import JsonDocument, NftError
from agent.dataplane.nftables import NftablesBackend, table_components
from agent.enforcer import Enforcer
from agent.link import TAMPER_BACKLOG_MAX, ControllerLink
from agent.tamper import TamperGuard, touches_our_table
from bulkhead.v1 import agent_pb2, ruleset_pb2
from bulkhead.v1.contract import ruleset_hash
from tests.pki_support import make_controller

ENFORCE = Baseline(Mode.ENFORCE, failsafe_inbound=(parse_port_spec("tcp/22"),))
VISIBILITY = Baseline(Mode.VISIBILITY)
WAIT_S = 10.0  # bound on waiting for the watcher; never reached when it works


def ruleset(host: str) -> ruleset_pb2.Ruleset:
    return ruleset_pb2.Ruleset(sets=[ruleset_pb2.AddressSet(name="web", hosts=[host])])


R1, R2 = ruleset("198.18.0.1"), ruleset("198.18.0.2")


class FakeKernel:
    """A backend whose 'kernel' is a dict of components the tests can tamper with."""

    def __init__(self) -> None:
        self.components: dict[str, object] = {}
        self.applies: list[tuple[ruleset_pb2.Ruleset, Baseline]] = []
        self.fail_applies = 0  # how many of the next applies raise DataplaneError
        self.failure_leaves: str | None = None  # what a failed apply leaves in chain input
        self.unreadable = False
        self.reads = 0
        self.in_apply: Callable[[], None] = lambda: None

    def apply(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
        self.in_apply()
        if self.fail_applies:
            self.fail_applies -= 1
            if self.failure_leaves is not None:
                self.components["chain input"] = self.failure_leaves
            raise DataplaneError("refused")
        self.applies.append((ruleset, baseline))
        self.components = {
            "table inet bulkhead": "t",
            "chain input": baseline.mode.value,
            "set web_v4": list(ruleset.sets[0].hosts) if ruleset.sets else [],
        }

    def update_elements(
        self,
        changes: Sequence[agent_pb2.SetChange],
        result: ruleset_pb2.Ruleset,
        baseline: Baseline,
    ) -> bool:
        return False  # deltas are applied whole

    def remove(self) -> None:
        self.components = {}

    def is_present(self) -> bool:
        return bool(self.components)

    def state_fingerprint(self) -> str:
        self.reads += 1
        if self.unreadable:
            raise DataplaneError("cannot list")
        return compose(self.components)


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


def guard_for(kernel: FakeKernel, **kw: Any) -> TamperGuard:
    return TamperGuard(kernel, interval=kw.pop("interval", 3600.0), **kw)


# -- detection and repair ----------------------------------------------------------------


def test_a_change_is_repaired_once_reported_and_then_quiet(kernel: FakeKernel) -> None:
    guard = guard_for(kernel)
    guard.backend.apply(R1, ENFORCE)
    assert guard.check() is None, "our own apply is not tampering"
    kernel.components["chain input"] = "accept everything"
    event = guard.check()
    assert event is not None
    assert event.repaired
    assert event.description == "chain input: rules differ"
    assert event.detected_unix_ms > 0
    assert event.repair_seconds >= 0
    assert kernel.applies == [(R1, ENFORCE), (R1, ENFORCE)], "re-applied what was applied"
    assert kernel.components["chain input"] == "enforce"
    assert guard.check() is None, "the repair is not tampering either"
    assert len(kernel.applies) == 2


def test_the_repair_uses_the_latest_apply_and_its_baseline(kernel: FakeKernel) -> None:
    guard = guard_for(kernel)
    guard.backend.apply(R1, ENFORCE)
    guard.backend.apply(R2, VISIBILITY)
    assert guard.check() is None
    kernel.components["set web_v4"] = []
    event = guard.check()
    assert event is not None
    assert event.description == "set web_v4 changed"
    assert kernel.applies[-1] == (R2, VISIBILITY)


def test_a_missing_table_is_named_alone(kernel: FakeKernel) -> None:
    guard = guard_for(kernel)
    guard.backend.apply(R1, ENFORCE)
    kernel.components = {}
    event = guard.check()
    assert event is not None
    assert event.description == "table inet bulkhead missing"
    assert event.repaired


def test_nothing_is_guarded_before_an_apply_or_after_remove(kernel: FakeKernel) -> None:
    guard = guard_for(kernel)
    kernel.components = {"table inet bulkhead": "someone else's"}
    assert guard.check() is None
    guard.backend.apply(R1, ENFORCE)
    guard.backend.remove()
    kernel.components = {"table inet bulkhead": "someone else's"}
    assert guard.check() is None
    assert kernel.applies == [(R1, ENFORCE)]


def test_no_check_while_our_apply_runs(kernel: FakeKernel) -> None:
    guard = guard_for(kernel)
    guard.backend.apply(R1, ENFORCE)
    inside, release = threading.Event(), threading.Event()

    def slow_apply() -> None:
        inside.set()
        assert release.wait(WAIT_S)

    kernel.in_apply = slow_apply
    worker = threading.Thread(target=guard.backend.apply, args=(R2, ENFORCE))
    worker.start()
    try:
        assert inside.wait(WAIT_S)
        kernel.components["chain input"] = "mid-apply state"
        assert guard.check() is None, "a check during our apply must not repair"
    finally:
        release.set()
        worker.join(WAIT_S)
    kernel.in_apply = lambda: None
    assert guard.check() is None
    assert kernel.applies == [(R1, ENFORCE), (R2, ENFORCE)]


def test_a_failed_apply_of_ours_is_not_tampering(kernel: FakeKernel) -> None:
    guard = guard_for(kernel)
    guard.backend.apply(R1, ENFORCE)
    kernel.fail_applies, kernel.failure_leaves = 1, "half an apply"
    with pytest.raises(DataplaneError):
        guard.backend.apply(R2, ENFORCE)
    assert guard.check() is None
    kernel.components["set web_v4"] = []
    assert guard.check() is not None
    assert kernel.applies[-1] == (R1, ENFORCE), "the last good apply is what gets repaired"


def test_a_failing_repair_is_reported_once_and_retried(kernel: FakeKernel) -> None:
    guard = guard_for(kernel)
    guard.backend.apply(R1, ENFORCE)
    kernel.components["chain input"] = "flushed"
    kernel.fail_applies = 2
    first = guard.check()
    assert first is not None
    assert not first.repaired
    assert guard.check() is None, "the same failure is not reported again"
    assert kernel.fail_applies == 0, "but the repair was tried again"
    repaired = guard.check()
    assert repaired is not None
    assert repaired.repaired
    assert guard.check() is None


def test_a_fingerprint_unreadable_after_apply_is_adopted_by_the_next_check(
    kernel: FakeKernel,
) -> None:
    guard = guard_for(kernel)
    kernel.unreadable = True
    guard.backend.apply(R1, ENFORCE)
    assert guard.expected_fingerprint is None
    with pytest.raises(DataplaneError):
        guard.check()
    kernel.unreadable = False
    assert guard.check() is None
    assert guard.expected_fingerprint == compose(kernel.components)


def test_the_enforcer_applies_through_the_guard(kernel: FakeKernel, tmp_path: Path) -> None:
    guard = guard_for(kernel)
    enforcer = Enforcer(guard.backend, ENFORCE, tmp_path, cut_flows=lambda *_: 0)
    enforcer.restore()
    snapshot = agent_pb2.PolicySnapshot(revision=7, hash=ruleset_hash(R2), ruleset=R2)
    assert enforcer.apply(snapshot, []).ok
    assert guard.check() is None
    kernel.components["set web_v4"] = ["198.18.9.9"]
    event = guard.check()
    assert event is not None
    assert kernel.applies[-1] == (R2, ENFORCE)


def test_remember_adopts_an_apply_made_around_the_guard(kernel: FakeKernel) -> None:
    guard = guard_for(kernel)
    kernel.apply(R2, VISIBILITY)  # e.g. a tool that drives the backend itself
    guard.remember(R2, VISIBILITY)
    assert guard.check() is None
    kernel.components.clear()
    assert guard.check() is not None
    assert kernel.applies == [(R2, VISIBILITY), (R2, VISIBILITY)]


# -- the watcher -------------------------------------------------------------------------


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.01)


def test_watch_reports_what_the_periodic_check_repairs(kernel: FakeKernel) -> None:
    guard = guard_for(kernel, interval=0.01)
    guard.backend.apply(R1, ENFORCE)
    events: list[agent_pb2.TamperEvent] = []

    async def report(event: agent_pb2.TamperEvent) -> None:
        events.append(event)

    async def scenario() -> None:
        watcher = asyncio.create_task(guard.watch(report))
        try:
            kernel.components["chain input"] = "accept"
            await _until(lambda: bool(events))
        finally:
            watcher.cancel()

    asyncio.run(scenario())
    assert [event.description for event in events] == ["chain input: rules differ"]


MONITOR_SCRIPT = """
import pathlib, sys, time
trigger = pathlib.Path(sys.argv[1])
for _ in range(1000):
    if trigger.exists():
        break
    time.sleep(0.01)
print('{"add": {"table": {"family": "ip", "name": "other", "handle": 3}}}')
print('x' * 300 + 'bulkhead')
print(sys.argv[2], flush=True)
time.sleep(30)
"""


def test_a_monitor_event_on_our_table_wakes_a_check(kernel: FakeKernel, tmp_path: Path) -> None:
    trigger = tmp_path / "tampered"
    line = json.dumps({"insert": {"rule": {"family": "inet", "table": "bulkhead", "chain": "x"}}})
    monitor = [sys.executable, "-c", MONITOR_SCRIPT, str(trigger), line]
    guard = guard_for(kernel, monitor=monitor)  # no periodic check within the test
    guard.backend.apply(R1, ENFORCE)
    events: list[agent_pb2.TamperEvent] = []

    async def report(event: agent_pb2.TamperEvent) -> None:
        events.append(event)

    async def scenario() -> None:
        watcher = asyncio.create_task(guard.watch(report))
        try:
            reads = kernel.reads
            await _until(lambda: kernel.reads > reads)  # the check when the monitor started
            kernel.components["chain input"] = "accept"
            trigger.touch()
            await _until(lambda: bool(events))
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    asyncio.run(scenario())
    assert len(events) == 1


@pytest.mark.parametrize(
    ("event", "ours"),
    [
        ({"add": {"rule": {"family": "inet", "table": "bulkhead", "chain": "input"}}}, True),
        ({"delete": {"table": {"family": "inet", "name": "bulkhead", "handle": 2}}}, True),
        ({"delete": {"element": {"family": "inet", "table": "bulkhead", "name": "w"}}}, True),
        ({"add": {"table": {"family": "ip", "name": "bulkhead", "handle": 3}}}, False),
        ({"add": {"rule": {"family": "inet", "table": "filter", "comment": "bulkhead"}}}, False),
        ("not an event bulkhead", False),
    ],
)
def test_monitor_events_about_our_table(event: object, ours: bool) -> None:
    line = event.encode() if isinstance(event, str) else json.dumps(event).encode()
    assert touches_our_table(line) is ours


# -- fingerprints --------------------------------------------------------------------------


def test_descriptions_say_what_differs_and_cap_the_list() -> None:
    before = compose({f"set s{i}": i for i in range(6)} | {"chain input": 1})
    after = compose({f"set s{i}": -i for i in range(1, 6)} | {"chain input": 2, "set new": 0})
    assert differences(before, after)[:2] == ["set s0 missing", "chain input: rules differ"]
    assert describe(before, after) == (
        "set s0 missing; chain input: rules differ; set s1 changed; set s2 changed; and 4 more"
    )
    assert describe(before, ABSENT) == (
        "chain input missing; set s0 missing; set s1 missing; set s2 missing; and 3 more"
    )


def _rule(handle: int, packets: int) -> dict[str, Any]:
    expr = [{"counter": {"packets": packets, "bytes": packets * 60}}, {"drop": None}]
    return {"rule": {"family": "inet", "table": "bulkhead", "chain": "input", "handle": handle,
                     "expr": expr}}  # fmt: skip


def _listing(*items: dict[str, Any]) -> JsonDocument:
    return {"nftables": [{"metainfo": {"version": "1.0.6"}}, *items]}


def _set(*elements: str) -> dict[str, Any]:
    return {"set": {"family": "inet", "table": "bulkhead", "name": "web_v4", "elem": [*elements]}}


def test_nft_fingerprint_ignores_counters_and_element_order_but_not_handles() -> None:
    def fingerprint(*items: dict[str, Any]) -> str:
        return compose(table_components(_listing(*items)))

    base = fingerprint(_rule(4, 0), _set("198.18.0.1", "198.18.0.2"))
    assert fingerprint(_rule(4, 99), _set("198.18.0.2", "198.18.0.1")) == base
    assert fingerprint(_rule(5, 0), _set("198.18.0.1", "198.18.0.2")) != base
    assert fingerprint(_rule(4, 0), _set("198.18.0.1")) != base


class ListingRunner:
    def __init__(self, tables: list[dict[str, Any]]) -> None:
        self.tables = tables

    def json_cmd(self, document: JsonDocument) -> JsonDocument:
        (command,) = document["nftables"]
        if "table" in command["list"]:
            raise NftError("Error: No such file or directory")
        return {"nftables": self.tables}


def test_nft_fingerprint_of_an_absent_table() -> None:
    assert NftablesBackend(ListingRunner([])).state_fingerprint() == ABSENT
    ours = [{"table": {"family": "inet", "name": "bulkhead"}}]
    with pytest.raises(NftError):  # the table is there but cannot be listed: not "absent"
        NftablesBackend(ListingRunner(ours)).state_fingerprint()


SAVED = """*filter
:INPUT ACCEPT [10:600]
:OUTPUT ACCEPT [0:0]
:BULKHEAD-INPUT - [0:0]
-A INPUT -j BULKHEAD-INPUT
-A INPUT -p tcp -m tcp --dport 9999 -j DROP
-A BULKHEAD-INPUT -i lo -j RETURN
COMMIT
"""


def test_iptables_components_hold_our_rules_and_where_the_jumps_are() -> None:
    components = filter_components(4, parse_filter(SAVED))
    assert components == {
        "ipv4 chain BULKHEAD-INPUT": ["-A BULKHEAD-INPUT -i lo -j RETURN"],
        "ipv4 jump from INPUT": [[0, "-A INPUT -j BULKHEAD-INPUT"]],
    }
    moved = SAVED.replace(
        "-A INPUT -j BULKHEAD-INPUT\n-A INPUT -p tcp -m tcp --dport 9999 -j DROP",
        "-A INPUT -p tcp -m tcp --dport 9999 -j DROP\n-A INPUT -j BULKHEAD-INPUT",
    )
    assert filter_components(4, parse_filter(moved))["ipv4 jump from INPUT"] == [
        [1, "-A INPUT -j BULKHEAD-INPUT"]
    ]


def test_ipset_components_ignore_the_hash_seed_member_order_and_other_sets() -> None:
    def saved(seed: str, members: list[str]) -> str:
        lines = [f"create bh4-web hash:net family inet hashsize 1024 initval {seed}"]
        lines += [f"add bh4-web {member}" for member in members]
        lines += ["create docker hash:ip family inet", "add docker 198.18.7.7"]
        return "\n".join(lines)

    first = ipset_components(saved("0x1", ["198.18.0.1/32", "198.18.1.0/24"]))
    assert list(first) == ["ipset bh4-web"]
    assert ipset_components(saved("0x2", ["198.18.1.0/24", "198.18.0.1/32"])) == first
    assert ipset_components(saved("0x1", ["198.18.0.1/32"])) != first


# -- the link and the controller -------------------------------------------------------------


def test_the_link_keeps_the_latest_tamper_reports_until_the_stream_is_up(
    tmp_path: Path, kernel: FakeKernel
) -> None:
    enforcer = Enforcer(kernel, ENFORCE, tmp_path)
    link = ControllerLink(
        "198.18.0.1:1", agent_id="web", state_dir=tmp_path, enforcer=enforcer,
        make_hello=agent_pb2.Hello, discover=list, heartbeat_interval=5, address_poll_interval=2,
    )  # fmt: skip

    async def scenario() -> list[int]:
        for ms in range(TAMPER_BACKLOG_MAX + 50):
            await link.report_tamper(agent_pb2.TamperEvent(detected_unix_ms=ms))
        outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        link._outbox = outbox  # a stream the controller has answered
        link._stream_up_at = 1.0
        await link.report_tamper(agent_pb2.TamperEvent(detected_unix_ms=1000))
        return [outbox.get_nowait().tamper.detected_unix_ms for _ in range(outbox.qsize())]

    sent = asyncio.run(scenario())
    assert sent == [*range(51, TAMPER_BACKLOG_MAX + 50), 1000], "the oldest were dropped"


def test_the_controller_audits_tamper_reports(tmp_path: Path) -> None:
    core = make_controller(tmp_path)
    event = agent_pb2.TamperEvent(
        detected_unix_ms=5, description="set web_v4 changed", repaired=True, repair_seconds=0.25
    )
    core.agent_events.tampered("web", event)
    (record,) = core.agent_events.tamper_events("web")
    assert (record.actor, record.action, record.target) == (
        "agent:web",
        "agent.tamper",
        "agent/web",
    )
    assert json.loads(record.detail) == {
        "description": "set web_v4 changed",
        "repaired": True,
        "repair_seconds": 0.25,
        "detected_unix_ms": 5,
    }
    assert core.agent_events.tamper_events("db") == []
