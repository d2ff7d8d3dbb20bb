"""Prometheus metrics of the agent, read at scrape time and served from its event loop.

Counters live where the work happens (the observer, the link); the exposition reads them
when scraped, so the hot paths pay nothing for metrics. The text format (version 0.0.4)
is written here, and HTTP answered by asyncio, rather than with prometheus_client: its
package loads http.server, wsgiref, email and more, and its server runs a thread, about
2.4 MB of the agent's resident memory for six counters and a histogram
(docs/benchmarks.md). agent.main imports this module only when `metrics_listen` is set.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.dataplane.backend import Backend
from agent.dataplane.baseline import Baseline
from bulkhead.v1 import agent_pb2, ruleset_pb2

APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PATHS = frozenset({"/", "/metrics"})
REQUEST_LIMIT = 8192  # bytes of request head; a scrape's is a few hundred
REQUEST_TIMEOUT_S = 10.0  # a client that sends no full request head by then is dropped


class Histogram:
    """Observations counted into cumulative buckets (upper bounds inclusive), with their
    sum. Observed from worker threads (the applies), read by the event loop."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self._bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self._bounds) + 1)  # the last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self._bounds, value)] += 1
            self._sum += value

    def lines(self, name: str, documentation: str) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = _header(name, documentation, "histogram")
        cumulative = 0
        for bound, count in zip((*self._bounds, math.inf), counts, strict=True):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {_number(cumulative)}')
        lines.append(f"{name}_count {_number(cumulative)}")
        lines.append(f"{name}_sum {_number(total)}")
        return lines


@dataclass(frozen=True)
class _Series:
    name: str
    documentation: str
    kind: str  # counter or gauge
    read: Callable[[], float]

    def lines(self) -> list[str]:
        # A counter's samples carry the `_total` suffix, as Prometheus expects.
        name = f"{self.name}_total" if self.kind == "counter" else self.name
        return [*_header(name, self.documentation, self.kind), f"{name} {_number(self.read())}"]


class AgentMetrics:
    def __init__(self) -> None:
        self.apply_seconds = Histogram(APPLY_BUCKETS)
        self._series: list[_Series] = []
        self._server: asyncio.Server | None = None

    def counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Expose READ() as counter NAME (the exposition adds `_total`)."""
        self._series.append(_Series(name, documentation, "counter", read))

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._series.append(_Series(name, documentation, "gauge", read))

    def timed(self, backend: Backend) -> TimedBackend:
        """BACKEND with its applies timed into bulkhead_agent_apply_seconds."""
        return TimedBackend(backend, self.apply_seconds)

    def exposition(self) -> str:
        """Every metric in the Prometheus text format, version 0.0.4."""
        lines = self.apply_seconds.lines(
            "bulkhead_agent_apply_seconds", "Time to load one ruleset into the kernel."
        )
        for series in self._series:
            lines.extend(series.lines())
        return "\n".join(lines) + "\n"

    async def serve(self, host: str, port: int) -> None:
        """Answer scrapes on HOST:PORT from the running event loop; OSError if it cannot
        listen there."""
        self._server = await asyncio.start_server(self._answer, host, port, limit=REQUEST_LIMIT)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request, then close: GET (or HEAD) of / or /metrics; 404 or 405 otherwise."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            method, target = _request_line(head)
            if method not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", "only GET and HEAD\n"
            elif target.partition("?")[0] not in PATHS:
                status, body = "404 Not Found", "metrics are at /metrics\n"
            else:
                status, body = "200 OK", self.exposition()
            payload = body.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(payload)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a client that went away, never finished its request, or sent too much
        finally:
            writer.close()


def _request_line(head: bytes) -> tuple[str, str]:
    """METHOD and target of an HTTP request head ("" for what is missing)."""
    words = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    return (words[0] if words else ""), (words[1] if len(words) > 1 else "")


def _header(name: str, documentation: str, kind: str) -> list[str]:
    text = documentation.replace("\\", r"\\").replace("\n", r"\n")
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]


def _number(value: float) -> str:
    """A sample value as Prometheus writes one: 7.0, 0.25, +Inf, NaN."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


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
