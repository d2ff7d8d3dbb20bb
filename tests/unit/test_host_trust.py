"""A compromised host gains nothing by lying (issue 17): its addresses, labels and sizes.

Each test replays what an attacker holding one enrolled agent's certificate tried against
the controller core (the agent stream's servicer calls exactly these methods), and checks
both the refusal and that the store and every other agent's ruleset are byte-identical.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from agent.keytool import generate_key, make_csr
from bulkhead.v1 import agent_pb2
from controller.core import Controller
from controller.errors import Conflict, InvalidArgument
from controller.host_reports import HostLimits
from tests.pki_support import make_controller

OPERATOR = "operator:test"
WEB_DB = {
    "apiVersion": "bulkhead/v1",
    "kind": "Policy",
    "metadata": {"name": "web-db"},
    "spec": {"rules": [{"from": {"app": "web"}, "to": {"app": "db"}, "ports": ["tcp/5432"]}]},
}
LAN = "198.18.0.0/24"


def enroll(
    core: Controller, agent_id: str, labels: dict[str, str], addresses: tuple[str, ...] = ()
) -> None:
    """Enroll AGENT_ID with a token carrying LABELS and allowed ADDRESSES."""
    token, _ = core.enrollment.create_token(labels, 600, 1, actor=OPERATOR, addresses=addresses)
    core.enrollment.enroll(token, agent_id, make_csr(generate_key(), agent_id), agent_id)


def hello(agent_id: str, *addresses: str, **labels: str) -> agent_pb2.Hello:
    return agent_pb2.Hello(
        agent_id=agent_id,
        hostname=agent_id,
        labels=labels,
        addresses=list(addresses),
        mode=agent_pb2.MODE_ENFORCE,
    )


def estate(tmp_path: Path, **options: Any) -> Controller:
    """web, db and other, enrolled with their labels and the lab's range, connected, with
    web -> db applied."""
    core = make_controller(tmp_path, **options)
    for index, name in enumerate(("web", "db", "other"), start=10):
        enroll(core, name, {"app": name}, (LAN,))
        core.connect(name, hello(name, f"198.18.0.{index}"))
    core.apply([json.dumps(WEB_DB)], actor=OPERATOR)
    return core


def state(
    core: Controller, tmp_path: Path, *, except_agent: str = ""
) -> tuple[str, dict[str, bytes]]:
    """The whole store as SQL text and every agent's desired ruleset (but EXCEPT_AGENT's)."""
    core.flush_last_seen()
    connection = sqlite3.connect(tmp_path / "c.db")
    try:
        dump = "\n".join(connection.iterdump())
    finally:
        connection.close()
    rulesets = {
        a.agent_id: core.desired(a.agent_id).ruleset().SerializeToString(deterministic=True)
        for a in core.agents()
        if a.agent_id != except_agent
    }
    return dump, rulesets


def db_sources(core: Controller) -> list[str]:
    ruleset = core.desired("db").ruleset()
    return sorted(host for s in ruleset.sets for host in s.hosts)


def test_an_agent_reporting_other_agents_addresses_gains_nothing(tmp_path: Path) -> None:
    core = estate(tmp_path)
    assert db_sources(core) == ["198.18.0.10"]
    _, others_before = state(core, tmp_path, except_agent="web")
    records_before = [core.agent("db"), core.agent("other")]
    session = core.connect(
        "web",
        hello("web", "198.18.0.10", "198.18.0.11", "198.18.0.12", "203.0.113.9"),
    )
    _, others_after = state(core, tmp_path, except_agent="web")
    assert others_after == others_before, "db's and other's rulesets must not change"
    assert [core.agent("db"), core.agent("other")] == records_before, "nor what they hold"
    assert db_sources(core) == ["198.18.0.10"]
    web = core.agent("web")
    assert web.addresses == ["198.18.0.10"]
    assert web.refused_addresses == {
        "198.18.0.11": "held by agent db",
        "198.18.0.12": "held by agent other",
        "203.0.113.9": f"outside the agent's allowed ranges ({LAN})",
    }
    # The agent is told, and the refusal is audited.
    notice = session.take()
    assert notice is not None
    assert notice.WhichOneof("body") == "addresses_refused"
    assert {r.address for r in notice.addresses_refused.refused} == set(web.refused_addresses)
    refusals = [
        e
        for e in core.audit(0, 100, include_agents=True)
        if e.action.startswith("agent.addresses.refused")
    ]
    assert refusals
    assert "198.18.0.11" in refusals[-1].detail


@pytest.mark.parametrize(
    "address", ["255.255.255.255", "240.0.0.1", "0.0.0.1", "::ffff:198.18.0.2", "ff02::1"]
)
def test_addresses_that_are_no_workload_address_are_refused(tmp_path: Path, address: str) -> None:
    core = make_controller(tmp_path)
    enroll(core, "web", {"app": "web"})
    core.connect("web", hello("web", "198.18.0.10", address))
    web = core.agent("web")
    assert web.addresses == ["198.18.0.10"]
    assert list(web.refused_addresses) == [str(ipaddress.ip_address(address))]


def test_an_address_passes_to_a_new_holder_only_when_the_old_one_is_no_longer_live(
    tmp_path: Path,
) -> None:
    core = estate(tmp_path, offline_after_s=3600.0)
    core.connect("other", hello("other", "198.18.0.12", "198.18.0.11"))
    assert core.agent("other").refused_addresses == {"198.18.0.11": "held by agent db"}
    core.revoke_agent("db", actor=OPERATOR)
    # db is revoked: other was waiting for the address and holds it now.
    assert core.agent("other").addresses == ["198.18.0.11", "198.18.0.12"]
    assert "198.18.0.11" not in core.agent("db").addresses


def test_the_operator_narrows_an_agents_ranges_and_its_peers_lose_the_address(
    tmp_path: Path,
) -> None:
    core = estate(tmp_path)
    record = core.set_allowed_ranges("web", ["198.18.0.128/25"], actor="operator:alice")
    assert record.addresses == []
    assert record.refused_addresses["198.18.0.10"].startswith("outside the agent's allowed")
    assert db_sources(core) == []
    record = core.set_allowed_ranges("web", [], actor="operator:alice")
    assert record.addresses == ["198.18.0.10"]
    assert db_sources(core) == ["198.18.0.10"]
    with pytest.raises(InvalidArgument, match=r"allowed_ranges\[0\]: '198.18.0.1/24'"):
        core.set_allowed_ranges("web", ["198.18.0.1/24"], actor="operator:alice")
    actions = [(e.actor, e.action) for e in core.audit(0, 100)]
    assert actions.count(("operator:alice", "agent.addresses.allowed")) == 2


def test_labels_a_host_gives_itself_drive_no_policy_until_accepted(tmp_path: Path) -> None:
    core = estate(tmp_path)
    enroll(core, "intruder", {})  # a token that sets no labels
    before = state(core, tmp_path)
    core.connect("intruder", hello("intruder", "198.18.0.20", app="web"))
    core.config_changed("other", agent_pb2.ConfigChange(labels={"app": "web"}))
    _, rulesets_after = state(core, tmp_path)
    assert rulesets_after == before[1]
    assert db_sources(core) == ["198.18.0.10"]
    assert core.agent("intruder").reported_labels == {"app": "web"}
    # An operator accepts them: now they count.
    seen = dict(core.agent("intruder").reported_labels)
    core.label("intruder", {}, [], actor="operator:alice", accept_reported=True,
               expected_reported=seen)  # fmt: skip
    assert db_sources(core) == ["198.18.0.10", "198.18.0.20"]


def test_a_token_that_pins_one_key_does_not_let_the_host_add_others(tmp_path: Path) -> None:
    env_policy = json.loads(json.dumps(WEB_DB))
    env_policy["metadata"]["name"] = "prod-db"
    env_policy["spec"]["rules"][0]["from"] = {"env": "prod"}
    core = estate(tmp_path)
    core.apply([json.dumps(env_policy)], actor=OPERATOR)
    core.connect("other", hello("other", "198.18.0.12", app="web", env="prod"))
    assert db_sources(core) == ["198.18.0.10"]
    assert core.compiled_labels(core.agent("other")) == {"app": "other"}


def test_a_controller_told_to_trust_a_key_compiles_it_from_the_host(tmp_path: Path) -> None:
    core = estate(tmp_path, trusted_label_keys=frozenset({"env"}))
    core.connect("other", hello("other", "198.18.0.12", app="web", env="prod"))
    assert core.compiled_labels(core.agent("other")) == {"app": "other", "env": "prod"}


def test_two_hundred_thousand_addresses_are_refused_and_change_nothing(tmp_path: Path) -> None:
    core = estate(tmp_path)
    before = state(core, tmp_path)
    flood = [f"198.18.{i // 250 % 250}.{i % 250 + 1}" for i in range(200_000)]
    with pytest.raises(InvalidArgument, match=r"hello\.addresses: 200000 addresses; .* at most 64"):
        core.connect("web", hello("web", *flood))
    with pytest.raises(InvalidArgument, match=r"addresses: 200000 addresses"):
        core.addresses_changed("web", flood)
    assert state(core, tmp_path) == before


def test_a_hundred_and_fifty_thousand_labels_are_refused_and_change_nothing(
    tmp_path: Path,
) -> None:
    core = estate(tmp_path)
    before = state(core, tmp_path)
    labels = {f"k{i}": "v" for i in range(150_000)}
    with pytest.raises(InvalidArgument, match=r"hello\.labels: 150000 labels; at most 64"):
        core.connect("web", hello("web", "198.18.0.10", **labels))
    with pytest.raises(InvalidArgument, match=r"config\.labels: 150000 labels"):
        core.config_changed("web", agent_pb2.ConfigChange(labels=labels))
    with pytest.raises(InvalidArgument, match=r"labels: 150000 labels"):
        core.label("web", labels, [], actor=OPERATOR)
    assert state(core, tmp_path) == before


def test_the_caps_are_the_controllers_settings(tmp_path: Path) -> None:
    core = estate(tmp_path, limits=HostLimits(max_addresses=2, max_labels=1))
    with pytest.raises(InvalidArgument, match="at most 2"):
        core.addresses_changed("web", ["198.18.0.10", "198.18.0.30", "198.18.0.31"])
    core.addresses_changed("web", ["198.18.0.10", "198.18.0.30"])
    with pytest.raises(InvalidArgument, match="the agent would have 2 labels; at most 1"):
        core.label("web", {"env": "prod"}, [], actor=OPERATOR)


def test_a_policy_that_would_compile_an_oversized_ruleset_is_refused(tmp_path: Path) -> None:
    core = estate(tmp_path, max_ruleset_bytes=400)
    before = state(core, tmp_path)
    wide = json.loads(json.dumps(WEB_DB))
    wide["metadata"]["name"] = "wide"
    wide["spec"]["rules"] = [
        {"from": {"cidr": f"198.19.{i}.0/24"}, "to": {"app": "db"}, "ports": [f"tcp/{i + 1}"]}
        for i in range(50)
    ]
    for dry_run in (True, False):
        with pytest.raises(
            InvalidArgument, match=r"ruleset above the 400 bytes an agent accepts: db \("
        ):
            core.apply([json.dumps(wide)], actor=OPERATOR, dry_run=dry_run)
    assert state(core, tmp_path) == before


def test_a_host_whose_addresses_would_oversize_a_peer_is_not_compiled(tmp_path: Path) -> None:
    core = estate(tmp_path, max_ruleset_bytes=180)
    db_before = core.desired("db").ruleset().SerializeToString(deterministic=True)
    operators_before = core.audit(0, 100)
    core.addresses_changed("web", [f"198.18.0.{i}" for i in range(10, 60)])
    assert core.desired("db").ruleset().SerializeToString(deterministic=True) == db_before
    # The store says what peers hold: web keeps its compiled address, the rest refused.
    web = core.agent("web")
    assert web.addresses == ["198.18.0.10"]
    assert len(web.refused_addresses) == 49  # .11 and .12 held by db and other; too many
    assert "an agent accepts: db" in web.refused_addresses["198.18.0.13"]
    assert core.audit(0, 100) == operators_before, "a host's refusal is no operator entry"
    events = [e.action for e in core.audit(0, 100, include_agents=True)]
    assert "agent.addresses.refused" in events
    # Not held by web, so another agent may claim a refused address.
    core.addresses_changed("other", ["198.18.0.12", "198.18.0.13"])
    assert core.agent("other").addresses == ["198.18.0.12", "198.18.0.13"]
    # After a restart nothing oversized comes back from the store.
    core.flush_last_seen()
    restarted = make_controller(tmp_path, max_ruleset_bytes=180)
    assert restarted.desired("db").ruleset().SerializeToString(deterministic=True) == db_before


def test_in_a_coalesced_batch_only_the_oversizing_report_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        core = estate(tmp_path, max_ruleset_bytes=180, coalesce_s=10.0)
        core.flush_pending()  # the hellos, compiled
        core.addresses_changed("web", [f"198.18.0.{i}" for i in range(10, 60)])
        core.addresses_changed("db", ["198.18.0.11", "198.18.0.99"])
        core.flush_pending()
        assert core.agent("web").addresses == ["198.18.0.10"]
        assert core.agent("db").addresses == ["198.18.0.11", "198.18.0.99"]
        web_egress = core.desired("web").ruleset()
        assert sorted(h for s in web_egress.sets for h in s.hosts) == [
            "198.18.0.11",
            "198.18.0.99",
        ]

    asyncio.run(scenario())


@pytest.mark.parametrize("hostname", ["\x1b[2Jgotcha", "h" * 254, "a b", "n\u00e4me"])
def test_hostnames_that_are_not_hostnames_are_refused(tmp_path: Path, hostname: str) -> None:
    core = estate(tmp_path)
    before = state(core, tmp_path)
    message = hello("web", "198.18.0.10")
    message.hostname = hostname
    with pytest.raises(InvalidArgument, match=r"hello\.hostname: .* is not a hostname"):
        core.connect("web", message)
    token, _ = core.enrollment.create_token({}, 600, 1, actor=OPERATOR)
    with pytest.raises(InvalidArgument, match=r"^hostname: .* is not a hostname"):
        core.enrollment.enroll(token, "new", make_csr(generate_key(), "new"), hostname)
    after = state(core, tmp_path)
    assert after[1] == before[1]
    # Only the token's creation was written; no agent, certificate or use of the token.
    assert "new" not in [a.agent_id for a in core.agents()]
    assert core.enrollment.tokens()[-1].used == 0


def test_a_label_that_would_oversize_a_peers_ruleset_is_refused_and_undone(
    tmp_path: Path,
) -> None:
    core = estate(tmp_path, max_ruleset_bytes=180)
    core.addresses_changed("other", [f"198.18.0.{i}" for i in range(12, 60)])
    before = state(core, tmp_path)
    with pytest.raises(InvalidArgument, match=r"a ruleset above the 180 bytes .*: db \("):
        core.label("other", {"app": "web"}, [], actor=OPERATOR)
    assert state(core, tmp_path) == before


def test_a_store_from_before_claims_with_one_address_twice_is_settled_at_start(
    tmp_path: Path,
) -> None:
    core = estate(tmp_path)
    core.flush_last_seen()
    # Version 3 stored what hosts reported: other had claimed web's address as well.
    connection = sqlite3.connect(tmp_path / "c.db")
    connection.execute(
        "UPDATE agents SET addresses=?, reported_addresses=?, first_seen_ms="
        "(SELECT first_seen_ms + 1000 FROM agents WHERE agent_id='web') WHERE agent_id='other'",
        ('["198.18.0.10", "198.18.0.12"]', '["198.18.0.10", "198.18.0.12"]'),
    )
    connection.commit()
    connection.close()
    restarted = make_controller(tmp_path)
    assert restarted.agent("web").addresses == ["198.18.0.10"]
    assert restarted.agent("other").addresses == ["198.18.0.12"]
    assert restarted.agent("other").refused_addresses == {"198.18.0.10": "held by agent web"}
    assert db_sources(restarted) == ["198.18.0.10"]


def test_a_token_gives_no_more_labels_or_ranges_than_an_agent_may_have(tmp_path: Path) -> None:
    core = make_controller(tmp_path)
    before = core.enrollment.tokens()
    labels = {f"k{i}": "v" for i in range(65)}
    with pytest.raises(InvalidArgument, match=r"labels: 65 labels; at most 64"):
        core.enrollment.create_token(labels, 600, 1, actor=OPERATOR)
    with pytest.raises(InvalidArgument, match=r"addresses\[1\]: '198.18.0.1/24' is not a CIDR"):
        core.enrollment.create_token(
            {}, 600, 1, actor=OPERATOR, addresses=("198.18.0.0/24", "198.18.0.1/24")
        )
    assert core.enrollment.tokens() == before


def test_an_address_taken_from_an_offline_holder_leaves_the_holders_peers(
    tmp_path: Path,
) -> None:
    core = estate(tmp_path, offline_after_s=0.1)
    core.connect("other", hello("other", "198.18.0.12", "198.18.0.10"))
    assert core.agent("other").refused_addresses == {"198.18.0.10": "held by agent web"}
    web = core.session("web")
    assert web is not None
    core.disconnect(web)
    time.sleep(0.3)
    assert "web" in core.check_offline()
    # other holds web's old address now; web's peers must not admit it as web any more.
    assert core.agent("other").addresses == ["198.18.0.10", "198.18.0.12"]
    assert core.agent("web").addresses == []
    assert db_sources(core) == [], "db still admits web's old address, now other's"


def test_one_address_written_three_ways_is_one_address(tmp_path: Path) -> None:
    core = make_controller(tmp_path)
    enroll(core, "web", {"app": "web"})
    core.connect("web", hello("web", "2001:db8::1", "2001:DB8::1", "2001:db8:0::1"))
    assert core.agent("web").addresses == ["2001:db8::1"]


def test_every_text_a_hello_or_an_ack_carries_is_bounded(tmp_path: Path) -> None:
    core = estate(tmp_path)
    before = state(core, tmp_path)
    huge_hash = hello("web", "198.18.0.10")
    huge_hash.applied_hash = "a" * 3_000_000
    huge_baseline = hello("web", "198.18.0.10")
    huge_baseline.baseline.failsafe_inbound.extend(["tcp/22"] * 100_000)
    huge_baseline.baseline.controller = "x" * 600_000
    for message, field in ((huge_hash, "applied_hash"), (huge_baseline, "baseline")):
        with pytest.raises(InvalidArgument, match=rf"hello\.{field}"):
            core.connect("web", message)
    with pytest.raises(InvalidArgument, match=r"ack\.hash"):
        core.acknowledged("web", agent_pb2.Ack(revision=1, hash="b" * 3_000_000, ok=True))
    assert state(core, tmp_path) == before
    core.acknowledged("web", agent_pb2.Ack(revision=1, ok=False, error="e" * 3_000_000))
    assert len(core.agent("web").last_error) == 1000


def test_labels_the_host_swaps_after_the_operator_looked_are_not_accepted(tmp_path: Path) -> None:
    core = estate(tmp_path)
    core.config_changed("other", agent_pb2.ConfigChange(labels={"tier": "frontend"}))
    seen = dict(core.agent("other").reported_labels)  # what the operator reviewed
    core.config_changed("other", agent_pb2.ConfigChange(labels={"app": "db"}))  # then swapped
    before = state(core, tmp_path)
    with pytest.raises(Conflict, match=r"now reports labels \{app=db\}, not the \{tier=frontend\}"):
        core.label("other", {}, [], actor=OPERATOR, accept_reported=True, expected_reported=seen)
    assert state(core, tmp_path) == before
    assert core.compiled_labels(core.agent("other")) == {"app": "other"}
