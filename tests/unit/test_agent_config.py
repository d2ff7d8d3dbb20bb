"""The agent's config, checked without pydantic: defaults, the conversions its lax mode
allowed (so configs that loaded before still load), and a message per wrong setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DEFAULT_STATE_DIR, ConfigInvalid, FailsafeConfig, parse_config
from agent.dataplane.baseline import Mode

BASE = {"agent_id": "web-1", "controller": "198.18.0.1:50151"}


def problems(**settings: object) -> dict[str, str]:
    with pytest.raises(ConfigInvalid) as raised:
        parse_config({**BASE, **settings})
    return dict(raised.value.problems)


def test_defaults() -> None:
    config = parse_config(BASE)
    assert (config.enrollment, config.token, config.labels_dir, config.metrics_listen) == (
        None, None, None, None,
    )  # fmt: skip
    assert config.enrollment_address() == "198.18.0.1:50152"
    assert config.labels == {}
    assert config.mode is Mode.ENFORCE
    assert config.failsafe == FailsafeConfig(inbound=["tcp/22"], outbound=[])
    assert config.state_dir == DEFAULT_STATE_DIR
    assert config.dataplane == "auto"
    assert (config.observe, config.allow_iptables_on_nft_host) == (True, False)
    assert (config.commit_confirm_seconds, config.heartbeat_interval) == (10.0, 30.0)
    assert (config.address_poll_interval, config.flow_report_interval) == (2.0, 2.0)
    assert (config.snapshot_interval, config.flow_capacity) == (5.0, 10_000)
    assert config.hostname


def test_values_written_loosely_are_converted_as_before() -> None:
    config = parse_config(
        {
            **BASE,
            "heartbeat_interval": "12.5",
            "commit_confirm_seconds": 0,
            "flow_capacity": 2000.0,
            "observe": "no",
            "allow_iptables_on_nft_host": 1,
            "mode": "visibility",
            "state_dir": "/tmp/x",
            "failsafe": {"outbound": ["udp/53"]},
            "dataplane": "iptables",
        }
    )
    assert config.heartbeat_interval == 12.5
    assert config.commit_confirm_seconds == 0.0
    assert config.flow_capacity == 2000
    assert (config.observe, config.allow_iptables_on_nft_host) == (False, True)
    assert config.mode is Mode.VISIBILITY
    assert config.state_dir == Path("/tmp/x")
    assert config.failsafe == FailsafeConfig(inbound=["tcp/22"], outbound=["udp/53"])
    assert config.dataplane == "iptables"


@pytest.mark.parametrize(
    ("settings", "where", "message"),
    [
        ({"heartbeat_interval": 0}, "heartbeat_interval", "greater than 0"),
        ({"heartbeat_interval": 301}, "heartbeat_interval", "less than or equal to 300"),
        ({"heartbeat_interval": float("inf")}, "heartbeat_interval", "finite number"),
        ({"heartbeat_interval": "soon"}, "heartbeat_interval", "valid number"),
        ({"heartbeat_interval": True}, "heartbeat_interval", "valid number"),
        ({"snapshot_interval": 0.1}, "snapshot_interval", "greater than or equal to 0.5"),
        ({"flow_capacity": 99}, "flow_capacity", "greater than or equal to 100"),
        ({"flow_capacity": 100.5}, "flow_capacity", "valid integer"),
        ({"observe": "maybe"}, "observe", "valid boolean"),
        ({"dataplane": "ebpf"}, "dataplane", "'auto', 'nftables' or 'iptables'"),
        ({"mode": "loud"}, "mode", "'enforce' or 'visibility'"),
        ({"agent_id": 7}, "agent_id", "valid string"),
        ({"agent_id": "Web One"}, "agent_id", "must be"),
        ({"controller": "ctl.example:1"}, "controller", "DNS lookups"),
        ({"metrics_listen": "9471"}, "metrics_listen", "ADDRESS:PORT"),
        ({"labels": ["app"]}, "labels", "valid dictionary"),
        ({"labels": {"app": 1}}, "labels.app", "valid string"),
        ({"labels": {"Bad Key": "x"}}, "labels", "label keys are"),
        ({"failsafe": {"inbound": ["tcp/0"]}}, "failsafe.inbound", "outside"),
        ({"failsafe": {"inbound": [22]}}, "failsafe.inbound.0", "valid string"),
        ({"failsafe": {"inbound": "tcp/22"}}, "failsafe.inbound", "valid list"),
        ({"failsafe": {"in": ["tcp/22"]}}, "failsafe.in", "unknown setting"),
        ({"failsafe": ["tcp/22"]}, "failsafe", "mapping"),
        ({"state_dir": 5}, "state_dir", "valid string"),
        ({"verbose": True}, "verbose", "unknown setting"),
    ],
)
def test_a_wrong_setting_is_named_with_its_problem(
    settings: dict[str, object], where: str, message: str
) -> None:
    found = problems(**settings)
    assert list(found) == [where]
    assert message in found[where]


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigInvalid) as raised:
        parse_config({"mode": "loud", "x": 1, "flow_capacity": 5})
    assert dict(raised.value.problems) == {
        "x": "unknown setting",
        "agent_id": "Field required",
        "controller": "Field required",
        "mode": "Input should be 'enforce' or 'visibility'",
        "flow_capacity": "Input should be greater than or equal to 100",
    }
