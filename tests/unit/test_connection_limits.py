"""Connection limits on real sockets, in process: each gRPC setting takes effect in this
grpcio, the enrollment front caps connections per source and in total, and the servicer
behind the front sees the caller's own address.

Waits are bounded well above the limit under test and well below gRPC's defaults (120 s
handshake, no idle or age limit), so a setting that did not take effect fails the test.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from bulkhead.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from controller.core import Controller
from controller.pki import CONTROLLER_NAME, CertificateAuthority
from controller.server.admin_servicer import AdminServicer
from controller.server.agent_servicer import AgentServicer
from controller.server.connection_limits import ConnectionLimits, main_port_options
from controller.server.enrollment_port import EnrollmentPort, start_enrollment_port
from controller.server.main import main
from controller.server.serve import SERVER_OPTIONS
from tests.controller_process import forwarded_from
from tests.pki_support import (
    CHANNEL_OPTIONS,
    agent_credentials,
    anonymous_credentials,
    make_controller,
    operator_credentials,
    server_credentials,
)

BOUND_S = 20.0  # every wait ends by then; the limits under test are 1 s


@dataclass
class Ports:
    core: Controller
    ca: CertificateAuthority
    main: str
    enrollment: EnrollmentPort
    enroll_target: str


@asynccontextmanager
async def serving(tmp_path: Path, limits: ConnectionLimits) -> AsyncIterator[Ports]:
    """Both ports as `bulkhead-controller` wires them, with LIMITS."""
    core = make_controller(tmp_path)
    ca = CertificateAuthority.load_or_create(tmp_path / "pki")
    server = grpc.aio.server(options=[*SERVER_OPTIONS, *main_port_options(limits)])
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(core), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(core), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(ca))
    await server.start()
    enrollment = await start_enrollment_port(
        "127.0.0.1", 0, core.enrollment, server_credentials(ca, require_client=False), limits
    )
    enroll_port = enrollment.front.port
    try:
        yield Ports(core, ca, f"127.0.0.1:{port}", enrollment, f"127.0.0.1:{enroll_port}")
    finally:
        await enrollment.stop(None)
        await server.stop(None)


async def eventually(condition: Callable[[], bool], bound_s: float = BOUND_S) -> bool:
    deadline = time.monotonic() + bound_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def closed_by_server(reader: asyncio.StreamReader, bound_s: float = BOUND_S) -> bool:
    """True once the server closes (whatever it sent first), False if not within BOUND_S."""

    async def until_closed() -> None:
        while await reader.read(4096):
            pass

    try:
        await asyncio.wait_for(until_closed(), bound_s)
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    return True


async def went_idle(channel: grpc.aio.Channel, bound_s: float = BOUND_S) -> bool:
    """True once the channel leaves READY (the server's GOAWAY), within BOUND_S."""
    try:
        await asyncio.wait_for(
            channel.wait_for_state_change(grpc.ChannelConnectivity.READY), bound_s
        )
    except TimeoutError:
        return False
    return True


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())  # type: ignore[arg-type]


def test_idle_main_port_connection_gets_goaway_but_a_stream_is_never_cut(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, ConnectionLimits(idle_timeout_s=1)) as ports:
            agent = grpc.aio.secure_channel(
                ports.main, agent_credentials(ports.ca, "db", ports.core), options=CHANNEL_OPTIONS
            )
            admin = grpc.aio.secure_channel(
                ports.main,
                operator_credentials(ports.ca, "alice", "admin", ports.core),
                options=CHANNEL_OPTIONS,
            )
            outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
            await outbox.put(
                agent_pb2.AgentMessage(
                    hello=agent_pb2.Hello(agent_id="db", addresses=["198.18.0.11"])
                )
            )

            async def messages() -> AsyncIterator[agent_pb2.AgentMessage]:
                while True:
                    yield await outbox.get()

            stream = agent_pb2_grpc.AgentServiceStub(agent).Connect(messages())
            await asyncio.wait_for(stream.read(), BOUND_S)  # the first snapshot
            await admin_pb2_grpc.AdminServiceStub(admin).ListAgents(
                admin_pb2.ListAgentsRequest(), timeout=BOUND_S
            )
            # A connection with no call open is closed after the idle time...
            assert await went_idle(admin)
            # ... and, one more idle time later, the stream's connection is still serving it.
            await asyncio.sleep(1.5)
            assert not stream.done()
            assert agent.get_state() == grpc.ChannelConnectivity.READY
            listed = await admin_pb2_grpc.AdminServiceStub(admin).ListAgents(
                admin_pb2.ListAgentsRequest(), timeout=BOUND_S
            )
            assert [a.connected for a in listed.agents] == [True]
            stream.cancel()
            await agent.close(None)
            await admin.close(None)

    run(body)


