"""Random reports from several agents never put a wrong address into a peer set.

Hypothesis drives hellos, address updates, host label changes, flow reports, operator
range changes and revocations from four agents against one controller. After every step:
no peer set holds an address outside its owner's allowed ranges, no address is accepted
for two live agents, and every address in a peer set is one its holder reports.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.keytool import generate_key, make_csr
from bulkhead.v1 import agent_pb2
from controller.core import Controller
from controller.errors import ControllerError
from tests.pki_support import make_controller

AGENTS = ("a", "b", "c", "d")
POOL = (
    "198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.1.1", "2001:db8::1", "2001:db8::2",
    "203.0.113.7", "255.255.255.255", "::ffff:198.18.0.1",
)  # fmt: skip
RANGES = ((), ("198.18.0.0/24",), ("198.18.0.0/16", "2001:db8::/64"), ("198.18.1.0/24",))
# Every workload is on both sides of some rule, so every accepted address is in a set.
EVERYONE = {
    "apiVersion": "bulkhead/v1",
    "kind": "Policy",
    "metadata": {"name": "mesh"},
    "spec": {
        "rules": [{"from": {"selector": "app != 'none'"}, "to": {"selector": "app != 'none'"},
                   "ports": ["tcp/443"]}]
    },
}  # fmt: skip

agent_ids = st.sampled_from(AGENTS)
address_lists = st.lists(st.sampled_from(POOL), max_size=5)
labels = st.dictionaries(st.sampled_from(("app", "env")), st.sampled_from(("web", "db")))
steps = st.one_of(
    st.tuples(st.just("hello"), agent_ids, address_lists, labels),
    st.tuples(st.just("addresses"), agent_ids, address_lists),
    st.tuples(st.just("config"), agent_ids, labels),
    st.tuples(st.just("flow"), agent_ids, st.sampled_from(POOL)),
    st.tuples(st.just("ranges"), agent_ids, st.sampled_from(RANGES)),
    st.tuples(st.just("revoke"), agent_ids),
)


def check(core: Controller) -> None:
    records = {a.agent_id: a for a in core.agents()}
    revoked = core.enrollment.revoked_agents()
    live = {i for i in records if i not in revoked and not core.is_offline(records[i])}
    holders: dict[str, list[str]] = {}
    for agent_id in live:
        for address in records[agent_id].addresses:
            holders.setdefault(address, []).append(agent_id)
    assert all(len(h) == 1 for h in holders.values()), f"two live holders: {holders}"
    for agent_id in records:
        for address_set in core.desired(agent_id).ruleset().sets:
            for host in address_set.hosts:
                owners = [i for i in live if host in records[i].addresses]
                assert len(owners) == 1, f"{host} in {agent_id}'s set has owners {owners}"
                owner = records[owners[0]]
                assert host in {str(ipaddress.ip_address(a)) for a in owner.reported_addresses}
                networks = [ipaddress.ip_network(text) for text in owner.allowed_ranges]
                ip = ipaddress.ip_address(host)
                assert not networks or any(ip.version == n.version and ip in n for n in networks), (
                    f"{host} outside {owner.agent_id}'s ranges {owner.allowed_ranges}"
                )


def run(core: Controller, step: tuple[Any, ...]) -> None:
    kind, agent_id = step[0], str(step[1])
    if kind == "hello":
        hello = agent_pb2.Hello(
            agent_id=agent_id, hostname=agent_id, addresses=step[2], labels=step[3]
        )
        core.connect(agent_id, hello)
    elif kind == "addresses":
        core.addresses_changed(agent_id, list(step[2]))
    elif kind == "config":
        core.config_changed(agent_id, agent_pb2.ConfigChange(labels=step[2]))
    elif kind == "flow":
        flow = agent_pb2.Flow(
            direction=agent_pb2.FLOW_DIRECTION_INBOUND, local_address=str(step[2]),
            peer_address="198.18.0.200", port=443, protocol="tcp",
            verdict=agent_pb2.VERDICT_ALLOWED, count=1, first_seen_unix_ms=1,
            last_seen_unix_ms=1,
        )  # fmt: skip
        core.observations.record(agent_id, agent_pb2.FlowReport(flows=[flow], epoch=1, sequence=1))
    elif kind == "ranges":
        core.set_allowed_ranges(agent_id, list(step[2]), actor="operator:test")
    elif kind == "revoke":
        core.revoke_agent(agent_id, actor="operator:test")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(steps, min_size=1, max_size=25))
def test_no_peer_set_ever_holds_an_address_its_owner_may_not_hold(
    actions: list[tuple[Any, ...]],
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        core = make_controller(Path(directory))
        for agent_id in AGENTS:
            token, _ = core.enrollment.create_token({"app": agent_id}, 600, 1, actor="op:t")
            core.enrollment.enroll(token, agent_id, make_csr(generate_key(), agent_id), agent_id)
        core.apply([json.dumps(EVERYONE)], actor="operator:test")
        for step in actions:
            with contextlib.suppress(ControllerError):  # refused: the invariant holds all the same
                run(core, step)
            check(core)
