"""gRPC settings shared by the agent, the simulator, the CLI and the controller.

Message sizes. The largest message the controller sends is a snapshot: one compiled
ruleset, which the compiler keeps within MAX_RULESET_BYTES, in an envelope. Everything that
receives from the controller (agents, the simulator, the CLI's `describe agent`) accepts
MAX_MESSAGE_BYTES, and the controller sends no more: gRPC's 4 MiB default receive limit
made a big snapshot undeliverable (RESOURCE_EXHAUSTED) while the controller kept sending
it. The controller receives much less (hellos, acks, bounded flow batches, an apply), so
it keeps a smaller limit against hosts that send too much: MAX_REQUEST_BYTES.

HTTP/2 settings of the agent stream.

Both ends turn off gRPC's bandwidth-delay probe. It sends a PING after every burst of data a
peer receives, and the other end answers it: on a stream of small messages that is two more
frames, reads and wakeups per message. With 10,000 agents it doubled the gRPC I/O threads'
work during a fan-out (docs/benchmarks.md). Without the probe the window stays where it is
set, so the agent sets a fixed one large enough for a big snapshot over a slow link, as
grpc-java and grpc-go do when a static window is configured.
"""

from __future__ import annotations

MIB = 1024 * 1024
# The largest compiled ruleset (its protobuf encoding) the controller may produce.
MAX_RULESET_BYTES = 16 * MIB
# The largest message the controller sends: a ruleset plus its envelope (snapshot fields,
# or `describe agent`'s agent details around it).
MAX_MESSAGE_BYTES = MAX_RULESET_BYTES + 1 * MIB
# The largest message the controller receives, from an agent or an operator: gRPC's
# default, set explicitly.
MAX_REQUEST_BYTES = 4 * MIB

# A client that receives what the controller sends, and sends what it accepts.
CLIENT_MESSAGE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
]
# The controller's side of the same limits.
SERVER_MESSAGE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

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
    *CLIENT_MESSAGE_OPTIONS,
]

# The controller's side: it receives acks, heartbeats and bounded flow batches, all small.
# (Its server serves the CLI too: the message limits apply to every call.)
SERVER_STREAM_OPTIONS: list[tuple[str, int]] = [
    ("grpc.http2.bdp_probe", 0),
    *SERVER_MESSAGE_OPTIONS,
]
