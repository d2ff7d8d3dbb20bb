"""HTTP/2 settings of the agent stream, shared by the agent, the simulator and the controller.

Both ends turn off gRPC's bandwidth-delay probe. It sends a PING after every burst of data a
peer receives, and the other end answers it: on a stream of small messages that is two more
frames, reads and wakeups per message. With 10,000 agents it doubled the gRPC I/O threads'
work during a fan-out (docs/benchmarks.md). Without the probe the window stays where it is
set, so the agent sets a fixed one large enough for a big snapshot over a slow link, as
grpc-java and grpc-go do when a static window is configured.
"""

from __future__ import annotations

# A fixed receive window for the agent's stream: a 1 MiB snapshot in one round trip.
AGENT_STREAM_WINDOW_BYTES = 1 << 20

# The agent's stream channel, less the target name override each caller adds.
AGENT_STREAM_OPTIONS: list[tuple[str, int]] = [
    # Pings notice a controller that vanished without closing the connection.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", AGENT_STREAM_WINDOW_BYTES),
]

# The controller's side: it receives acks, heartbeats and bounded flow batches, all small.
SERVER_STREAM_OPTIONS: list[tuple[str, int]] = [("grpc.http2.bdp_probe", 0)]

# The largest compiled ruleset the controller may produce for one agent, and the message
# limit both ends of every channel set (a snapshot plus its envelope).
MAX_RULESET_BYTES = 16 * 1024 * 1024
MAX_MESSAGE_BYTES = MAX_RULESET_BYTES + 1024 * 1024
