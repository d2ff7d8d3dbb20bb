"""AdminService: converts protobuf to core calls and back; no logic of its own."""

from __future__ import annotations

from typing import Any, cast

import grpc

from bulkhead.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, ruleset_pb2
from controller.core import Controller
from controller.errors import ControllerError
from controller.server.errors import status_for
from controller.store.sqlite_store import AgentRecord

# Requests and responses vary per method; the context is only used to abort.
Context = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, core: Controller) -> None:
        self._core = core

    async def Apply(
        self, request: admin_pb2.ApplyRequest, context: Context
    ) -> admin_pb2.ApplyResponse:
        try:
            changes, revision = self._core.apply(list(request.documents), dry_run=request.dry_run)
        except ControllerError as exc:
            await context.abort(status_for(exc), str(exc))
        return admin_pb2.ApplyResponse(
            changes=[
                admin_pb2.ResourceChange(kind=c.kind, name=c.name, action=c.action) for c in changes
            ],
            revision=revision,
        )

    async def ListAgents(
        self, request: admin_pb2.ListAgentsRequest, context: Context
    ) -> admin_pb2.ListAgentsResponse:
        return admin_pb2.ListAgentsResponse(agents=[self._summary(a) for a in self._core.agents()])

    async def DescribeAgent(
        self, request: admin_pb2.DescribeAgentRequest, context: Context
    ) -> admin_pb2.AgentDetail:
        try:
            agent = self._core.agent(request.agent_id)
        except ControllerError as exc:
            await context.abort(status_for(exc), str(exc))
        return admin_pb2.AgentDetail(
            summary=self._summary(agent),
            ruleset=ruleset_pb2.Ruleset.FromString(agent.desired_ruleset),
            baseline=agent_pb2.Baseline.FromString(agent.baseline),
            last_error=agent.last_error,
        )

    async def ListResources(
        self, request: admin_pb2.ListResourcesRequest, context: Context
    ) -> admin_pb2.ListResourcesResponse:
        try:
            rows = self._core.list_resources(request.kind)
        except ControllerError as exc:
            await context.abort(status_for(exc), str(exc))
        return admin_pb2.ListResourcesResponse(
            resources=[
                admin_pb2.Resource(kind=request.kind, name=name, document=doc, revision=rev)
                for name, doc, rev in rows
            ]
        )

    async def DeleteResource(
        self, request: admin_pb2.DeleteResourceRequest, context: Context
    ) -> admin_pb2.DeleteResourceResponse:
        try:
            revision = self._core.delete(request.kind, request.name)
        except ControllerError as exc:
            await context.abort(status_for(exc), str(exc))
        return admin_pb2.DeleteResourceResponse(revision=revision)

    async def LabelAgent(
        self, request: admin_pb2.LabelAgentRequest, context: Context
    ) -> admin_pb2.LabelAgentResponse:
        try:
            labels = self._core.label(request.agent_id, dict(request.set), list(request.remove))
        except ControllerError as exc:
            await context.abort(status_for(exc), str(exc))
        return admin_pb2.LabelAgentResponse(labels=labels)

    def _summary(self, agent: AgentRecord) -> admin_pb2.AgentSummary:
        return admin_pb2.AgentSummary(
            agent_id=agent.agent_id,
            hostname=agent.hostname,
            labels=agent.labels,
            addresses=agent.addresses,
            mode=cast("agent_pb2.Mode", agent.mode),
            connected=self._core.is_connected(agent.agent_id),
            applied_revision=agent.applied_revision,
            applied_hash=agent.applied_hash,
            desired_revision=agent.desired_revision,
            desired_hash=agent.desired_hash,
            last_seen_unix_ms=agent.last_seen_ms,
        )
