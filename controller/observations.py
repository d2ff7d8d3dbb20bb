"""What agents observe, on the controller: flow reports in, resolved flows and live
connection tables out.

Both ends of a managed connection report it: the client's agent as outbound (with the
client process), the server's as inbound (with the server process). A flow row shown to
operators is one source -> destination pair and verdict merged from both reports (see
_verdicts for the one case where the two ends disagree).

A report is bound to its reporter (the agent of the verified certificate): every flow's
local address must be one of that agent's accepted addresses, so one host cannot write
rows for another workload's address, nor invent flows between others, which would feed
`bulkhead suggest`. Counts are bounded: at most MAX_COUNT per flow, and per agent a token
bucket that refills COUNT_BUDGET_PER_S (100,000 connections or denied packets a second,
more than one host's conntrack and NFLOG events are read at) up to COUNT_BUDGET_MAX (an
hour of that, 360,000,000); a report whose counts add up to more than what is left is
refused. Refused reports are counted per agent and reason (metrics).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from bulkhead.v1 import admin_pb2, agent_pb2
from controller.errors import InvalidArgument, Unavailable
from controller.log_limit import LogLimit, left_out
from controller.sessions import AgentSession
from controller.store.flow_store import FlowStore, ReportId, StoredFlow

log = logging.getLogger(__name__)

MAX_FLOWS_PER_REPORT = 1000
MAX_REPORT_NUMBER = 2**63 - 1  # epoch and sequence are stored as SQLite integers
COUNT_BUDGET_PER_S = 100_000
COUNT_BUDGET_MAX = COUNT_BUDGET_PER_S * 3600
MAX_COUNT = COUNT_BUDGET_MAX  # one report's count for one flow; more is garbage, not traffic
FOREIGN_NAMED_MAX = 5  # flows named in the error of a report with foreign addresses
# Why reports were refused, as counted per agent (metrics label `reason`).
REFUSED_INVALID = "invalid"
REFUSED_FOREIGN = "foreign_address"
REFUSED_BUDGET = "count_budget"
PROTOCOLS = ("tcp", "udp", "icmp")
PROCESS_NAME_MAX = 256
DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 100_000
CONNECTIONS_TIMEOUT_S = 5.0
PRUNE_INTERVAL_S = 60.0
_DIRECTIONS = (agent_pb2.FLOW_DIRECTION_INBOUND, agent_pb2.FLOW_DIRECTION_OUTBOUND)
_VERDICTS = (agent_pb2.VERDICT_ALLOWED, agent_pb2.VERDICT_DENIED, agent_pb2.VERDICT_WOULD_DENY)


@dataclass(frozen=True)
class Workloads:
    """What flow resolution needs to know about the estate right now."""

    labels: Mapping[str, Mapping[str, str]]  # agent id -> effective labels
    owners: Mapping[str, str]  # address -> agent id
    iplists: Sequence[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Mapping[str, str]]]

    def address_labels(self, address: str) -> dict[str, str]:
        """Labels of the IP lists containing an address no workload holds."""
        ip = ipaddress.ip_address(address)
        labels: dict[str, str] = {}
        for network, list_labels in self.iplists:
            if ip.version == network.version and ip in network:
                labels.update(list_labels)
        return labels


class Observations:
    def __init__(
        self,
        flows: FlowStore,
        workloads: Callable[[], Workloads],
        *,
        holder_of: Callable[[str], str | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._flows = flows
        self._workloads = workloads
        # Who holds an address now (the controller's address book), rather than the
        # workloads view, which is up to a second old: a freshly accepted address must not
        # cost a batch. Without it, the view.
        self._holder_of = holder_of
        self._clock = clock
        self._last_prune = 0.0
        self._pending: dict[str, tuple[str, asyncio.Future[agent_pb2.ConnectionTable]]] = {}
        self._budgets: dict[str, tuple[float, float]] = {}  # agent -> (counts left, at)
        self.dropped_by_agent: dict[str, int] = {}
        self.refused_by_agent: Counter[tuple[str, str]] = Counter()  # (agent, reason)
        self._log_limit = LogLimit()
        self.flows_received = 0

    # -- reports from agents -------------------------------------------------------

    def record(self, agent_id: str, report: agent_pb2.FlowReport) -> agent_pb2.FlowsStored | None:
        """Store one agent's flow batch, or refuse all of it with every problem named.

        A report that asks for an acknowledgement (epoch and sequence set) gets one back,
        also when refused (with the error: it is not sent again, and the stream stays up,
        since observations must not cost the agent its policy channel); one sent again is
        acknowledged without being counted twice. A best-effort report (epoch and
        sequence 0) is refused with InvalidArgument."""
        now = self._clock()
        owners = self._workloads().owners
        total = sum(flow.count for flow in report.flows)
        reason, problems = REFUSED_INVALID, _report_problems(report)
        if not problems:
            reason, problems = REFUSED_FOREIGN, self._foreign(agent_id, report, owners)
        if not problems and total > (left := self._budget_left(agent_id, now)):
            reason, problems = REFUSED_BUDGET, [_over_budget(total, left)]
        acknowledged = bool(report.epoch or report.sequence)
        if problems:
            self.refused_by_agent[(agent_id, reason)] += 1
        if problems and not acknowledged:
            raise InvalidArgument(problems)
        if problems:
            error = "; ".join(problems)
            if (skipped := self._log_limit.allow(agent_id, reason)) is not None:
                log.warning(
                    "agent %s: flow report %d refused: %s%s",
                    agent_id, report.sequence, error, left_out(skipped),
                )  # fmt: skip
            return _stored(report, error)
        stored = [
            StoredFlow(
                reporter=agent_id,
                direction=flow.direction,
                local_address=_canonical(flow.local_address),
                peer_address=_canonical(flow.peer_address),
                peer_workload=owners.get(_canonical(flow.peer_address), ""),
                port=flow.port,
                protocol=flow.protocol,
                verdict=flow.verdict,
                process=flow.process.name,
                pid=flow.process.pid,
                count=flow.count,
                first_seen_ms=flow.first_seen_unix_ms,
                last_seen_ms=flow.last_seen_unix_ms,
            )
            for flow in report.flows
        ]
        identity = ReportId(agent_id, report.epoch, report.sequence) if acknowledged else None
        if self._flows.record(stored, identity):
            self.flows_received += len(stored)
            self.dropped_by_agent[agent_id] = report.dropped
            self._budgets[agent_id] = (self._budget_left(agent_id, now) - total, now)
        if now - self._last_prune >= PRUNE_INTERVAL_S:
            self._last_prune = now
            self._flows.prune(int(now * 1000))
        return _stored(report, "") if acknowledged else None

    def _foreign(
        self, agent_id: str, report: agent_pb2.FlowReport, owners: Mapping[str, str]
    ) -> list[str]:
        """A problem per flow (the first few named) whose local address the agent does
        not hold: another agent's, refused to it, or no one's."""
        # A report holds few distinct local addresses: each is parsed once.
        canonical = {text: _canonical(text) for text in {f.local_address for f in report.flows}}
        holder = self._holder_of or owners.get
        not_held = {text for text, address in canonical.items() if holder(address) != agent_id}
        if not not_held:
            return []
        foreign = [
            (index, canonical[flow.local_address])
            for index, flow in enumerate(report.flows)
            if flow.local_address in not_held
        ]
        problems = [
            f"flows[{index}].local_address: {address} is not one of this agent's accepted "
            "addresses (a report may only hold flows of the reporter's own addresses)"
            for index, address in foreign[:FOREIGN_NAMED_MAX]
        ]
        if len(foreign) > FOREIGN_NAMED_MAX:
            problems.append(
                f"flows: {len(foreign) - FOREIGN_NAMED_MAX} more with addresses it does not hold"
            )
        return problems

    def _budget_left(self, agent_id: str, now: float) -> float:
        """The counts the agent may still report now (its bucket starts full)."""
        left, at = self._budgets.get(agent_id, (COUNT_BUDGET_MAX, now))
        return min(COUNT_BUDGET_MAX, left + max(0.0, now - at) * COUNT_BUDGET_PER_S)

    def stored(self) -> int:
        """Flow rows kept now."""
        return self._flows.count()

    # -- flows for operators -------------------------------------------------------

    def list_flows(
        self, request: admin_pb2.ListFlowsRequest
    ) -> tuple[list[admin_pb2.FlowEntry], bool]:
        """Merged flows matching the request, most recent first, and whether more matched."""
        limit = request.limit or DEFAULT_LIST_LIMIT
        if limit > MAX_LIST_LIMIT:
            raise InvalidArgument([f"limit: {limit} is more than {MAX_LIST_LIMIT}"])
        bad = [v for v in request.verdicts if v not in _VERDICTS]
        if bad:
            raise InvalidArgument([f"verdicts: {bad[0]} is not a known verdict"])
        workloads = self._workloads()
        entries = merge(self._flows.since(request.since_unix_ms), workloads)
        wanted = set(request.verdicts)
        selected = [
            e
            for e in entries
            if (not wanted or e.verdict in wanted)
            and _touches(e, request.workload, dict(request.labels))
        ]
        selected.sort(key=lambda e: e.last_seen_unix_ms, reverse=True)
        return selected[:limit], len(selected) > limit

    # -- live connection tables ----------------------------------------------------

    async def connections(
        self, agent_id: str, session: AgentSession | None, timeout: float = CONNECTIONS_TIMEOUT_S
    ) -> agent_pb2.ConnectionTable:
        """Ask a connected agent for its socket table and wait for the answer."""
        if session is None or session.closed:
            raise Unavailable(f"agent {agent_id!r} is not connected")
        request_id = secrets.token_hex(8)
        future: asyncio.Future[agent_pb2.ConnectionTable] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[request_id] = (agent_id, future)
        try:
            request = agent_pb2.ConnectionsRequest(request_id=request_id)
            session.send(agent_pb2.ControllerMessage(connections_request=request))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise Unavailable(
                f"agent {agent_id!r} did not send its connections within {timeout:g} s"
            ) from None
        finally:
            self._pending.pop(request_id, None)

    def answered(self, agent_id: str, table: agent_pb2.ConnectionTable) -> None:
        """An agent's answer; ignored unless that agent was asked with that id."""
        pending = self._pending.get(table.request_id)
        if pending is None or pending[0] != agent_id or pending[1].done():
            return
        pending[1].set_result(table)


