"""bulkhead-sim: label patterns (--labels-from) and what each simulated agent is."""

from __future__ import annotations

import ipaddress

import pytest

from controller.sim.errors import SimError
from controller.sim.spec import MAX_AGENTS, FleetSpec, LabelPattern, parse_label_pattern


def test_a_range_gives_one_value_per_number() -> None:
    pattern = parse_label_pattern("app=app{0..3}")
    assert pattern == LabelPattern("app", ("app0", "app1", "app2", "app3"))


def test_text_around_the_range_is_kept() -> None:
    assert parse_label_pattern("zone=z{8..10}-east").values == ("z8-east", "z9-east", "z10-east")


def test_a_value_without_range_is_one_value() -> None:
    assert parse_label_pattern("env=prod") == LabelPattern("env", ("prod",))


def test_agents_take_the_values_in_turn() -> None:
    pattern = parse_label_pattern("app=app{1..3}")
    assert [pattern.value_for(i) for i in range(5)] == ["app1", "app2", "app3", "app1", "app2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("app", "--labels-from 'app': expected KEY=VALUE"),
        ("app=a{3..1}", "range {3..1} runs backwards"),
        ("app=a{0..1}b{0..1}", "at most one {FIRST..LAST} range"),
        ("app=a{0-9}", "a range is written {FIRST..LAST}"),
        ("app=a}", "a range is written {FIRST..LAST}"),
        ("app=a{0..100000}", "has more than 100000 values"),
        ("-app=a", "label keys start with a letter or digit"),
        ("cidr=a", "'cidr' is reserved"),
        ("app=a b", "label values are up to 63"),
        ("app=" + "x" * 62 + "{0..10}", "label values are up to 63"),
    ],
)
def test_bad_patterns_are_refused_naming_the_option(text: str, message: str) -> None:
    with pytest.raises(SimError, match="--labels-from") as caught:
        parse_label_pattern(text)
    assert message in str(caught.value)


def test_each_agent_has_an_id_labels_and_a_benchmarking_address() -> None:
    spec = FleetSpec(3, id_prefix="load", labels=(parse_label_pattern("app=a{0..1}"),))
    assert spec.agent_ids() == ["load-000000", "load-000001", "load-000002"]
    assert spec.labels_for(2) == {"app": "a0"}
    assert spec.address_for(0) == "198.18.0.1"
    assert spec.address_for(256) == "198.18.1.1"


def test_every_address_of_the_largest_fleet_is_a_host_of_198_18_0_0_15() -> None:
    spec = FleetSpec(MAX_AGENTS)
    network = ipaddress.ip_network("198.18.0.0/15")
    first, last = (ipaddress.ip_address(spec.address_for(i)) for i in (0, MAX_AGENTS - 1))
    assert first in network
    assert last in network
    assert last not in (network.network_address, network.broadcast_address)


@pytest.mark.parametrize(
    ("count", "prefix", "message"),
    [
        (0, "sim", "--agents: 0 must be between 1"),
        (MAX_AGENTS + 1, "sim", "must be between 1"),
        (1, "Sim", "--id-prefix 'Sim'"),
        (1, "-x", "--id-prefix '-x'"),
    ],
)
def test_bad_fleets_are_refused(count: int, prefix: str, message: str) -> None:
    with pytest.raises(SimError, match=message):
        FleetSpec(count, id_prefix=prefix)


def test_a_label_key_may_be_given_once() -> None:
    patterns = (parse_label_pattern("app=a"), parse_label_pattern("app=b"))
    with pytest.raises(SimError, match="given twice"):
        FleetSpec(2, labels=patterns)
