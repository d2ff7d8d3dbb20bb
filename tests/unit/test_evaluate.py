"""evaluate.is_allowed: what the rendered policy does to the first packet of a flow."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from agent.dataplane.backend import RulesetError
from agent.dataplane.baseline import Baseline, Endpoint, Mode, parse_port_spec
from agent.dataplane.evaluate import Flow, is_allowed
from bulkhead.v1 import ruleset_pb2 as pb

TCP, UDP, ICMP, ICMPV6, GRE = (
    socket.IPPROTO_TCP,
    socket.IPPROTO_UDP,
    socket.IPPROTO_ICMP,
    socket.IPPROTO_ICMPV6,
    47,
)
LOCAL = ("198.18.0.2", "2001:db8::2")
ENFORCE = Baseline(
    Mode.ENFORCE,
    failsafe_inbound=(parse_port_spec("tcp/22"),),
    failsafe_outbound=(parse_port_spec("udp/53"),),
    controllers=(Endpoint("198.18.255.1", 7443), Endpoint("2001:db8:ffff::1", 7443)),
)


def rule(direction: pb.Direction, protocol: pb.Protocol, peer_set: str, **fields: Any) -> pb.Rule:
    return pb.Rule(
        direction=direction,
        protocol=protocol,
        peer_set=peer_set,
        action=fields.pop("action", pb.ACTION_ALLOW),
        **fields,
    )


def ports(*ranges: tuple[int, int]) -> list[pb.PortRange]:
    return [pb.PortRange(first=first, last=last) for first, last in ranges]


RULESET = pb.Ruleset(
    sets=[
        pb.AddressSet(name="web", hosts=["198.18.0.1", "2001:db8::1"]),
        pb.AddressSet(name="office", networks=["198.19.0.0/16", "2001:db8:1::/48"]),
        pb.AddressSet(name="quarantine", hosts=["198.19.6.6"]),
        pb.AddressSet(name="backup", hosts=["198.18.0.50"]),
    ],
    rules=[
        rule(pb.DIRECTION_INGRESS, pb.PROTOCOL_ANY, "quarantine", action=pb.ACTION_DENY),
        rule(pb.DIRECTION_INGRESS, pb.PROTOCOL_TCP, "web", ports=ports((5432, 5432))),
        rule(pb.DIRECTION_INGRESS, pb.PROTOCOL_TCP, "office", ports=ports((22, 22), (8000, 8100))),
        rule(pb.DIRECTION_INGRESS, pb.PROTOCOL_ICMP, "office"),
        rule(pb.DIRECTION_INGRESS, pb.PROTOCOL_UDP, "backup"),
        rule(pb.DIRECTION_EGRESS, pb.PROTOCOL_ANY, "backup"),
        rule(pb.DIRECTION_EGRESS, pb.PROTOCOL_TCP, "office", ports=ports((443, 443))),
        # Shadowed by the earlier allow: first match wins.
        rule(pb.DIRECTION_EGRESS, pb.PROTOCOL_TCP, "office", action=pb.ACTION_DENY),
    ],
)


def allowed(
    protocol: int, src: str, dst: str, dport: int = 0, baseline: Baseline = ENFORCE
) -> bool:
    flow = Flow(protocol=protocol, src=src, sport=40000 if dport else 0, dst=dst, dport=dport)
    return is_allowed(RULESET, baseline, flow, LOCAL)


@pytest.mark.parametrize(
    ("protocol", "src", "dst", "dport", "expected"),
    [
        # ingress, host set
        (TCP, "198.18.0.1", "198.18.0.2", 5432, True),
        (TCP, "2001:db8::1", "2001:db8::2", 5432, True),
        (TCP, "198.18.0.1", "198.18.0.2", 5433, False),
        (UDP, "198.18.0.1", "198.18.0.2", 5432, False),
        (TCP, "198.18.0.9", "198.18.0.2", 5432, False),
        # ingress, network set, port list and range
        (TCP, "198.19.200.1", "198.18.0.2", 8050, True),
        (TCP, "2001:db8:1:ffff::7", "2001:db8::2", 8100, True),
        (TCP, "2001:db8:2::7", "2001:db8::2", 8100, False),
        (TCP, "198.19.200.1", "198.18.0.2", 8101, False),
        # icmp means ICMP for IPv4 peers and ICMPv6 for IPv6 peers
        (ICMP, "198.19.0.1", "198.18.0.2", 0, True),
        (ICMPV6, "2001:db8:1::1", "2001:db8::2", 0, True),
        (ICMPV6, "198.19.0.1", "198.18.0.2", 0, False),
        (ICMP, "198.18.0.1", "198.18.0.2", 0, False),
        # udp without ports: every port; any: every protocol
        (UDP, "198.18.0.50", "198.18.0.2", 9, True),
        (TCP, "198.18.0.50", "198.18.0.2", 9, False),
        (GRE, "198.18.0.2", "198.18.0.50", 0, True),
        # first match wins: the quarantined host inside the office network is denied
        (TCP, "198.19.6.6", "198.18.0.2", 8050, False),
        (TCP, "198.18.0.2", "198.19.0.1", 443, True),
        (TCP, "198.18.0.2", "198.19.0.1", 80, False),
        # egress is judged on the destination
        (TCP, "198.18.0.2", "198.18.0.1", 5432, False),
    ],
)
def test_policy_rules(protocol: int, src: str, dst: str, dport: int, expected: bool) -> None:
    assert allowed(protocol, src, dst, dport) is expected


@pytest.mark.parametrize(
    ("protocol", "src", "dst", "dport", "expected"),
    [
        (TCP, "198.18.0.99", "198.18.0.2", 22, True),  # failsafe inbound
        (TCP, "198.18.0.2", "198.18.0.99", 22, False),  # ... is not outbound
        (UDP, "198.18.0.2", "198.18.0.99", 53, True),  # failsafe outbound
        (UDP, "198.18.0.99", "198.18.0.2", 53, False),  # ... is not inbound
        (TCP, "198.18.0.2", "198.18.255.1", 7443, True),  # controller
        (TCP, "2001:db8::2", "2001:db8:ffff::1", 7443, True),
        (TCP, "198.18.0.2", "198.18.255.1", 7444, False),
        (UDP, "198.18.0.2", "198.18.255.1", 7443, False),
        (TCP, "198.18.255.1", "198.18.0.2", 7443, False),  # controller dials nobody
        (TCP, "127.0.0.1", "127.0.0.1", 6379, True),  # loopback
        (TCP, "::1", "::1", 6379, True),
        (TCP, "198.18.0.2", "2001:db8::2", 6379, True),  # between local addresses
        (TCP, "198.18.7.1", "198.18.7.2", 6379, True),  # forwarded: neither end is ours
    ],
)
def test_baseline(protocol: int, src: str, dst: str, dport: int, expected: bool) -> None:
    assert allowed(protocol, src, dst, dport) is expected


def test_visibility_allows_everything() -> None:
    visibility = Baseline(Mode.VISIBILITY)
    assert allowed(TCP, "198.18.0.9", "198.18.0.2", 5433, baseline=visibility) is True
    assert allowed(TCP, "198.19.6.6", "198.18.0.2", 8050, baseline=visibility) is True


def test_empty_ruleset_denies_all_but_the_baseline() -> None:
    flow = Flow(TCP, "198.18.0.1", 40000, "198.18.0.2", 5432)
    assert is_allowed(pb.Ruleset(), ENFORCE, flow, LOCAL) is False
    ssh = Flow(TCP, "198.18.0.1", 40000, "198.18.0.2", 22)
    assert is_allowed(pb.Ruleset(), ENFORCE, ssh, LOCAL) is True


def test_a_bad_ruleset_is_refused() -> None:
    bad = pb.Ruleset(rules=[rule(pb.DIRECTION_INGRESS, pb.PROTOCOL_TCP, "nowhere")])
    with pytest.raises(RulesetError, match="peer_set"):
        is_allowed(bad, ENFORCE, Flow(TCP, "198.18.0.1", 1, "198.18.0.2", 2), LOCAL)
