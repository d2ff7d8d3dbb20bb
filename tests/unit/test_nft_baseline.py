"""The local baseline: port specs, controller endpoints and their JSON form."""

from __future__ import annotations

import pytest

from agent.dataplane.baseline import (
    Baseline,
    Endpoint,
    Mode,
    PortSpec,
    baseline_from_json,
    baseline_to_json,
    parse_port_spec,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp/22", PortSpec("tcp", 22, 22)),
        ("udp/53", PortSpec("udp", 53, 53)),
        ("tcp/8000-8100", PortSpec("tcp", 8000, 8100)),
        (" TCP/1-65535 ", PortSpec("tcp", 1, 65535)),
    ],
)
def test_parse_port_spec(text: str, expected: PortSpec) -> None:
    assert parse_port_spec(text) == expected
    assert parse_port_spec(str(expected)) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("22", "expected PROTOCOL/PORT"),
        ("sctp/22", "protocol 'sctp' is not tcp or udp"),
        ("icmp/0", "protocol 'icmp' is not tcp or udp"),
        ("tcp/", "'' is not a port number"),
        ("tcp/ssh", "'ssh' is not a port number"),
        ("tcp/-5", "'' is not a port number"),
        ("tcp/80-", "'' is not a port number"),
        ("tcp/1-2-3", "'2-3' is not a port number"),
        ("tcp/0", "port 0 is outside 1-65535"),
        ("udp/65536", "port 65536 is outside 1-65535"),
        ("tcp/9000-8000", "9000-8000 is reversed"),
    ],
)
def test_parse_port_spec_names_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match="port spec") as caught:
        parse_port_spec(text)
    assert problem in str(caught.value)
    assert repr(text) in str(caught.value)


def test_endpoint_needs_an_ip_literal_and_a_port() -> None:
    assert Endpoint("2001:db8::1", 7443).port == 7443
    with pytest.raises(ValueError, match=r"address: 'controller\.example' is not an IP"):
        Endpoint("controller.example", 7443)
    with pytest.raises(ValueError, match="port: 0 is outside"):
        Endpoint("198.18.0.1", 0)


def test_baseline_json_round_trip() -> None:
    baseline = Baseline(
        mode=Mode.VISIBILITY,
        failsafe_inbound=(parse_port_spec("tcp/22"),),
        failsafe_outbound=(parse_port_spec("udp/53"), parse_port_spec("tcp/8000-8100")),
        controllers=(Endpoint("198.18.255.1", 7443), Endpoint("2001:db8::1", 7443)),
    )
    assert baseline_from_json(baseline_to_json(baseline)) == baseline


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"mode": "enforcing"}', "mode"),
        ('{"mode": "enforce", "controllers": [{"address": "x", "port": 1}]}', "controllers.0"),
        (
            '{"mode": "enforce", "failsafe_inbound": [{"protocol": "tcp", "first": 9, "last": 1}]}',
            "failsafe_inbound.0",
        ),
    ],
)
def test_bad_baseline_json_names_the_field(text: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        baseline_from_json(text)
