"""The enrollment port as a whole: the front on the public address, a gRPC server of its
own behind it on a unix socket, and the throttle of failed enrollments.

A server of its own because its connection settings differ from the main port's: a
maximum connection age suits a port of short calls and would cut agents' streams.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from bulkhead.v1 import agent_pb2_grpc
from controller.enrollment import Enrollment
from controller.server.connection_limits import ConnectionLimits, enrollment_port_options
from controller.server.enrollment_front import EnrollmentFront
from controller.server.enrollment_servicer import EnrollmentServicer
from controller.server.enrollment_throttle import AuditThrottled, EnrollmentThrottle
from controller.store.sqlite_store import SqliteStore

# The generated registration function is untyped; this alias gives it a type.
_add_enrollment_service: Callable[[EnrollmentServicer, grpc.aio.Server], None] = (
    agent_pb2_grpc.add_EnrollmentServiceServicer_to_server
)


class EnrollmentPortError(Exception):
    pass


@dataclass
class EnrollmentPort:
    front: EnrollmentFront
    server: grpc.aio.Server
    throttle: EnrollmentThrottle
    socket_dir: Path
    reports: asyncio.Task[None]

    async def stop(self, grace: float | None) -> None:
        self.reports.cancel()
        await self.front.close()
        await self.server.stop(grace)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def audit_throttled_to(store: SqliteStore) -> AuditThrottled:
    """The throttle's audit entries, written to STORE by the controller itself."""

    def write(source: str, detail: Mapping[str, object]) -> None:
        with store.transaction():
            store.add_audit("controller", "enrollment.throttled", f"source/{source}", detail)

    return write


async def start_enrollment_port(
    host: str,
    port: int,
    enrollment: Enrollment,
    credentials: grpc.ServerCredentials,
    limits: ConnectionLimits,
    *,
    audit: AuditThrottled | None = None,
) -> EnrollmentPort:
    """Serve enrollment on HOST:PORT (EnrollmentPortError if it cannot listen)."""
    throttle = EnrollmentThrottle(limits.enroll_failures_per_minute, audit=audit)
    server = grpc.aio.server(options=enrollment_port_options(limits))
    _add_enrollment_service(EnrollmentServicer(enrollment, throttle), server)
    # Private (0700) and short: a unix socket path holds at most 107 bytes.
    socket_dir = Path(tempfile.mkdtemp(prefix="bulkhead-enroll-"))
    backend = str(socket_dir / "enroll.sock")
    try:
        server.add_secure_port(f"unix:{backend}", credentials)
    except RuntimeError as exc:
        shutil.rmtree(socket_dir, ignore_errors=True)
        raise EnrollmentPortError(f"enrollment server on {backend}: {exc}") from exc
    await server.start()
    front = EnrollmentFront(backend, limits.front())
    try:
        await front.start(host, port)
    except OSError as exc:
        await server.stop(None)
        shutil.rmtree(socket_dir, ignore_errors=True)
        raise EnrollmentPortError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    reports = asyncio.create_task(throttle.report_every_interval())
    return EnrollmentPort(front, server, throttle, socket_dir, reports)
