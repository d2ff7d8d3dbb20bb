"""The agent's own Prometheus exposition and HTTP endpoint: what Prometheus's own parser
(prometheus_client's, in the tests only) reads from it, and what other requests get."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import metrics as metrics_module
from agent.metrics import AgentMetrics, Histogram


def sample_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_counters_gauges_and_the_histogram_parse_as_prometheus_reads_them() -> None:
    metrics = AgentMetrics()
    seen = [3]
    metrics.counter("bulkhead_agent_connections_seen", "Connections\\counted.", lambda: seen[0])
    metrics.gauge("bulkhead_agent_flows_pending", "Flows waiting.\nTo go.", lambda: 2.5)
    for value in (0.001, 0.003, 0.2, 7.0):  # a bound counts in its own bucket
        metrics.apply_seconds.observe(value)
    seen[0] = 5  # read at scrape time

    text = metrics.exposition()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    values = sample_values(text)

    assert families["bulkhead_agent_connections_seen"].type == "counter"
    assert families["bulkhead_agent_connections_seen"].documentation == "Connections\\counted."
    assert families["bulkhead_agent_flows_pending"].documentation == "Flows waiting.\nTo go."
    assert families["bulkhead_agent_apply_seconds"].type == "histogram"
    assert values[("bulkhead_agent_connections_seen_total", ())] == 5
    assert values[("bulkhead_agent_flows_pending", ())] == 2.5
    buckets = {
        labels[0][1]: value
        for (name, labels), value in values.items()
        if name == "bulkhead_agent_apply_seconds_bucket"
    }
    assert buckets["0.001"] == 1
    assert buckets["0.0025"] == 1
    assert buckets["0.005"] == 2
    assert buckets["0.25"] == 3
    assert buckets["5.0"] == 3
    assert buckets["+Inf"] == 4
    assert values[("bulkhead_agent_apply_seconds_count", ())] == 4
    assert values[("bulkhead_agent_apply_seconds_sum", ())] == pytest.approx(7.204)
    assert "bulkhead_agent_connections_seen_total 5.0" in text.splitlines()


def test_an_empty_histogram_has_every_bucket_at_zero() -> None:
    lines = Histogram([0.5, 0.1]).lines("h", "An empty one.")
    assert lines[2:] == [
        'h_bucket{le="0.1"} 0.0',
        'h_bucket{le="0.5"} 0.0',
        'h_bucket{le="+Inf"} 0.0',
        "h_count 0.0",
        "h_sum 0.0",
    ]


def serving(body: Callable[[int], Awaitable[None]]) -> None:
    """Run BODY(port) with an AgentMetrics served on 127.0.0.1:port."""

    async def main() -> None:
        metrics = AgentMetrics()
        metrics.counter("bulkhead_agent_flows_reported", "Flows sent.", lambda: 7)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        await metrics.serve("127.0.0.1", port)
        try:
            await body(port)
        finally:
            metrics.close()

    asyncio.run(main())


async def exchange(port: int, request: bytes) -> bytes:
    """The server's whole answer to REQUEST; b"" if it closed without one (a reset too:
    closing with unread data resets the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status", "has_metrics"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200 OK", True),
        (b"GET /?name[]=x HTTP/1.0\r\n\r\n", b"200 OK", True),
        (b"HEAD /metrics HTTP/1.1\r\n\r\n", b"200 OK", False),
        (b"GET /favicon.ico HTTP/1.1\r\n\r\n", b"404 Not Found", False),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405 Method Not Allowed", False),
    ],
)
def test_requests_get_the_metrics_or_a_status_that_says_why_not(
    request_bytes: bytes, status: bytes, has_metrics: bool
) -> None:
    async def body(port: int) -> None:
        answer = await exchange(port, request_bytes)
        head, _, content = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status)
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
        assert (b"bulkhead_agent_flows_reported_total 7.0" in content) is has_metrics

    serving(body)


def test_an_oversized_or_unfinished_request_is_dropped_and_the_next_scrape_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "REQUEST_TIMEOUT_S", 0.2)

    async def body(port: int) -> None:
        huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (2 * metrics_module.REQUEST_LIMIT)
        assert await exchange(port, huge + b"\r\n\r\n") == b""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # and nothing more
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the timeout
        writer.close()
        answer = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK")

    serving(body)