def test_enrollment_connection_is_replaced_at_its_maximum_age(tmp_path: Path) -> None:
    limits = ConnectionLimits(enroll_max_age_s=1, enroll_idle_timeout_s=600)

    async def body() -> None:
        async with (
            serving(tmp_path, limits) as ports,
            grpc.aio.secure_channel(
                ports.enroll_target, anonymous_credentials(ports.ca), options=CHANNEL_OPTIONS
            ) as channel,
        ):
            stub = agent_pb2_grpc.EnrollmentServiceStub(channel)
            stats = ports.enrollment.front.stats
            # Busy all along (never idle), yet a second connection comes: the first aged out.
            deadline = time.monotonic() + BOUND_S
            while stats.relayed < 2 and time.monotonic() < deadline:
                await stub.GetCA(agent_pb2.GetCARequest(), timeout=BOUND_S)
                await asyncio.sleep(0.1)
            assert stats.relayed >= 2

    run(body)


def test_enrollment_connection_without_calls_is_closed_when_idle(tmp_path: Path) -> None:
    limits = ConnectionLimits(enroll_idle_timeout_s=1)

    async def body() -> None:
        async with (
            serving(tmp_path, limits) as ports,
            grpc.aio.secure_channel(
                ports.enroll_target, anonymous_credentials(ports.ca), options=CHANNEL_OPTIONS
            ) as channel,
        ):
            await agent_pb2_grpc.EnrollmentServiceStub(channel).GetCA(
                agent_pb2.GetCARequest(), timeout=BOUND_S
            )
            assert ports.enrollment.front.stats.open == 1
            assert await went_idle(channel)
            assert await eventually(lambda: ports.enrollment.front.stats.open == 0)

    run(body)


