"""Policy deltas with the iptables backend against the real kernel: set elements change
through one `ipset restore`, our chains stay as they were (their rule counters too, which
any rewrite would reset), and what does not fit changes nothing or is applied whole.

A driver process (DRIVER) holds the backend, as the agent does, inside the namespace: it
applies the web_db golden case through an Enforcer and the iptables TamperGuard, then
carries out one command per stdin line. The test reads the kernel from outside with
ipset and iptables-legacy-save. Namespaces are named ``bh-ti-<tag>-<random>`` and removed
on exit, even after a failure.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.dataplane.iptables.plan import TABLES
from tests.integration.nslab import PYTHON, Namespace, link
from tests.integration.test_iptables_backend import (
    _REASON,
    DB,
    SAVE,
    SERVER_LIFETIME,
    WEB,
    connect,
    ipset_members,
    namespace,
    plan_for,
)
from tests.integration.test_nft_backend import ECHO_SERVER

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_REASON is not None, reason=f"iptables lab unavailable: {_REASON}"),
]

CASE = Path(__file__).resolve().parents[1] / "golden" / "nftables" / "web_db.input.json"
DRIVER_LIFETIME = 120  # seconds; the fixture kills it sooner
TABLE_WRITERS = ("iptables-legacy-restore", "ip6tables-legacy-restore")

# argv: the case file, a state directory, the lifetime. Reads JSON commands, one per line:
# {"delta": [SetChange...]} through Enforcer.apply_delta (then a tamper check), or
# {"update": [SetChange...], "port": N} straight to IptablesBackend.update_elements with
# the first rule's port set to N (rules changed). Answers one JSON line each, with the
# commands the backend ran.
DRIVER = """
import json, signal, sys
from pathlib import Path
from google.protobuf import json_format
from agent.dataplane.baseline import baseline_from_json
from agent.dataplane.iptables import IptablesBackend, SubprocessRunner
from agent.enforcer import Enforcer
from agent.tamper import TamperGuard
from bulkhead.v1 import agent_pb2, ruleset_pb2
from bulkhead.v1.contract import apply_set_changes, ruleset_hash

signal.alarm(int(sys.argv[3]))

class Recording(SubprocessRunner):
    commands = []
    def run(self, argv, stdin=None):
        self.commands.append(" ".join(argv))
        return super().run(argv, stdin)

request = json.load(open(sys.argv[1]))
ruleset = json_format.ParseDict(request["ruleset"], ruleset_pb2.Ruleset())
baseline = baseline_from_json(json.dumps(request["baseline"]))
runner = Recording()
backend = IptablesBackend(runner)
guard = TamperGuard.for_dataplane("iptables", backend)
enforcer = Enforcer(guard.backend, baseline, Path(sys.argv[2]), cut_flows=lambda *_: 0)
snapshot = agent_pb2.PolicySnapshot(revision=1, hash=ruleset_hash(ruleset), ruleset=ruleset)
print(json.dumps({"ok": enforcer.apply(snapshot, []).ok}), flush=True)
for line in sys.stdin:
    command = json.loads(line)
    held = enforcer.current
    runner.commands.clear()
    if "delta" in command:
        changes = [agent_pb2.SetChange(**change) for change in command["delta"]]
        result = apply_set_changes(held.ruleset, changes)
        delta = agent_pb2.PolicyDelta(base_revision=held.revision, base_hash=held.hash,
            revision=held.revision + 1, hash=ruleset_hash(result), sets=changes)
        ack = enforcer.apply_delta(delta, [])
        reply = {"ok": ack.ok, "error": ack.error, "commands": list(runner.commands),
                 "tamper": guard.check() is not None}
    else:
        changes = [agent_pb2.SetChange(**change) for change in command["update"]]
        result = apply_set_changes(held.ruleset, changes)
        result.rules[0].ports[0].first = result.rules[0].ports[0].last = command["port"]
        took = backend.update_elements(changes, result, baseline)
        reply = {"took": took, "commands": list(runner.commands)}
    reply["ruleset"] = json_format.MessageToDict(result)
    print(json.dumps(reply), flush=True)
"""


class Driver:
    """DRIVER running in a namespace, spoken to one line at a time."""

    def __init__(self, ns: Namespace, state_dir: Path) -> None:
        argv = [PYTHON, "-c", DRIVER, str(CASE), str(state_dir), str(DRIVER_LIFETIME)]
        self.process = ns.popen(argv)
        assert self._reply() == {"ok": True}

    def _reply(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # bounded: the driver ends itself (alarm)
        assert line, f"driver ended: {self.process.stderr.read() if self.process.stderr else ''}"
        return json.loads(line)

    def send(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        reply: dict[str, Any] = self._reply()
        return reply

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def single(tmp_path: Path) -> Iterator[tuple[Namespace, Driver]]:
    with namespace("delta") as ns:
        driver = Driver(ns, tmp_path)
        try:
            yield ns, driver
        finally:
            driver.stop()


def counted_tables(ns: Namespace) -> str:
    """Both tables of both families with their counters, less timestamped comments."""
    text = "".join(ns.run([SAVE[f], "-t", table, "-c"]).stdout for f in (4, 6) for table in TABLES)
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))


LOOPBACK = """
import socket
for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    socket.socket(family).connect_ex((host, 9))
"""


def loopback_traffic(ns: Namespace) -> None:
    """Packets through our chains' loopback rules in both families (refused connections)."""
    ns.run([PYTHON, "-c", LOOPBACK])


