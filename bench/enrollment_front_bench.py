"""What the enrollment front costs, and what idle connections cost with it.

A server process (this script with --serve) runs the enrollment service twice over one
store and CA, as `bulkhead-controller` wires it (controller/server/enrollment_port.py):
once directly on a TCP port, once behind the front (TCP relay -> unix socket -> gRPC).
From this process, on loopback:

1. GetCA on a fresh channel each time (TCP connect, TLS handshake, one call), ROUNDS
   times in a row: median and 90th percentile, direct and through the front.
2. ENROLLS enrollments (fresh CSRs made beforehand) over one channel, IN_FLIGHT at a
   time: total seconds, direct and through the front, in turns (the store grows).
3. The server's RSS with 1,100 idle TCP connections from one source at the front (16 are
   kept, the rest closed at once), then with 256 connections that completed TLS and
   stay silent, from 16 sources (the front's total cap).

Prints figures; asserts nothing. Run: .venv/bin/python bench/enrollment_front_bench.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import grpc

from agent.keytool import generate_key, make_csr
from bulkhead.v1 import agent_pb2, agent_pb2_grpc
from controller.enrollment import MAX_TOKEN_USES, Enrollment
from controller.pki import CONTROLLER_NAME, CertificateAuthority
from controller.server.connection_limits import ConnectionLimits, enrollment_port_options
from controller.server.enrollment_port import start_enrollment_port
from controller.server.enrollment_servicer import EnrollmentServicer
from controller.store.sqlite_store import SqliteStore

CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", CONTROLLER_NAME)]
# The generated stub and registration are untyped; these aliases give them types.
_STUB: Callable[[grpc.aio.Channel], Any] = agent_pb2_grpc.EnrollmentServiceStub
_ADD_SERVICER: Callable[[EnrollmentServicer, grpc.aio.Server], None] = (
    agent_pb2_grpc.add_EnrollmentServiceServicer_to_server
)
# Long enough that no connection under test is closed for silence or idleness.
LIMITS = ConnectionLimits(handshake_timeout_s=120, enroll_idle_timeout_s=600)


async def serve(directory: Path) -> None:
    store = SqliteStore(directory / "bench.db")
    ca = CertificateAuthority.load_or_create(directory / "pki")
    enrollment = Enrollment(store, ca)
    cert, key = ca.issue_server(("127.0.0.1",))
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca.certificate_pem, require_client_auth=False
    )
    direct = grpc.aio.server(options=enrollment_port_options(LIMITS))
    _ADD_SERVICER(EnrollmentServicer(enrollment), direct)
    direct_port = direct.add_secure_port("127.0.0.1:0", credentials)
    await direct.start()
    fronted = await start_enrollment_port("127.0.0.1", 0, enrollment, credentials, LIMITS)
    token, _ = enrollment.create_token({}, 3600, MAX_TOKEN_USES, actor="bench")
    ready = {
        "direct": f"127.0.0.1:{direct_port}",
        "front": f"127.0.0.1:{fronted.front.port}",
        "token": token,
        "ca": ca.certificate_pem.decode(),
    }
    print(json.dumps(ready), flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the bench closes our stdin
    await fronted.stop(None)
    await direct.stop(None)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def fresh_channel_get_ca(target: str, ca_pem: bytes, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        async with grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(ca_pem), options=CHANNEL_OPTIONS
        ) as channel:
            await _STUB(channel).GetCA(agent_pb2.GetCARequest(), timeout=10)
        times.append(time.perf_counter() - started)
    return times


async def enroll_many(
    target: str, ca_pem: bytes, token: str, requests: list[agent_pb2.EnrollRequest], in_flight: int
) -> float:
    slots = asyncio.Semaphore(in_flight)
    async with grpc.aio.secure_channel(
        target, grpc.ssl_channel_credentials(ca_pem), options=CHANNEL_OPTIONS
    ) as channel:
        stub = _STUB(channel)

        async def one(request: agent_pb2.EnrollRequest) -> None:
            async with slots:
                await stub.Enroll(request, timeout=30)

        started = time.perf_counter()
        await asyncio.gather(*(one(request) for request in requests))
        return time.perf_counter() - started


def requests_for(prefix: str, token: str, count: int) -> list[agent_pb2.EnrollRequest]:
    return [
        agent_pb2.EnrollRequest(
            token=token,
            agent_id=f"{prefix}-{n}",
            csr_pem=make_csr(generate_key(), f"{prefix}-{n}").decode(),
            hostname=f"{prefix}-{n}",
        )
        for n in range(count)
    ]


def idle_tcp(target: str, count: int, source: str) -> list[socket.socket]:
    host, _, port = target.rpartition(":")
    opened = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(3)
        sock.bind((source, 0))
        with suppress(OSError):  # refused or dropped: still part of the flood
            sock.connect((host, int(port)))
        opened.append(sock)
    return opened


def idle_tls(target: str, ca_pem: bytes, sources: list[str], each: int) -> list[ssl.SSLSocket]:
    host, _, port = target.rpartition(":")
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(["h2"])
    opened = []
    for source in sources:
        for _ in range(each):
            raw = socket.socket()
            raw.settimeout(10)
            raw.bind((source, 0))
            raw.connect((host, int(port)))
            opened.append(context.wrap_socket(raw, server_hostname=CONTROLLER_NAME))
    return opened


def median_p90(times: list[float]) -> str:
    ordered = sorted(times)
    return (
        f"median {statistics.median(ordered) * 1000:.2f} ms, "
        f"p90 {ordered[int(len(ordered) * 0.9)] * 1000:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--enrolls", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=50)
    args = parser.parse_args()
    if args.serve is not None:
        asyncio.run(serve(args.serve))
        return
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    with tempfile.TemporaryDirectory(prefix="bh-bench-front-") as directory:
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", directory],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdin is not None
        assert server.stdout is not None
        try:
            ready = json.loads(server.stdout.readline())
            ca_pem = ready["ca"].encode()
            report(server.pid, ready, ca_pem, args)
        finally:
            server.stdin.close()
            server.wait(timeout=30)


def report(pid: int, ready: dict[str, str], ca_pem: bytes, args: argparse.Namespace) -> None:
    for name in ("direct", "front"):
        asyncio.run(fresh_channel_get_ca(ready[name], ca_pem, 20))  # warm up
    for name in ("direct", "front", "direct", "front"):
        times = asyncio.run(fresh_channel_get_ca(ready[name], ca_pem, args.rounds))
        print(f"GetCA on a fresh channel, {name:6}: {median_p90(times)}")
    for round_, name in enumerate(("direct", "front", "direct", "front", "front", "direct")):
        requests = requests_for(f"bench-{round_}", ready["token"], args.enrolls)
        seconds = asyncio.run(
            enroll_many(ready[name], ca_pem, ready["token"], requests, args.in_flight)
        )
        print(f"{args.enrolls} enrollments over one channel, {name:6}: {seconds:.2f} s")
    before = rss_mb(pid)
    tcp = idle_tcp(ready["front"], 1100, "127.0.0.2")
    time.sleep(1)
    print(f"RSS {before:.1f} MB; with 1,100 idle TCP from one source: {rss_mb(pid):.1f} MB")
    for sock in tcp:
        sock.close()
    time.sleep(1)
    before = rss_mb(pid)
    tls = idle_tls(ready["front"], ca_pem, [f"127.0.1.{n}" for n in range(1, 17)], 16)
    time.sleep(1)
    print(
        f"RSS {before:.1f} MB; with {len(tls)} silent TLS connections (16 sources): "
        f"{rss_mb(pid):.1f} MB"
    )
    for tls_sock in tls:
        tls_sock.close()


if __name__ == "__main__":
    main()