async def connect(target: str, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = target.rpartition(":")
    return await asyncio.open_connection(host, int(port), local_addr=(source, 0))


def test_front_caps_connections_per_source_and_in_total(tmp_path: Path) -> None:
    limits = ConnectionLimits(enroll_per_source=4, enroll_total=6, handshake_timeout_s=60)

    async def body() -> None:
        async with serving(tmp_path, limits) as ports:
            stats = ports.enrollment.front.stats
            first = [await connect(ports.enroll_target, "127.0.0.2") for _ in range(4)]
            assert await eventually(lambda: stats.open == 4)
            beyond_source, _ = await connect(ports.enroll_target, "127.0.0.2")
            assert await closed_by_server(beyond_source)
            # Another source still gets in, up to the total.
            other = [await connect(ports.enroll_target, "127.0.0.3") for _ in range(2)]
            assert await eventually(lambda: stats.open == 6)
            beyond_total, _ = await connect(ports.enroll_target, "127.0.0.4")
            assert await closed_by_server(beyond_total)
            assert stats.refused == {"per_source": 1, "total": 1}
            for _, writer in [*first, *other]:
                writer.close()
            assert await eventually(lambda: stats.open == 0)
            # Freed slots are usable again.
            _, writer = await connect(ports.enroll_target, "127.0.0.2")
            assert await eventually(lambda: stats.open == 1)
            writer.close()

    run(body)


@pytest.mark.parametrize("sends", [b"", b"\x16"], ids=["silent", "stalled-handshake"])
def test_front_and_grpc_close_a_connection_that_never_completes_tls(
    tmp_path: Path, sends: bytes
) -> None:
    # Silent: the front's own timer. One byte of a ClientHello, then nothing: gRPC's
    # handshake timeout behind the front.
    async def body() -> None:
        async with serving(tmp_path, ConnectionLimits(handshake_timeout_s=1)) as ports:
            reader, writer = await connect(ports.enroll_target, "127.0.0.1")
            writer.write(sends)
            assert await closed_by_server(reader)
            writer.close()
            stats = ports.enrollment.front.stats
            assert await eventually(lambda: stats.open == 0)
            assert stats.relayed == (1 if sends else 0)
            assert stats.refused["silent"] == (0 if sends else 1)

    run(body)


def test_servicer_behind_the_front_sees_the_callers_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with serving(tmp_path, ConnectionLimits()) as ports:
            for source in ("127.0.0.3", "127.0.0.4"):
                async with (
                    forwarded_from(source, ports.enroll_target) as address,
                    grpc.aio.secure_channel(
                        address, anonymous_credentials(ports.ca), options=CHANNEL_OPTIONS
                    ) as channel,
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await agent_pb2_grpc.EnrollmentServiceStub(channel).Enroll(
                            agent_pb2.EnrollRequest(token="nonsense", agent_id="web-1"),
                            timeout=BOUND_S,
                        )
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    with caplog.at_level(logging.WARNING, logger="controller.server.enrollment_throttle"):
        run(body)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[2] for line in lines] == ["127.0.0.3", "127.0.0.4"], lines


def test_an_ipv6_caller_is_counted_by_its_64(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        core = make_controller(tmp_path)
        ca = CertificateAuthority.load_or_create(tmp_path / "pki")
        port = await start_enrollment_port(
            "::1", 0, core.enrollment, server_credentials(ca, require_client=False),
            ConnectionLimits(),
        )  # fmt: skip
        try:
            async with grpc.aio.secure_channel(
                f"[::1]:{port.front.port}", anonymous_credentials(ca), options=CHANNEL_OPTIONS
            ) as channel:
                with pytest.raises(grpc.aio.AioRpcError):
                    await agent_pb2_grpc.EnrollmentServiceStub(channel).Enroll(
                        agent_pb2.EnrollRequest(token="nonsense", agent_id="web-1"),
                        timeout=BOUND_S,
                    )
        finally:
            await port.stop(None)

    with caplog.at_level(logging.WARNING, logger="controller.server.enrollment_throttle"):
        run(body)
    assert [r.getMessage().split()[2] for r in caplog.records] == ["::/64"]


@pytest.mark.parametrize("port", ["main", "enrollment"])
def test_a_connection_silent_after_tls_is_closed_after_the_handshake_timeout(
    tmp_path: Path, port: str
) -> None:
    # Issue 17: 2,000 such connections held 132 MB. gRPC counts the HTTP/2 preface as part
    # of the handshake, so the handshake timeout closes them too.
    async def body() -> None:
        async with serving(tmp_path, ConnectionLimits(handshake_timeout_s=1)) as ports:
            context = ssl.create_default_context(cadata=ports.ca.certificate_pem.decode())
            context.set_alpn_protocols(["h2"])
            target = ports.main if port == "main" else ports.enroll_target
            if port == "main":  # mutual TLS: an operator's certificate
                cert, key = ports.ca.issue_operator("alice", "admin")
                (tmp_path / "op.crt").write_bytes(cert)
                (tmp_path / "op.key").write_bytes(key)
                context.load_cert_chain(tmp_path / "op.crt", tmp_path / "op.key")
            host, _, number = target.rpartition(":")
            reader, writer = await asyncio.open_connection(
                host, int(number), ssl=context, server_hostname=CONTROLLER_NAME
            )
            assert await closed_by_server(reader)
            writer.close()

    run(body)


def test_help_lists_the_limits_with_their_defaults() -> None:
    shown = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    for option, default in [
        ("--handshake-timeout", "10.0"),
        ("--idle-timeout", "300.0"),
        ("--enroll-connections-per-source", "16"),
        ("--enroll-connections", "256"),
        ("--enroll-failures-per-minute", "60"),
    ]:
        described = shown.split(f" {option} ", 1)[1].split(" --", 1)[0]
        assert f"[default: {default};" in described, described


@pytest.mark.parametrize(
    "arguments",
    [
        ["--handshake-timeout", "0"],
        ["--enroll-connections-per-source", "0"],
        ["--enroll-connections", "-1"],
        ["--enroll-failures-per-minute", "0"],
    ],
)
def test_a_limit_out_of_range_is_refused_naming_the_option(
    tmp_path: Path, arguments: list[str]
) -> None:
    result = CliRunner().invoke(main, [*arguments, "--state-dir", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert arguments[0] in result.output
    assert not (tmp_path / "s").exists()
