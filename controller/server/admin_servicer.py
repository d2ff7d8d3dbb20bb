"""AdminService: authorises the operator, converts protobuf to core calls and back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import grpc

from bulkhead.v1 import admin_pb2, admin_pb2_grpc, agent_pb2
from controller.core import Controller
from controller.errors import ControllerError
from controller.server.auth import operator_caller
from controller.server.errors import status_for, unexpected_status
from controller.store.agent_event_store import AgentEventRecord
from controller.store.sqlite_store import AgentRecord, AuditRecord, TokenRecord

# Requests and responses vary per method; the context is only used to abort.
Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, core: Controller) -> None:
        self._core = core

    async def _run(self, context: Context, action: Callable[[str], T], *, write: bool) -> T:
        """Authorise the caller, run ACTION with its audit name, map errors to statuses."""
        try:
            actor = operator_caller(context, self._core.enrollment, write=write)
            return action(actor)
        except ControllerError as exc:
            await context.abort(status_for(exc), str(exc))
            raise  # unreachable: abort raises
        except Exception as exc:  # a bug, or some parser's limit: mapped, logged once
            await context.abort(*unexpected_status(exc, "an operator request"))
            raise  # unreachable: abort raises

    async def Apply(self, request: admin_pb2.ApplyRequest, context: Context) -> Any:
        changes, revision = await self._run(
            context,
            lambda actor: self._core.apply(
                list(request.documents), dry_run=request.dry_run, actor=actor
            ),
            write=not request.dry_run,
        )
        return admin_pb2.ApplyResponse(
            changes=[
                admin_pb2.ResourceChange(kind=c.kind, name=c.name, action=c.action) for c in changes
            ],
            revision=revision,
        )

    async def ListAgents(self, request: admin_pb2.ListAgentsRequest, context: Context) -> Any:
        agents = await self._run(context, lambda _: self._core.agents(), write=False)
        # Certificates in two queries for the whole fleet, not two per agent.
        enrollment = self._core.enrollment
        revoked, expiries = enrollment.revoked_agents(), enrollment.certificate_expiries_ms()
        return admin_pb2.ListAgentsResponse(
            agents=[self._summary(a, a.agent_id in revoked, expiries) for a in agents]
        )

    async def DescribeAgent(self, request: admin_pb2.DescribeAgentRequest, context: Context) -> Any:
        agent = await self._run(context, lambda _: self._core.agent(request.agent_id), write=False)
        return admin_pb2.AgentDetail(
            summary=self._summary(
                agent,
                self._core.is_revoked(agent.agent_id),
                {agent.agent_id: self._core.enrollment.certificate_expiry_ms(agent.agent_id)},
            ),
            ruleset=self._core.desired(agent.agent_id).ruleset(),
            baseline=agent_pb2.Baseline.FromString(agent.baseline),
            last_error=agent.last_error,
        )

    async def ListResources(self, request: admin_pb2.ListResourcesRequest, context: Context) -> Any:
        rows = await self._run(
            context, lambda _: self._core.list_resources(request.kind), write=False
        )
        return admin_pb2.ListResourcesResponse(
            resources=[
                admin_pb2.Resource(kind=request.kind, name=name, document=doc, revision=rev)
                for name, doc, rev in rows
            ]
        )

    async def DeleteResource(
        self, request: admin_pb2.DeleteResourceRequest, context: Context
    ) -> Any:
        revision = await self._run(
            context,
            lambda actor: self._core.delete(request.kind, request.name, actor=actor),
            write=True,
        )
        return admin_pb2.DeleteResourceResponse(revision=revision)

    async def LabelAgent(self, request: admin_pb2.LabelAgentRequest, context: Context) -> Any:
        labels = await self._run(
            context,
            lambda actor: self._core.label(
                request.agent_id,
                dict(request.set),
                list(request.remove),
                actor=actor,
                accept_reported=request.accept_reported,
                expected_reported=dict(request.expected_reported),
            ),
            write=True,
        )
        return admin_pb2.LabelAgentResponse(labels=labels)

    async def CreateToken(self, request: admin_pb2.CreateTokenRequest, context: Context) -> Any:
        text, token = await self._run(
            context,
            lambda actor: self._core.enrollment.create_token(
                dict(request.labels),
                request.ttl_seconds,
                request.uses,
                actor=actor,
                addresses=list(request.addresses),
            ),
            write=True,
        )
        return admin_pb2.CreateTokenResponse(token=text, info=_token_info(token))

    async def ListTokens(self, request: admin_pb2.ListTokensRequest, context: Context) -> Any:
        tokens = await self._run(context, lambda _: self._core.enrollment.tokens(), write=False)
        return admin_pb2.ListTokensResponse(tokens=[_token_info(t) for t in tokens])

    async def RevokeToken(self, request: admin_pb2.RevokeTokenRequest, context: Context) -> Any:
        await self._run(
            context,
            lambda actor: self._core.enrollment.revoke_token(request.token_id, actor=actor),
            write=True,
        )
        return admin_pb2.RevokeTokenResponse()

    async def RevokeAgent(self, request: admin_pb2.RevokeAgentRequest, context: Context) -> Any:
        count = await self._run(
            context,
            lambda actor: self._core.revoke_agent(request.agent_id, actor=actor),
            write=True,
        )
        return admin_pb2.RevokeAgentResponse(certificates=count)

    async def SetAgentAddresses(
        self, request: admin_pb2.SetAgentAddressesRequest, context: Context
    ) -> Any:
        agent = await self._run(
            context,
            lambda actor: self._core.set_allowed_ranges(
                request.agent_id, list(request.allowed_ranges), actor=actor
            ),
            write=True,
        )
        return admin_pb2.SetAgentAddressesResponse(
            allowed_ranges=agent.allowed_ranges,
            addresses=agent.addresses,
            refused_addresses=_refused(agent),
        )

    async def ListAudit(self, request: admin_pb2.ListAuditRequest, context: Context) -> Any:
        entries = await self._run(
            context,
            lambda _: self._core.audit(
                request.since_unix_ms, request.limit or 1000, include_agents=request.include_agents
            ),
            write=False,
        )
        return admin_pb2.ListAuditResponse(entries=[_audit_entry(e) for e in entries])

    async def ListFlows(self, request: admin_pb2.ListFlowsRequest, context: Context) -> Any:
        flows, truncated = await self._run(
            context, lambda _: self._core.observations.list_flows(request), write=False
        )
        return admin_pb2.ListFlowsResponse(flows=flows, truncated=truncated)

    async def GetConnections(
        self, request: admin_pb2.GetConnectionsRequest, context: Context
    ) -> Any:
        agent = await self._run(context, lambda _: self._core.agent(request.agent_id), write=False)
        try:
            return await self._core.observations.connections(
                agent.agent_id, self._core.session(agent.agent_id)
            )
        except ControllerError as exc:
            await context.abort(status_for(exc), str(exc))
            raise  # unreachable: abort raises
        except Exception as exc:  # a bug: mapped and logged once, as in _run
            await context.abort(*unexpected_status(exc, "an operator request"))
            raise  # unreachable: abort raises

    def _summary(
        self, agent: AgentRecord, revoked: bool, expiries: Mapping[str, int]
    ) -> admin_pb2.AgentSummary:
        desired = self._core.desired(agent.agent_id)
        return admin_pb2.AgentSummary(
            agent_id=agent.agent_id,
            hostname=agent.hostname,
            labels=self._core.compiled_labels(agent),
            addresses=agent.addresses,
            mode=cast("agent_pb2.Mode", agent.mode),
            connected=self._core.is_connected(agent.agent_id),
            applied_revision=agent.applied_revision,
            applied_hash=agent.applied_hash,
            desired_revision=desired.revision,
            desired_hash=desired.hash,
            last_seen_unix_ms=self._core.last_seen_ms(agent),
            revoked=revoked,
            certificate_not_after_unix_ms=expiries.get(agent.agent_id, 0),
            offline=self._core.is_offline(agent),
            stuck=self._core.is_stuck(agent.agent_id),
            reported_labels=agent.reported_labels,
            refused_addresses=_refused(agent),
            allowed_ranges=agent.allowed_ranges,
        )


def _refused(agent: AgentRecord) -> list[agent_pb2.RefusedAddress]:
    return [
        agent_pb2.RefusedAddress(address=address, reason=reason)
        for address, reason in sorted(agent.refused_addresses.items())
    ]


def _token_info(token: TokenRecord) -> admin_pb2.TokenInfo:
    return admin_pb2.TokenInfo(
        token_id=token.token_id,
        labels=token.labels,
        uses=token.uses,
        used=token.used,
        expires_unix_ms=token.expires_ms,
        revoked=token.revoked,
        created_by=token.created_by,
        created_unix_ms=token.created_ms,
        addresses=token.addresses,
    )


def _audit_entry(entry: AuditRecord | AgentEventRecord) -> admin_pb2.AuditEntry:
    return admin_pb2.AuditEntry(
        at_unix_ms=entry.at_ms,
        actor=entry.actor,
        action=entry.action,
        target=entry.target,
        detail=entry.detail,
        repeated_count=entry.repeated_count if isinstance(entry, AgentEventRecord) else 0,
    )
