"""Prometheus metrics of the agent (prometheus-client), read at scrape time.

Counters live where the work happens (the observer, the link); a collector reads them
when scraped, so the hot paths pay nothing for metrics. agent.main imports this module
only when `metrics_listen` is set: prometheus_client costs ~1-2 MB of resident memory that
an agent without metrics would carry for nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.dataplane.backend import Backend
from agent.dataplane.baseline import Baseline
from bulkhead.v1 import agent_pb2, ruleset_pb2

APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.apply_seconds = Histogram(
            "bulkhead_agent_apply_seconds",
            "Time to load one ruleset into the kernel.",
            buckets=APPLY_BUCKETS,
            registry=self.registry,
        )
        self._sources: list[Callable[[], Iterator[CounterMetricFamily | GaugeMetricFamily]]] = []
        self.registry.register(_Reader(self._sources))

    def counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Expose READ() as counter NAME (the exposition adds `_total`)."""
        self._sources.append(lambda: iter([CounterMetricFamily(name, documentation, read())]))

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._sources.append(lambda: iter([GaugeMetricFamily(name, documentation, read())]))

    def timed(self, backend: Backend) -> TimedBackend:
        """BACKEND with its applies timed into bulkhead_agent_apply_seconds."""
        return TimedBackend(backend, self.apply_seconds)

    def serve(self, host: str, port: int) -> None:
        """Answer scrapes on HOST:PORT from a background thread."""
        start_http_server(port, addr=host, registry=self.registry)


class _Reader(Collector):
    def __init__(
        self, sources: list[Callable[[], Iterator[CounterMetricFamily | GaugeMetricFamily]]]
    ) -> None:
        self._sources = sources

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for source in self._sources:
            yield from source()


class TimedBackend:
    """A Backend whose applies are timed into a histogram."""

    def __init__(self, inner: Backend, histogram: Histogram) -> None:
        self._inner = inner
        self._histogram = histogram

    def apply(self, ruleset: ruleset_pb2.Ruleset, baseline: Baseline) -> None:
        started = time.perf_counter()
        self._inner.apply(ruleset, baseline)
        self._histogram.observe(time.perf_counter() - started)

    def update_elements(
        self,
        changes: Sequence[agent_pb2.SetChange],
        result: ruleset_pb2.Ruleset,
        baseline: Baseline,
    ) -> bool:
        started = time.perf_counter()
        done = self._inner.update_elements(changes, result, baseline)
        if done:
            self._histogram.observe(time.perf_counter() - started)
        return done

    def remove(self) -> None:
        self._inner.remove()

    def is_present(self) -> bool:
        return self._inner.is_present()

    def state_fingerprint(self) -> str:
        return self._inner.state_fingerprint()
