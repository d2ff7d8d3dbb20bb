"""The lab's state file, its directory marker, and the readiness rule for agents."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import parse_config
from bulkhead.v1 import admin_pb2
from lab.daemons import agent_config, readiness_problems
from lab.errors import StateError
from lab.state import (
    HostRecord,
    LabState,
    ProcessRecord,
    Role,
    is_lab_dir,
    load_state,
    make_lab_dir,
    save_state,
)

WEB = HostRecord(
    name="web", netns="bh-web", ipv4="198.18.0.10", ipv6="2001:db8::10", labels={"app": "web"}
)


def test_state_round_trips(tmp_path: Path) -> None:
    state = LabState(controller="198.18.0.1:50151", dataplane="nftables", mode="enforce")
    state.hosts.append(WEB)
    state.processes.append(
        ProcessRecord(
            role=Role.LISTENER, host="web", pid=42, start_ticks=7, argv=["x"], log="l", ports=[80]
        )
    )
    save_state(tmp_path, state)
    assert load_state(tmp_path) == state
    assert not list(tmp_path.glob(".*.tmp"))


def test_missing_state_says_no_lab_is_up(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no lab is up"):
        load_state(tmp_path)


@pytest.mark.parametrize("text", ["{not json", '{"controller": 1}', "[]"])
def test_corrupt_state_is_an_error_that_points_to_down(tmp_path: Path, text: str) -> None:
    (tmp_path / "state.json").write_text(text)
    with pytest.raises(StateError, match="bulkhead-lab down"):
        load_state(tmp_path)


def test_unknown_host_lists_the_known_ones() -> None:
    state = LabState(controller="c", dataplane="nftables", mode="enforce", hosts=[WEB])
    assert state.host("web") == WEB
    with pytest.raises(StateError, match=r"no host 'db' in the lab \(hosts: web\)"):
        state.host("db")


def test_lab_dir_marker(tmp_path: Path) -> None:
    directory = tmp_path / "lab"
    assert not is_lab_dir(directory)
    make_lab_dir(directory)
    assert is_lab_dir(directory)
    assert directory.stat().st_mode & 0o777 == 0o700


def test_agent_config_matches_the_agent_contract(tmp_path: Path) -> None:
    config = agent_config(
        WEB, controller="198.18.0.1:50151", mode="enforce", dataplane="nftables",
        state_dir=tmp_path, token="a-token",
    )  # fmt: skip
    parse_config(config)  # the agent accepts what the lab writes
    assert config == {
        "agent_id": "web",
        "hostname": "web",
        "controller": "198.18.0.1:50151",
        "labels": {"app": "web"},
        "mode": "enforce",
        "failsafe": {"inbound": ["tcp/22"], "outbound": []},
        "state_dir": str(tmp_path),
        "dataplane": "nftables",
        "metrics_listen": "127.0.0.1:9471",
        "token": "a-token",
    }


def _agent(name: str, *, connected: bool = True, applied: str = "h1", desired: str = "h1"
           ) -> admin_pb2.AgentSummary:  # fmt: skip
    return admin_pb2.AgentSummary(
        agent_id=name, connected=connected, applied_hash=applied, desired_hash=desired
    )


def test_ready_means_connected_and_applied_equals_desired() -> None:
    agents = [
        _agent("web"),
        _agent("db", connected=False),
        _agent("app", applied="h0"),
        _agent("new", applied="", desired=""),
    ]
    problems = readiness_problems(agents, ["web", "db", "app", "new", "gone"])
    assert problems == {
        "db": "not connected",
        "app": "applied h0 != desired h1",
        "new": "no ruleset compiled yet",
        "gone": "not registered with the controller",
    }


def test_after_a_change_ready_waits_for_a_new_desired_hash() -> None:
    agents = [_agent("web", applied="h1", desired="h1"), _agent("db", applied="h2", desired="h2")]
    problems = readiness_problems(agents, ["web", "db"], changed_from={"web": "h1", "db": "h1"})
    assert problems == {"web": "policy change not compiled yet"}
