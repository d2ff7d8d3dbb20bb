"""What one agent can make the controller log: a line per agent and kind per interval."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bulkhead.v1 import agent_pb2
from controller.log_limit import LogLimit, left_out
from tests.pki_support import make_controller


def test_one_line_per_agent_and_kind_per_interval_then_the_count_left_out() -> None:
    now = [0.0]
    limit = LogLimit(60.0, clock=lambda: now[0])
    assert limit.allow("web", "ack") == 0
    assert [limit.allow("web", "ack") for _ in range(5)] == [None] * 5
    assert limit.allow("db", "ack") == 0, "another agent has its own allowance"
    assert limit.allow("web", "labels") == 0, "and another kind"
    now[0] = 61.0
    assert limit.allow("web", "ack") == 5
    assert left_out(5) == " (5 more like it not logged)"
    assert left_out(0) == ""


def test_a_thousand_failed_applies_make_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    core = make_controller(tmp_path)
    core.connect("web", agent_pb2.Hello(agent_id="web", hostname="web"))
    with caplog.at_level(logging.INFO, logger="controller.core"):
        for index in range(1000):
            core.acknowledged("web", agent_pb2.Ack(revision=1, ok=False, error=f"boom {index}"))
            core.config_changed("web", agent_pb2.ConfigChange(labels={"n": str(index)}))
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if "failed to apply" in line]) == 1
    assert len([line for line in lines if "reports labels" in line]) == 1
    assert core.agent("web").last_error == "boom 999", "what is kept is the latest"
