"""EnrollmentService: the CA certificate for anyone, a client certificate for a token.

Failed Enroll calls are charged to their source (enrollment_throttle.py); a source out of
failures is refused before the store is touched."""

from __future__ import annotations

import math
from typing import Any

import grpc

from bulkhead.v1 import agent_pb2, agent_pb2_grpc
from controller.enrollment import Enrollment
from controller.errors import ControllerError
from controller.server.enrollment_throttle import EnrollmentThrottle
from controller.server.errors import status_for, unexpected_status
from controller.server.sources import peer_source

Context = grpc.aio.ServicerContext[Any, Any]


class EnrollmentServicer(agent_pb2_grpc.EnrollmentServiceServicer):
    def __init__(self, enrollment: Enrollment, throttle: EnrollmentThrottle | None = None) -> None:
        self._enrollment = enrollment
        self._throttle = throttle or EnrollmentThrottle()

    async def GetCA(self, request: agent_pb2.GetCARequest, context: Context) -> Any:
        return agent_pb2.GetCAResponse(ca_pem=self._enrollment.ca_pem.decode())

    async def Enroll(self, request: agent_pb2.EnrollRequest, context: Context) -> Any:
        source = peer_source(context.peer())
        wait_s = self._throttle.retry_after_s(source)
        if wait_s > 0:
            self._throttle.refused(source)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"enrollment: too many failed attempts from {source}; "
                f"try again in {math.ceil(wait_s)} s",
            )
        try:
            certificate, labels = self._enrollment.enroll(
                request.token, request.agent_id, request.csr_pem.encode(), request.hostname
            )
        except ControllerError as exc:
            code = status_for(exc)
            self._throttle.failed(source, code.name, str(exc))
            await context.abort(code, str(exc))
            raise  # unreachable: abort raises
        except Exception as exc:  # a bug, or some parser's limit: counted like a failure,
            # so a stranger repeating it is throttled before it floods the log
            code, message = unexpected_status(exc, f"an enrollment from {source}")
            self._throttle.failed(source, code.name, message)
            await context.abort(code, message)
            raise  # unreachable: abort raises
        return agent_pb2.EnrollResponse(
            certificate_pem=certificate.decode(),
            ca_pem=self._enrollment.ca_pem.decode(),
            labels=labels,
        )