def expected_members(ruleset: dict[str, Any]) -> dict[str, set[str]]:
    request = {"ruleset": ruleset, "baseline": json.loads(CASE.read_text())["baseline"]}
    return {ipset.name: set(ipset.members) for ipset in plan_for(request).ipsets}


def test_deltas_change_set_members_only(single: tuple[Namespace, Driver]) -> None:
    ns, driver = single
    assert ipset_members(ns) == expected_members(json.loads(CASE.read_text())["ruleset"])
    loopback_traffic(ns)
    before = counted_tables(ns)
    assert "[0:0] -A BULKHEAD-INPUT -i lo" not in before, "counters to watch"
    deltas = [
        {"name": "db", "add_hosts": ["198.18.0.77", "2001:db8::77"],
         "remove_hosts": ["198.18.0.2"], "add_networks": ["198.18.4.0/25"]},
        {"name": "db", "add_networks": ["198.18.4.128/25"], "remove_hosts": ["2001:db8::2"]},
    ]  # fmt: skip
    for change in deltas:
        reply = driver.send({"delta": [change]})
        assert reply["ok"], reply["error"]
        assert reply["commands"].count("ipset restore") == 1
        assert not [c for c in reply["commands"] if c.startswith(TABLE_WRITERS)]
        assert not reply["tamper"]
        assert ipset_members(ns) == expected_members(reply["ruleset"])
        assert counted_tables(ns) == before, "no rule rewritten (counters kept)"
    members = ipset_members(ns)
    assert members["bh4-db"] == {"198.18.0.77/32", "198.18.4.0/24"}
    assert members["bh6-db"] == {"2001:db8::77/128"}
    assert members["bh4-web"] == {"198.18.0.1/32"}


def test_a_delta_with_other_rules_changes_nothing(single: tuple[Namespace, Driver]) -> None:
    ns, driver = single
    loopback_traffic(ns)
    tables, sets = counted_tables(ns), ns.run(["ipset", "save"]).stdout
    reply = driver.send({"update": [{"name": "db", "add_hosts": ["198.18.0.77"]}], "port": 5433})
    assert not reply["took"]
    assert reply["commands"] == []
    assert counted_tables(ns) == tables
    assert ns.run(["ipset", "save"]).stdout == sets


def test_a_set_swapped_by_someone_else_makes_the_update_fall_back_to_a_full_apply(
    single: tuple[Namespace, Driver],
) -> None:
    ns, driver = single
    # Someone swaps a one-element set in for ours: the update's `add` finds it full.
    ns.run(["ipset", "create", "user-db", "hash:net", "family", "inet", "maxelem", "1"])
    ns.run(["ipset", "add", "user-db", "198.18.9.9"])
    ns.run(["ipset", "swap", "user-db", "bh4-db"])
    loopback_traffic(ns)
    assert "[0:0] -A BULKHEAD-INPUT -i lo" not in counted_tables(ns)
    reply = driver.send({"update": [{"name": "db", "add_hosts": ["198.18.0.77"]}], "port": 5432})
    assert reply["took"]
    assert reply["commands"][:3] == ["ipset restore", "ipset list -n", "ipset restore"]
    members = ipset_members(ns)
    assert members.pop("user-db") == {"198.18.0.2/32"}, "someone else's set is left alone"
    assert members == expected_members(reply["ruleset"])
    assert "[0:0] -A BULKHEAD-INPUT -i lo" in counted_tables(ns), "the chains were rewritten"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Namespace, Driver]]:
    """Namespaces web and db joined by a veth pair; db serves 5432 and runs the driver."""
    with namespace("web") as web, namespace("db") as db:
        link(web, db, [f"{WEB[4]}/24", f"{WEB[6]}/64"], [f"{DB[4]}/24", f"{DB[6]}/64"])
        server = db.popen([PYTHON, "-c", ECHO_SERVER, "5432", str(SERVER_LIFETIME)])
        driver: Driver | None = None
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "ready"
            driver = Driver(db, tmp_path)
            yield web, driver
        finally:
            if driver is not None:
                driver.stop()
            server.kill()
            server.wait(timeout=10)


def test_new_connections_follow_the_peers_a_delta_removes_and_adds(
    served: tuple[Namespace, Driver],
) -> None:
    web, driver = served
    for family in (4, 6):
        assert connect(web, DB[family], 5432) == "connected"
    gone = driver.send({"delta": [{"name": "web", "remove_hosts": list(WEB.values())}]})
    assert gone["ok"], gone["error"]
    for family in (4, 6):
        assert connect(web, DB[family], 5432) == "timeout"
    back = driver.send({"delta": [{"name": "web", "add_hosts": [WEB[4]]}]})
    assert back["ok"], back["error"]
    assert connect(web, DB[4], 5432) == "connected"
    assert connect(web, DB[6], 5432) == "timeout"
    for reply in (gone, back):
        assert not [c for c in reply["commands"] if c.startswith(TABLE_WRITERS)]
