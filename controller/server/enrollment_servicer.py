"""EnrollmentService: the CA certificate for anyone, a client certificate for a token."""

from __future__ import annotations

from typing import Any

import grpc

from bulkhead.v1 import agent_pb2, agent_pb2_grpc
from controller.enrollment import Enrollment
from controller.errors import ControllerError
from controller.server.errors import status_for

Context = grpc.aio.ServicerContext[Any, Any]


class EnrollmentServicer(agent_pb2_grpc.EnrollmentServiceServicer):
    def __init__(self, enrollment: Enrollment) -> None:
        self._enrollment = enrollment

    async def GetCA(self, request: agent_pb2.GetCARequest, context: Context) -> Any:
        return agent_pb2.GetCAResponse(ca_pem=self._enrollment.ca_pem.decode())

    async def Enroll(self, request: agent_pb2.EnrollRequest, context: Context) -> Any:
        try:
            certificate, labels = self._enrollment.enroll(
                request.token, request.agent_id, request.csr_pem.encode(), request.hostname
            )
        except ControllerError as exc:
            await context.abort(status_for(exc), str(exc))
            raise  # unreachable: abort raises
        return agent_pb2.EnrollResponse(
            certificate_pem=certificate.decode(),
            ca_pem=self._enrollment.ca_pem.decode(),
            labels=labels,
        )