def merge(rows: Iterable[StoredFlow], workloads: Workloads) -> list[admin_pb2.FlowEntry]:
    """Both ends' reports as source -> destination entries, one per verdict."""
    groups: dict[tuple[str, str, int, str], list[StoredFlow]] = defaultdict(list)
    for row in rows:
        if row.direction == agent_pb2.FLOW_DIRECTION_OUTBOUND:
            key = (row.local_address, row.peer_address, row.port, row.protocol)
        else:
            key = (row.peer_address, row.local_address, row.port, row.protocol)
        groups[key].append(row)
    entries = []
    for (source, destination, port, protocol), group in groups.items():
        outbound = [r for r in group if r.direction == agent_pb2.FLOW_DIRECTION_OUTBOUND]
        inbound = [r for r in group if r.direction == agent_pb2.FLOW_DIRECTION_INBOUND]
        for verdict in _verdicts(outbound, inbound):
            out_v = [r for r in outbound if r.verdict == verdict]
            in_v = [r for r in inbound if r.verdict == verdict]
            both = out_v + in_v
            entries.append(
                admin_pb2.FlowEntry(
                    source=_endpoint(source, out_v or outbound, inbound, workloads),
                    destination=_endpoint(destination, in_v or inbound, outbound, workloads),
                    port=port,
                    protocol=protocol,
                    verdict=cast("agent_pb2.Verdict", verdict),
                    # Both ends count the same connections: the larger count, not the sum.
                    count=max(sum(r.count for r in out_v), sum(r.count for r in in_v)),
                    first_seen_unix_ms=min(r.first_seen_ms for r in both),
                    last_seen_unix_ms=max(r.last_seen_ms for r in both),
                )
            )
    return entries


