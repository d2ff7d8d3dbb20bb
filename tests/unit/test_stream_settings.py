"""The agent stream's HTTP/2 settings (bulkhead.channel) as gRPC really applies them.

Neither end may run the bandwidth-delay probe: it costs a PING and its answer per burst of
data received, which doubled gRPC's I/O work in a 10,000-agent fan-out. Whether it runs is
seen in gRPC's own `bdp_estimator` trace, in a fresh interpreter (the trace is read at
import). A control run with default options shows the trace does report probes. The
window the agent announces instead is seen in the `http` trace of the SETTINGS frame.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from bulkhead.channel import AGENT_STREAM_WINDOW_BYTES

ECHO_CODE = """
import asyncio, sys
import grpc
from agent.link import CHANNEL_OPTIONS
from controller.server.serve import SERVER_OPTIONS

defaults = sys.argv[1] == "defaults"
client_options = [] if defaults else [o for o in CHANNEL_OPTIONS if "ssl" not in o[0]]
server_options = [] if defaults else SERVER_OPTIONS

async def echo(requests, context):
    async for message in requests:
        yield message

async def main():
    handler = grpc.method_handlers_generic_handler(
        "t.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(echo)}
    )
    server = grpc.aio.server(options=server_options)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(target, options=client_options) as channel:
        call = channel.stream_stream("/t.Echo/Stream")()
        for _ in range(20):
            await call.write(b"x" * 3000)  # about one snapshot
            await call.read()
            await asyncio.sleep(0.01)
        await call.done_writing()
    await server.stop(None)
    print(port)

asyncio.run(main())
"""


def echoed(options: str) -> tuple[str, list[str]]:
    """The server's port and gRPC's trace lines while 20 messages are echoed."""
    done = subprocess.run(
        [sys.executable, "-c", ECHO_CODE, options],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"GRPC_TRACE": "bdp_estimator,http", "GRPC_VERBOSITY": "debug", "PATH": "/usr/bin"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1], done.stderr.splitlines()


def probes(options: str) -> tuple[int, int]:
    """BDP probes started by (the client, the server) while 20 messages are echoed."""
    server_port, lines = echoed(options)
    # "bdp[ipv4:127.0.0.1:PORT]:start": PORT is the peer's, so the server's port
    # marks the client's estimator.
    started = [line for line in lines if "]:start" in line]
    by_client = sum(f":{server_port}]" in line for line in started)
    return by_client, len(started) - by_client


@pytest.mark.parametrize("side", ["client", "server"])
def test_the_trace_shows_probes_with_grpc_defaults(side: str) -> None:
    by_client, by_server = probes("defaults")
    assert (by_client if side == "client" else by_server) > 0


def test_neither_the_agent_nor_the_controller_probes() -> None:
    assert probes("bulkhead") == (0, 0)


def test_the_agent_announces_its_fixed_window() -> None:
    # With no probe the window never grows: the agent asks for 1 MiB from the start.
    _, lines = echoed("bulkhead")
    announced = [line for line in lines if "SVR" in line and "INITIAL_WINDOW_SIZE" in line]
    assert announced, "the server logged no SETTINGS from the agent"
    assert all(line.endswith(f"= {AGENT_STREAM_WINDOW_BYTES}") for line in announced)
