"""bulkhead-sim end to end: 20 simulated agents against a real controller on 127.0.0.1.

Touches no firewall and needs no namespace: the controller process is started by the
benchmark harness on free local ports with a temporary state dir, and stopped again
whatever happens (the harness's finally; checked below). Nothing here asserts speed.
"""

from __future__ import annotations

import asyncio

import psutil  # type: ignore[import-untyped]
import pytest

from controller.sim.benchmark import BenchConfig, BenchReport, run_benchmark
from controller.sim.fleet import FleetOptions

pytestmark = pytest.mark.integration

AGENTS = 20


@pytest.fixture(scope="module")
def report() -> BenchReport:
    config = BenchConfig(
        agents=AGENTS,
        groups=4,
        rounds=2,
        deadline=15.0,
        connect_timeout=20.0,
        storm_deadline=20.0,
        # Short backoff ceilings keep the storm well inside the test's time bound.
        fleet=FleetOptions(heartbeat_interval=1.0, backoff_max=2.0),
    )
    lines: list[str] = []
    return asyncio.run(run_benchmark(config, lines.append))


@pytest.mark.timeout(60)
def test_every_agent_gets_every_policy_change(report: BenchReport) -> None:
    assert [r.name for r in report.rounds] == [
        "policy created (tcp/8080)",
        "port changed to tcp/8081",
    ]
    for result in report.rounds:
        assert result.since_return.count == AGENTS
        assert result.since_return.missing == 0
        assert result.since_call.minimum >= 0
        assert result.since_return.p50 <= result.since_return.p99 <= result.since_return.maximum
        assert result.acked_seconds is not None  # the controller recorded every ack
    assert report.status is not None
    assert report.status.given_up == 0
    # 20 initial snapshots, then 20 per round: nothing pushed twice.
    assert report.metrics["bulkhead_controller_snapshots_pushed_total"] == 3 * AGENTS
    assert report.metrics["bulkhead_controller_connected_agents"] == AGENTS


@pytest.mark.timeout(60)
def test_every_agent_resyncs_after_a_controller_restart(report: BenchReport) -> None:
    storm = report.storm
    assert storm is not None
    assert storm.resynced == AGENTS
    assert storm.given_up == 0
    assert storm.resync_seconds is not None
    # Nothing changed while it was down, so the controller only confirms (InSync).
    assert storm.snapshots == 0
    assert storm.controller_rss > 0


@pytest.mark.timeout(60)
def test_resources_are_reported(report: BenchReport) -> None:
    assert report.enroll.enrolled == AGENTS
    assert report.enroll.failed == {}
    assert report.controller_rss_connected > 0
    assert report.controller_rss_peak >= report.controller_rss_connected
    assert report.sim_rss > 0


@pytest.mark.timeout(60)
def test_the_controller_processes_are_gone(report: BenchReport) -> None:
    assert len(report.controller_pids) == 2  # the first start and the restart
    for pid in report.controller_pids:
        assert not _running(pid)


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
