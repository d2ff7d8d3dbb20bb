"""Prometheus metrics of the controller (prometheus-client), read from the core at
scrape time: the hot paths keep plain counters and pay nothing for metrics."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from controller.core import Controller
from controller.server.enrollment_front import FrontStats
from controller.server.enrollment_throttle import FailureStats


class ControllerCollector(Collector):
    def __init__(self, core: Controller) -> None:
        self._core = core

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        core = self._core
        yield GaugeMetricFamily(
            "bulkhead_controller_connected_agents",
            "Agents with a live stream.",
            core.connected_count(),
        )
        yield GaugeMetricFamily(
            "bulkhead_controller_agents", "Agents the controller knows.", len(core.agents())
        )
        yield CounterMetricFamily(
            "bulkhead_controller_flows_received",
            "Flow records received from agents.",
            core.observations.flows_received,
        )
        dropped = CounterMetricFamily(
            "bulkhead_controller_agent_flows_dropped",
            "Flows an agent discarded because its pending table was full (as it reports).",
            labels=["agent"],
        )
        for agent_id, count in sorted(core.observations.dropped_by_agent.items()):
            dropped.add_metric([agent_id], count)
        yield dropped
        refused = CounterMetricFamily(
            "bulkhead_controller_agent_flow_reports_refused",
            "Flow reports refused whole, per agent and reason: invalid, foreign_address (a "
            "flow's local address is not one the agent holds) or count_budget.",
            labels=["agent", "reason"],
        )
        for (agent_id, reason), count in sorted(core.observations.refused_by_agent.items()):
            refused.add_metric([agent_id, reason], count)
        yield refused
        yield CounterMetricFamily(
            "bulkhead_controller_agent_events",
            "Events agents caused (tamper reports, renewals, address changes), merged or not.",
            core.agent_events.received,
        )
        yield CounterMetricFamily(
            "bulkhead_controller_agent_events_suppressed",
            "Agent events beyond an agent's hourly rows, counted into one suppressed entry.",
            core.agent_events.suppressed,
        )
        yield GaugeMetricFamily(
            "bulkhead_controller_flows_stored", "Flow rows kept.", core.observations.stored()
        )
        yield CounterMetricFamily(
            "bulkhead_controller_snapshots_pushed",
            "Complete policy snapshots sent to agents.",
            core.pushes.snapshots,
        )
        yield CounterMetricFamily(
            "bulkhead_controller_deltas_pushed",
            "Policy deltas (set element changes) sent to agents.",
            core.pushes.deltas,
        )
        yield GaugeMetricFamily(
            "bulkhead_controller_agents_stuck",
            "Agents whose stream was cut for not answering a ruleset, not yet recovered.",
            core.stuck_count(),
        )


class EnrollmentCollector(Collector):
    """The enrollment port's connections and failed enrollments (enrollment_front.py,
    enrollment_throttle.py)."""

    def __init__(self, front: FrontStats, failures: FailureStats) -> None:
        self._front = front
        self._failures = failures

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "bulkhead_controller_enrollment_connections",
            "Open connections to the enrollment port.",
            self._front.open,
        )
        refused = CounterMetricFamily(
            "bulkhead_controller_enrollment_connections_refused",
            "Enrollment connections closed unrelayed: over the per-source or total cap, "
            "silent past the handshake timeout, or the enrollment server unreachable.",
            labels=["reason"],
        )
        for reason in ("per_source", "total", "silent", "backend"):
            refused.add_metric([reason], self._front.refused[reason])
        yield refused
        failures = CounterMetricFamily(
            "bulkhead_controller_enrollment_failures",
            "Enroll calls that failed, by gRPC status.",
            labels=["code"],
        )
        for code, count in sorted(self._failures.failures.items()):
            failures.add_metric([code], count)
        yield failures
        yield CounterMetricFamily(
            "bulkhead_controller_enrollment_throttled",
            "Enroll calls refused (RESOURCE_EXHAUSTED) because their source failed too often.",
            self._failures.throttled,
        )


def serve_metrics(
    core: Controller,
    host: str,
    port: int,
    *,
    front: FrontStats | None = None,
    failures: FailureStats | None = None,
) -> CollectorRegistry:
    """Answer scrapes on HOST:PORT from a background thread."""
    registry = CollectorRegistry()
    registry.register(ControllerCollector(core))
    if front is not None and failures is not None:
        registry.register(EnrollmentCollector(front, failures))
    start_http_server(port, addr=host, registry=registry)
    return registry
