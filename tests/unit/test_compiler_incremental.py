"""Incremental compilation: after a workload changes, compiling only the affected agents
gives exactly what a full compile gives them, and every other agent's ruleset is the
same as before (so skipping them is right)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.policy.compiler import Workload, affected_agents, compile_rulesets
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
def estates(draw: st.DrawFn) -> tuple[list[Workload], list[Policy], list[Workload], set[str]]:
    count = draw(st.integers(1, 6))
    workloads = [Workload(f"w{i}", draw(labels), (f"198.18.0.{i + 1}",)) for i in range(count)]
    policies = [policy(f"p{i}", draw(rules)) for i in range(draw(st.integers(0, 4)))]
    after = list(workloads)
    target = draw(st.integers(0, count))  # count: a new workload joins
    kind = draw(st.sampled_from(["relabel", "readdress", "leave"]))
    if target == count:
        after.append(Workload(f"w{count}", draw(labels), ("198.18.1.1",)))
        changed = {f"w{count}"}
    else:
        old = workloads[target]
        changed = {old.agent_id}
        if kind == "relabel":
            after[target] = Workload(old.agent_id, draw(labels), old.addresses)
        elif kind == "readdress":
            after[target] = Workload(old.agent_id, old.labels, ("198.18.2.2",))
        else:
            after.pop(target)
    return workloads, policies, after, changed


@settings(max_examples=300, deadline=None)
@given(estates())
def test_only_the_affected_agents_change_and_they_compile_the_same(
    estate: tuple[list[Workload], list[Policy], list[Workload], set[str]],
) -> None:
    before, policies, after, changed = estate
    full_before = compile_rulesets(before, [], policies)
    full_after = compile_rulesets(after, [], policies)
    affected = affected_agents(before, after, [], policies, changed)
    for agent_id, ruleset in full_after.items():
        if agent_id not in affected:
            assert full_before[agent_id] == ruleset, f"{agent_id} changed but was skipped"
    partial = compile_rulesets(after, [], policies, only=affected)
    assert partial == {a: r for a, r in full_after.items() if a in affected}


def test_a_change_reaches_the_other_side_of_the_rules_only() -> None:
    web = Workload("web", {"app": "web"}, ("198.18.0.1",))
    db = Workload("db", {"app": "db"}, ("198.18.0.2",))
    other = Workload("other", {"app": "other"}, ("198.18.0.3",))
    policies = [
        policy("web-db", [{"from": {"app": "web"}, "to": {"app": "db"}, "ports": ["tcp/1"]}])
    ]
    moved = Workload("web", {"app": "web"}, ("198.18.0.9",))
    assert affected_agents([web, db, other], [moved, db, other], [], policies, {"web"}) == {
        "web",
        "db",
    }
