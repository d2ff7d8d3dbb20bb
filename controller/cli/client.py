"""The AdminService client: channel creation, typed calls, gRPC errors mapped to CliErrors."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from bulkhead.v1 import admin_pb2, admin_pb2_grpc
from controller.cli.errors import ControllerError

DEFAULT_CONTROLLER = "127.0.0.1:50151"
DEFAULT_TIMEOUT_SECONDS = 10.0
CONTROLLER_ENV = "BULKHEAD_CONTROLLER"
# A described agent carries every peer address; gRPC's 4 MiB default is too small at scale.
_MAX_RECEIVE_BYTES = 64 * 1024 * 1024

_Response = TypeVar("_Response", bound=Message)
# The generated stub module is untyped; naming its class through a typed alias keeps the
# one call to it checked whether or not mypy follows that module.
_StubFactory = Callable[[grpc.Channel], Any]
_ADMIN_STUB: _StubFactory = admin_pb2_grpc.AdminServiceStub


def create_channel(address: str) -> grpc.Channel:
    """Open the channel to the controller: the one place transport security will be set up."""
    return grpc.insecure_channel(
        address, options=[("grpc.max_receive_message_length", _MAX_RECEIVE_BYTES)]
    )


class AdminClient:
    """Typed calls of the AdminService; every failure is raised as a ControllerError."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = create_channel(address)
        self._stub = _ADMIN_STUB(self._channel)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def apply(self, documents: Sequence[str], *, dry_run: bool) -> admin_pb2.ApplyResponse:
        request = admin_pb2.ApplyRequest(documents=documents, dry_run=dry_run)
        return self._call("Apply", request, admin_pb2.ApplyResponse)

    def list_agents(self) -> admin_pb2.ListAgentsResponse:
        request = admin_pb2.ListAgentsRequest()
        return self._call("ListAgents", request, admin_pb2.ListAgentsResponse)

    def describe_agent(self, agent_id: str) -> admin_pb2.AgentDetail:
        request = admin_pb2.DescribeAgentRequest(agent_id=agent_id)
        return self._call("DescribeAgent", request, admin_pb2.AgentDetail)

    def list_resources(self, kind: str) -> admin_pb2.ListResourcesResponse:
        request = admin_pb2.ListResourcesRequest(kind=kind)
        return self._call("ListResources", request, admin_pb2.ListResourcesResponse)

    def delete_resource(self, kind: str, name: str) -> admin_pb2.DeleteResourceResponse:
        request = admin_pb2.DeleteResourceRequest(kind=kind, name=name)
        return self._call("DeleteResource", request, admin_pb2.DeleteResourceResponse)

    def label_agent(
        self, agent_id: str, set_labels: Mapping[str, str], remove: Sequence[str]
    ) -> admin_pb2.LabelAgentResponse:
        request = admin_pb2.LabelAgentRequest(agent_id=agent_id, set=set_labels, remove=remove)
        return self._call("LabelAgent", request, admin_pb2.LabelAgentResponse)

    def _call(self, method: str, request: Message, response_type: type[_Response]) -> _Response:
        try:
            response = getattr(self._stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, self.address, self.timeout) from exc
        if not isinstance(response, response_type):
            raise ControllerError(f"the controller answered {method} with an unexpected message")
        return response


def map_rpc_error(exc: grpc.RpcError, address: str, timeout: float) -> ControllerError:
    """Turn a failed call into the operator-facing error for its status code."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            reason = f"no answer within {timeout:g}s; raise --timeout if it is busy"
        else:
            reason = _unavailable_reason(details)
        return ControllerError(
            f"cannot reach the controller at {address} ({reason}): "
            "is bulkhead-controller running? Set --controller or BULKHEAD_CONTROLLER."
        )
    lines = [line.strip() for line in details.splitlines() if line.strip()]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ControllerError(lines or ["the controller rejected the request (no reason given)"])
    if code == grpc.StatusCode.NOT_FOUND:
        return ControllerError("; ".join(lines) or "not found")
    status = code.name if code is not None else "UNKNOWN"
    reason = "; ".join(lines) or "no details"
    return ControllerError(f"the controller at {address} answered {status}: {reason}")


def _unavailable_reason(details: str) -> str:
    # gRPC's text is long ("failed to connect to all addresses; last error: UNKNOWN:
    # ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused"): keep the cause.
    one_line = " ".join(details.split())
    cause = re.split(r":\s*", one_line)[-1].strip(" []")
    return cause.lower() or "unavailable"
