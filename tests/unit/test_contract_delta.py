"""Policy deltas (bulkhead.v1.contract): set changes between two rulesets, applied back."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.v1 import agent_pb2, ruleset_pb2
from bulkhead.v1.contract import (
    DeltaError,
    apply_set_changes,
    host_order,
    network_order,
    ruleset_hash,
    set_changes,
)

RULE = ruleset_pb2.Rule(
    direction=ruleset_pb2.DIRECTION_INGRESS,
    protocol=ruleset_pb2.PROTOCOL_TCP,
    ports=[ruleset_pb2.PortRange(first=5432, last=5432)],
    peer_set="p_a",
    action=ruleset_pb2.ACTION_ALLOW,
    policy="web-db",
    id="r1",
)

v4_hosts = st.integers(0, 2**16 - 1).map(lambda i: str(ipaddress.ip_address(0xC6120000 + i)))
v6_hosts = st.integers(0, 2**16 - 1).map(lambda i: str(ipaddress.ip_address(0x20010DB8 << 96 | i)))
networks = st.tuples(st.integers(0, 255), st.integers(16, 31)).map(
    lambda t: str(ipaddress.ip_network(f"198.19.{t[0]}.0/24").supernet(new_prefix=t[1] - 8))
)
host_lists = st.sets(st.one_of(v4_hosts, v6_hosts), max_size=40)
network_lists = st.sets(networks, max_size=6)


def address_set(name: str, hosts: set[str], nets: set[str]) -> ruleset_pb2.AddressSet:
    return ruleset_pb2.AddressSet(
        name=name, hosts=sorted(hosts, key=host_order), networks=sorted(nets, key=network_order)
    )


def ruleset(*sets: ruleset_pb2.AddressSet) -> ruleset_pb2.Ruleset:
    return ruleset_pb2.Ruleset(sets=list(sets), rules=[RULE])


Contents = tuple[set[str], set[str], set[str]]  # p_a's hosts and networks, p_b's hosts
contents = st.tuples(host_lists, network_lists, host_lists)


@settings(max_examples=150, deadline=None)
@given(contents, contents)
def test_the_changes_between_two_rulesets_turn_the_first_into_the_second(
    before: Contents, after: Contents
) -> None:
    (hosts_a, nets_a, other_a), (hosts_b, nets_b, other_b) = before, after
    old = ruleset(address_set("p_a", hosts_a, nets_a), address_set("p_b", other_a, set()))
    new = ruleset(address_set("p_a", hosts_b, nets_b), address_set("p_b", other_b, set()))
    changes = set_changes(old, new)
    assert changes is not None
    assert apply_set_changes(old, changes) == new
    assert ruleset_hash(apply_set_changes(old, changes)) == ruleset_hash(new)
    assert [c.name for c in changes] == [
        name for name, a, b in (("p_a", hosts_a, hosts_b), ("p_b", other_a, other_b))
        if a != b or (name == "p_a" and nets_a != nets_b)
    ]  # fmt: skip


def test_rule_or_set_name_changes_are_not_deltas() -> None:
    old = ruleset(address_set("p_a", {"198.18.0.10"}, set()))
    other_port = ruleset(address_set("p_a", {"198.18.0.10"}, set()))
    other_port.rules[0].ports[0].first = other_port.rules[0].ports[0].last = 80
    renamed = ruleset(address_set("p_z", {"198.18.0.10"}, set()))
    more_sets = ruleset(address_set("p_a", set(), set()), address_set("p_b", set(), set()))
    for new in (other_port, renamed, more_sets):
        assert set_changes(old, new) is None
    assert set_changes(old, old) == []


def test_the_base_is_left_untouched() -> None:
    old = ruleset(address_set("p_a", {"198.18.0.10"}, set()))
    kept = ruleset_pb2.Ruleset()
    kept.CopyFrom(old)
    apply_set_changes(old, [agent_pb2.SetChange(name="p_a", add_hosts=["198.18.0.11"])])
    assert old == kept


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (agent_pb2.SetChange(name="p_x", add_hosts=["198.18.0.1"]), r"sets\[0\]\.name: 'p_x'"),
        (agent_pb2.SetChange(name="p_a", remove_hosts=["198.18.0.99"]), "does not hold"),
        (agent_pb2.SetChange(name="p_a", add_hosts=["198.18.0.10"]), "already holds"),
        (agent_pb2.SetChange(name="p_a", add_hosts=["not-an-ip"]), r"sets\[0\]\.\*_hosts"),
        (agent_pb2.SetChange(name="p_a", add_networks=["10.0.0.1/8"]), r"\*_networks"),
        (
            agent_pb2.SetChange(name="p_a", remove_hosts=["198.18.0.10", "198.18.0.10"]),
            "twice",
        ),
    ],
)
def test_a_change_that_does_not_fit_the_base_names_the_field(
    change: agent_pb2.SetChange, problem: str
) -> None:
    with pytest.raises(DeltaError, match=problem):
        apply_set_changes(ruleset(address_set("p_a", {"198.18.0.10"}, set())), [change])


def test_one_set_changed_twice_is_refused() -> None:
    base = ruleset(address_set("p_a", {"198.18.0.10"}, set()))
    twice = [
        agent_pb2.SetChange(name="p_a", add_hosts=["198.18.0.11"]),
        agent_pb2.SetChange(name="p_a", add_hosts=["198.18.0.12"]),
    ]
    with pytest.raises(DeltaError, match=r"sets\[1\]\.name: 'p_a' is changed twice"):
        apply_set_changes(base, twice)
