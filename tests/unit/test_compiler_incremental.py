"""Incremental compilation: an Estate updated with workload changes holds exactly what
one compiled from scratch holds, and reports exactly the agents whose ruleset changed
(so pushing to those alone is right)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.v1 import ruleset_pb2
from controller.policy import Estate, Workload, compile_rulesets
from controller.policy.resources import Policy, parse_documents

APPS = ("web", "db", "api")
ENVS = ("prod", "dev")


def policy(name: str, rules: list[dict[str, object]]) -> Policy:
    document = {
        "apiVersion": "bulkhead/v1",
        "kind": "Policy",
        "metadata": {"name": name},
        "spec": {"rules": rules},
    }
    (parsed,) = parse_documents([json.dumps(document)])
    assert isinstance(parsed, Policy)
    return parsed


labels = st.fixed_dictionaries(
    {}, optional={"app": st.sampled_from(APPS), "env": st.sampled_from(ENVS)}
)
peers = st.one_of(
    st.builds(lambda app: {"app": app}, st.sampled_from(APPS)),
    st.builds(
        lambda app, env: {"app": app, "env": env}, st.sampled_from(APPS), st.sampled_from(ENVS)
    ),
    st.builds(lambda env: {"selector": f"env == '{env}' && has(app)"}, st.sampled_from(ENVS)),
    st.just({"cidr": "203.0.113.0/24"}),
)
rules = st.lists(
    st.builds(
        lambda source, destination, port: {"from": source, "to": destination, "ports": [port]},
        peers,
        peers,
        st.sampled_from(["tcp/5432", "udp/53", "icmp"]),
    ),
    min_size=1,
    max_size=3,
)


@st.composite
def estates(
    draw: st.DrawFn,
) -> tuple[list[Workload], list[Policy], dict[str, Workload | None]]:
    count = draw(st.integers(1, 6))
    workloads = [
        Workload(f"w{i}", draw(labels), (f"198.18.0.{i + 1}", f"198.18.9.{i % 2}"))
        for i in range(count)
    ]
    policies = [policy(f"p{i}", draw(rules)) for i in range(draw(st.integers(0, 4)))]
    changes: dict[str, Workload | None] = {}
    for _ in range(draw(st.integers(1, 3))):  # a coalesced batch
        target = draw(st.integers(0, count))  # count: a new workload joins
        if target == count:
            changes[f"w{count}"] = Workload(f"w{count}", draw(labels), ("198.18.1.1",))
            continue
        old = workloads[target]
        kind = draw(st.sampled_from(["relabel", "readdress", "leave"]))
        if kind == "relabel":
            changes[old.agent_id] = Workload(old.agent_id, draw(labels), old.addresses)
        elif kind == "readdress":
            # Sometimes onto an address another workload holds too: a host with two owners.
            address = draw(st.sampled_from(["198.18.2.2", "198.18.0.1", "198.18.9.0"]))
            changes[old.agent_id] = Workload(old.agent_id, old.labels, (address,))
        else:
            changes[old.agent_id] = None
    return workloads, policies, changes


@settings(max_examples=400, deadline=None)
@given(estates())
def test_an_updated_estate_equals_a_fresh_one_and_reports_exactly_who_changed(
    case: tuple[list[Workload], list[Policy], dict[str, Workload | None]],
) -> None:
    before, policies, changes = case
    after = {w.agent_id: w for w in before}
    for agent_id, workload in changes.items():
        if workload is None:
            after.pop(agent_id, None)
        else:
            after[agent_id] = workload
    full_before = compile_rulesets(before, [], policies)
    full_after = compile_rulesets(after.values(), [], policies)
    estate = Estate(before, [], policies)
    # Read first, as a controller sends before the next change: nothing read (set
    # versions are kept per skeleton) may outlive the change.
    assert {a: estate.ruleset(a) for a in estate.agent_ids} == full_before
    reported = estate.update(changes)
    # The size cap's quick bound, taken before the changed sets are built, is never below
    # the size, and is the size once they are (controller/core.py _oversized).
    bounds = {a: estate.size_bound(a) for a in estate.agent_ids}
    assert {a: estate.ruleset(a) for a in estate.agent_ids} == full_after
    assert all(bounds[a] >= estate.size(a) == estate.size_bound(a) for a in estate.agent_ids)
    assert all(estate.size(a) >= len(full_after[a].SerializeToString()) for a in full_after)
    fresh = Estate(after.values(), [], policies)
    assert all(estate.hash(a) == fresh.hash(a) for a in full_after)
    empty = ruleset_pb2.Ruleset()  # what an agent the estate does not hold gets
    really = {
        a
        for a in set(full_before) | set(full_after)
        if full_before.get(a, empty) != full_after.get(a, empty)
    }
    assert reported == really


def test_a_change_reaches_the_other_side_of_the_rules_only() -> None:
    web = Workload("web", {"app": "web"}, ("198.18.0.1",))
    db = Workload("db", {"app": "db"}, ("198.18.0.2",))
    other = Workload("other", {"app": "other"}, ("198.18.0.3",))
    policies = [
        policy("web-db", [{"from": {"app": "web"}, "to": {"app": "db"}, "ports": ["tcp/1"]}])
    ]
    estate = Estate([web, db, other], [], policies)
    # web's own rules do not hold its own address: only db's set changes.
    assert estate.update({"web": Workload("web", {"app": "web"}, ("198.18.0.9",))}) == {"db"}
    assert estate.update({"other": Workload("other", {"app": "x"}, ("198.18.0.3",))}) == set()


def test_agents_with_the_same_rules_share_their_set_versions_until_a_set_changes() -> None:
    policies = [
        policy("web-db", [{"from": {"app": "web"}, "to": {"app": "db"}, "ports": ["tcp/1"]}])
    ]
    web = Workload("web", {"app": "web"}, ("198.18.0.1",))
    dbs = [Workload(f"db-{i}", {"app": "db"}, (f"198.18.0.{10 + i}",)) for i in range(2)]
    estate = Estate([web, *dbs], [], policies)
    before = estate.versions("db-0")
    assert estate.versions("db-1") is before  # one lookup for the whole group
    estate.update({"web-2": Workload("web-2", {"app": "web"}, ("198.18.0.2",))})
    after = estate.versions("db-1")
    assert after is not before
    assert list(after[0].address_set.hosts) == ["198.18.0.1", "198.18.0.2"]
    assert estate.versions("db-0") is after


def test_a_host_held_by_two_members_stays_while_either_does() -> None:
    policies = [
        policy("web-db", [{"from": {"app": "web"}, "to": {"app": "db"}, "ports": ["tcp/1"]}])
    ]
    shared = ("198.18.0.7",)
    first = Workload("web-1", {"app": "web"}, shared)
    second = Workload("web-2", {"app": "web"}, shared)
    db = Workload("db", {"app": "db"}, ("198.18.0.2",))
    estate = Estate([first, second, db], [], policies)
    assert estate.update({"web-1": None}) == {"web-1"}  # db's set still holds the address
    assert list(estate.ruleset("db").sets[0].hosts) == ["198.18.0.7"]
    assert estate.update({"web-2": None}) == {"web-2", "db"}
    assert list(estate.ruleset("db").sets[0].hosts) == []
