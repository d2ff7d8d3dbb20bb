"""The nft element commands of a policy delta (pure: no kernel)."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from agent.dataplane.backend import RulesetError
from agent.dataplane.model import AddressGroup
from agent.dataplane.nft_elements import host_updates
from bulkhead.v1 import agent_pb2

GROUP = AddressGroup(
    name="p_web",
    v4_hosts=(ip_address("198.18.0.10"), ip_address("198.18.0.20")),  # type: ignore[arg-type]
    v4_networks=(),
    v6_hosts=(),
    v6_networks=(),
)


def test_hosts_go_to_their_family_set_deletions_first() -> None:
    change = agent_pb2.SetChange(
        name="p_web", add_hosts=["2001:db8::5", "198.18.0.5"], remove_hosts=["198.18.0.20"]
    )
    updates = host_updates({"p_web": GROUP}, [change])
    assert updates is not None
    commands, groups = updates
    target = {"family": "inet", "table": "bulkhead"}
    assert commands == [
        {"delete": {"element": {**target, "name": "p_web_v4", "elem": ["198.18.0.20"]}}},
        {"add": {"element": {**target, "name": "p_web_v4", "elem": ["198.18.0.5"]}}},
        {"add": {"element": {**target, "name": "p_web_v6", "elem": ["2001:db8::5"]}}},
    ]
    after = groups["p_web"]
    assert [str(a) for a in after.v4_hosts] == ["198.18.0.5", "198.18.0.10"]
    assert [str(a) for a in after.v6_hosts] == ["2001:db8::5"]
    assert GROUP.v4_hosts[1] == ip_address("198.18.0.20"), "the old group is left as it was"


def test_networks_or_an_unknown_set_need_a_full_apply() -> None:
    assert host_updates({"p_web": GROUP}, [agent_pb2.SetChange(name="p_web",
                        add_networks=["203.0.113.0/24"])]) is None  # fmt: skip
    assert host_updates({"p_web": GROUP}, [agent_pb2.SetChange(name="p_db")]) is None


def test_a_bad_host_is_named() -> None:
    change = agent_pb2.SetChange(name="p_web", add_hosts=["198.18.0.5", "nonsense"])
    with pytest.raises(RulesetError, match=r"delta\.sets\[0\]\.add_hosts\[1\]: 'nonsense'"):
        host_updates({"p_web": GROUP}, [change])
