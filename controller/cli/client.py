"""The AdminService client: channel creation, typed calls, gRPC errors mapped to CliErrors."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from bulkhead.channel import CLIENT_MESSAGE_OPTIONS
from bulkhead.v1 import admin_pb2, admin_pb2_grpc, agent_pb2
from controller.cli.credentials import load_credentials
from controller.cli.errors import ControllerError
from controller.cli.rpc_errors import map_rpc_error
from controller.pki import CONTROLLER_NAME

DEFAULT_CONTROLLER = "127.0.0.1:50151"
DEFAULT_TIMEOUT_SECONDS = 10.0
CONTROLLER_ENV = "BULKHEAD_CONTROLLER"

_Response = TypeVar("_Response", bound=Message)
# The generated stub module is untyped; naming its class through a typed alias keeps the
# one call to it checked whether or not mypy follows that module.
_StubFactory = Callable[[grpc.Channel], Any]
_ADMIN_STUB: _StubFactory = admin_pb2_grpc.AdminServiceStub


def create_channel(address: str, credentials_dir: Path) -> grpc.Channel:
    """The mutual-TLS channel to the controller; there is no plaintext mode.

    The controller is verified by the name in its certificate, whatever ADDRESS is (an IP
    literal usually): the CA in ca.crt issues that name only to the controller.
    """
    credentials = load_credentials(credentials_dir)
    return grpc.secure_channel(
        address,
        credentials.channel_credentials(),
        options=[
            ("grpc.ssl_target_name_override", CONTROLLER_NAME),
            # A described agent carries its whole ruleset: accept what the controller sends.
            *CLIENT_MESSAGE_OPTIONS,
        ],
    )


class AdminClient:
    """Typed calls of the AdminService; every failure is raised as a ControllerError."""

    def __init__(
        self, address: str, credentials_dir: Path, timeout: float = DEFAULT_TIMEOUT_SECONDS
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = create_channel(address, credentials_dir)
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
        self,
        agent_id: str,
        set_labels: Mapping[str, str],
        remove: Sequence[str],
        *,
        accept_reported: Mapping[str, str] | None = None,
    ) -> admin_pb2.LabelAgentResponse:
        """ACCEPT_REPORTED: the reported labels to accept (the controller refuses if the
        host reports others by now)."""
        request = admin_pb2.LabelAgentRequest(
            agent_id=agent_id,
            set=set_labels,
            remove=remove,
            accept_reported=accept_reported is not None,
            expected_reported=accept_reported or {},
        )
        return self._call("LabelAgent", request, admin_pb2.LabelAgentResponse)

    def set_agent_addresses(
        self, agent_id: str, allowed_ranges: Sequence[str]
    ) -> admin_pb2.SetAgentAddressesResponse:
        request = admin_pb2.SetAgentAddressesRequest(
            agent_id=agent_id, allowed_ranges=allowed_ranges
        )
        return self._call("SetAgentAddresses", request, admin_pb2.SetAgentAddressesResponse)

    def create_token(
        self,
        labels: Mapping[str, str],
        ttl_seconds: int,
        uses: int,
        *,
        addresses: Sequence[str] = (),
    ) -> admin_pb2.CreateTokenResponse:
        request = admin_pb2.CreateTokenRequest(
            labels=labels, ttl_seconds=ttl_seconds, uses=uses, addresses=addresses
        )
        return self._call("CreateToken", request, admin_pb2.CreateTokenResponse)

    def list_tokens(self) -> admin_pb2.ListTokensResponse:
        request = admin_pb2.ListTokensRequest()
        return self._call("ListTokens", request, admin_pb2.ListTokensResponse)

    def revoke_token(self, token_id: str) -> admin_pb2.RevokeTokenResponse:
        request = admin_pb2.RevokeTokenRequest(token_id=token_id)
        return self._call("RevokeToken", request, admin_pb2.RevokeTokenResponse)

    def revoke_agent(self, agent_id: str) -> admin_pb2.RevokeAgentResponse:
        request = admin_pb2.RevokeAgentRequest(agent_id=agent_id)
        return self._call("RevokeAgent", request, admin_pb2.RevokeAgentResponse)

    def list_audit(
        self, since_unix_ms: int, limit: int, *, include_agents: bool = False
    ) -> admin_pb2.ListAuditResponse:
        request = admin_pb2.ListAuditRequest(
            since_unix_ms=since_unix_ms, limit=limit, include_agents=include_agents
        )
        return self._call("ListAudit", request, admin_pb2.ListAuditResponse)

    def list_flows(self, request: admin_pb2.ListFlowsRequest) -> admin_pb2.ListFlowsResponse:
        return self._call("ListFlows", request, admin_pb2.ListFlowsResponse)

    def get_connections(self, agent_id: str) -> agent_pb2.ConnectionTable:
        request = admin_pb2.GetConnectionsRequest(agent_id=agent_id)
        return self._call("GetConnections", request, agent_pb2.ConnectionTable)

    def _call(self, method: str, request: Message, response_type: type[_Response]) -> _Response:
        try:
            response = getattr(self._stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, self.address, self.timeout) from exc
        if not isinstance(response, response_type):
            raise ControllerError(f"the controller answered {method} with an unexpected message")
        return response