def _verdicts(outbound: list[StoredFlow], inbound: list[StoredFlow]) -> list[int]:
    """The verdicts a group shows. A source counts a connection as allowed when its own
    egress lets the SYN out; if the destination reported the group but never allowed
    it, the destination's drop is the truth and that "allowed" is not shown."""
    verdicts = {r.verdict for r in outbound} | {r.verdict for r in inbound}
    inbound_verdicts = {r.verdict for r in inbound}
    if inbound and agent_pb2.VERDICT_ALLOWED not in inbound_verdicts:
        verdicts.discard(agent_pb2.VERDICT_ALLOWED)
    return sorted(verdicts)


def _endpoint(
    address: str,
    own: list[StoredFlow],
    other: list[StoredFlow],
    workloads: Workloads,
) -> admin_pb2.FlowEndpoint:
    """One end: its workload (the reporter of OWN rows, else as the other end resolved
    it), labels now, and its most-seen process."""
    workload = own[0].reporter if own else next((r.peer_workload for r in other), "")
    if workload and workload in workloads.labels:
        labels = dict(workloads.labels[workload])
    else:
        labels = workloads.address_labels(address)
    counted: Counter[str] = Counter()
    pids: dict[str, int] = {}
    for row in own:
        if row.process:
            counted[row.process] += row.count
            pids[row.process] = row.pid
    process = counted.most_common(1)[0][0] if counted else ""
    return admin_pb2.FlowEndpoint(
        workload=workload, address=address, labels=labels, process=process, pid=pids.get(process, 0)
    )


