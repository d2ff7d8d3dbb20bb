"""Coalescing: a burst of agent-reported changes is compiled once and pushed once per
affected agent; operator changes are not delayed; a connecting agent is synced either way."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from bulkhead.v1 import agent_pb2
from controller.core import Controller
from controller.sessions import AgentSession
from tests.pki_support import make_trusting_controller

POLICY = json.dumps(
    {
        "apiVersion": "bulkhead/v1",
        "kind": "Policy",
        "metadata": {"name": "web-db"},
        "spec": {"rules": [{"from": {"app": "web"}, "to": {"app": "db"}, "ports": ["tcp/5432"]}]},
    }
)
WINDOW_S = 0.05


def hello(agent_id: str, app: str, address: str) -> agent_pb2.Hello:
    return agent_pb2.Hello(
        agent_id=agent_id, hostname=agent_id, labels={"app": app}, addresses=[address]
    )


def drain(session: AgentSession) -> list[agent_pb2.ControllerMessage]:
    taken = []
    while (message := session.take()) is not None:
        taken.append(message)
    return taken


def snapshots(messages: list[agent_pb2.ControllerMessage]) -> int:
    """Rulesets pushed: complete snapshots and deltas."""
    return sum(m.WhichOneof("body") in ("snapshot", "delta") for m in messages)


async def burst(core: Controller) -> tuple[int, int, list[str]]:
    core.apply([POLICY], dry_run=False, actor="operator:test")
    db = core.connect("db", hello("db", "db", "198.18.0.11"))
    web = core.connect("web", hello("web", "web", "198.18.0.10"))
    assert drain(db) == [], "nothing before the window closes"
    await asyncio.sleep(WINDOW_S * 3)
    drain(db), drain(web)  # the first sync of each
    offers = 0
    for index in range(1000):  # web moves 1,000 times in well under a second
        core.addresses_changed("web", [f"198.18.1.{index % 250 + 1}"])
        offers += snapshots(drain(db))
    await asyncio.sleep(WINDOW_S * 3)
    offers += snapshots(drain(db))
    return offers, snapshots(drain(web)), hosts_of(core, "db")


def hosts_of(core: Controller, agent_id: str) -> list[str]:
    ruleset = core.desired(agent_id).ruleset()
    return [host for s in ruleset.sets for host in s.hosts]


def test_a_thousand_moves_of_one_peer_reach_its_peer_once(tmp_path: Path) -> None:
    core = make_trusting_controller(tmp_path, coalesce_s=WINDOW_S)
    pushed_to_db, pushed_to_web, db_sees = asyncio.run(burst(core))
    assert pushed_to_db == 1, "one push for the whole burst"
    assert pushed_to_web == 0, "web's own ruleset does not depend on its address"
    assert db_sees == ["198.18.1.250"], "the push carries the last address"


def test_without_a_window_every_change_is_compiled_at_once(tmp_path: Path) -> None:
    core = make_trusting_controller(tmp_path)
    core.apply([POLICY], dry_run=False, actor="operator:test")
    db = core.connect("db", hello("db", "db", "198.18.0.11"))
    core.connect("web", hello("web", "web", "198.18.0.10"))
    drain(db)
    core.addresses_changed("web", ["198.18.0.20"])
    assert snapshots(drain(db)) == 1


def test_operator_changes_are_not_delayed(tmp_path: Path) -> None:
    async def scenario() -> int:
        core = make_trusting_controller(
            tmp_path, coalesce_s=10.0
        )  # a window that never closes here
        db = core.connect("db", hello("db", "db", "198.18.0.11"))
        core.flush_pending()
        drain(db)
        core.apply([POLICY], dry_run=False, actor="operator:test")
        core.label("db", {"tier": "data"}, [], actor="operator:test")
        return snapshots(drain(db))

    assert asyncio.run(scenario()) >= 1