def _touches(entry: admin_pb2.FlowEntry, workload: str, labels: dict[str, str]) -> bool:
    ends = (entry.source, entry.destination)
    if workload and all(end.workload != workload for end in ends):
        return False
    if labels:
        return any(
            end.workload and all(end.labels.get(k) == v for k, v in labels.items()) for end in ends
        )
    return True


def _canonical(address: str) -> str:
    return str(ipaddress.ip_address(address))


def _over_budget(total: int, left: float) -> str:
    return (
        f"flows: the counts add up to {total}, more than the {int(left)} this agent may "
        f"report now (at most {COUNT_BUDGET_PER_S:,} a second, {COUNT_BUDGET_MAX:,} at once)"
    )


def _stored(report: agent_pb2.FlowReport, error: str) -> agent_pb2.FlowsStored:
    return agent_pb2.FlowsStored(epoch=report.epoch, sequence=report.sequence, error=error)


def _report_problems(report: agent_pb2.FlowReport) -> list[str]:
    if len(report.flows) > MAX_FLOWS_PER_REPORT:
        return [f"flows: {len(report.flows)} flows in one report (at most {MAX_FLOWS_PER_REPORT})"]
    problems = []
    if bool(report.epoch) != bool(report.sequence):
        problems.append("epoch, sequence: both set (an acknowledged report) or both 0")
    for name in ("epoch", "sequence"):
        if getattr(report, name) > MAX_REPORT_NUMBER:
            problems.append(f"{name}: {getattr(report, name)} is above {MAX_REPORT_NUMBER}")
    for index, flow in enumerate(report.flows):
        where = f"flows[{index}]"
        for name in ("local_address", "peer_address"):
            try:
                ipaddress.ip_address(getattr(flow, name))
            except ValueError:
                problems.append(f"{where}.{name}: {getattr(flow, name)!r} is not an IP address")
        if flow.direction not in _DIRECTIONS:
            problems.append(f"{where}.direction: {flow.direction} is not inbound or outbound")
        if flow.verdict not in _VERDICTS:
            problems.append(f"{where}.verdict: {flow.verdict} is not a known verdict")
        if flow.protocol not in PROTOCOLS:
            problems.append(f"{where}.protocol: {flow.protocol!r} is not tcp, udp or icmp")
        if flow.port > 65535 or (flow.protocol in ("tcp", "udp") and flow.port == 0):
            problems.append(f"{where}.port: {flow.port} is not a port number")
        if not 0 < flow.count <= MAX_COUNT:
            problems.append(f"{where}.count: {flow.count} is not between 1 and {MAX_COUNT}")
        if not 0 < flow.first_seen_unix_ms <= flow.last_seen_unix_ms:
            problems.append(f"{where}: first_seen_unix_ms must be positive and <= last_seen")
        if len(flow.process.name) > PROCESS_NAME_MAX:
            problems.append(f"{where}.process.name: longer than {PROCESS_NAME_MAX} characters")
    return problems
