"""Observation records as the contract's messages (bulkhead.v1 agent.proto)."""

from __future__ import annotations

from agent.observe.flows import FlowRecord
from agent.observe.model import Connection, Direction, ProcessInfo, Verdict
from bulkhead.v1 import agent_pb2

FLOW_BATCH = 500  # flows per FlowReport; the controller takes at most 1000
_DIRECTIONS = {
    Direction.INBOUND: agent_pb2.FLOW_DIRECTION_INBOUND,
    Direction.OUTBOUND: agent_pb2.FLOW_DIRECTION_OUTBOUND,
    Direction.LISTEN: agent_pb2.FLOW_DIRECTION_LISTEN,
}
_VERDICTS = {
    Verdict.ALLOWED: agent_pb2.VERDICT_ALLOWED,
    Verdict.DENIED: agent_pb2.VERDICT_DENIED,
    Verdict.WOULD_DENY: agent_pb2.VERDICT_WOULD_DENY,
}


def process_message(process: ProcessInfo) -> agent_pb2.Process:
    return agent_pb2.Process(
        pid=process.pid,
        name=process.name,
        exe=process.exe,
        cmdline=list(process.cmdline),
        user=process.user,
        start_unix_ms=int(process.start_time * 1000),
        systemd_unit=process.unit,
    )


def flow_message(record: FlowRecord) -> agent_pb2.Flow:
    flow = agent_pb2.Flow(
        direction=_DIRECTIONS[record.direction],
        local_address=record.local_ip,
        peer_address=record.peer_ip,
        port=record.port,
        protocol=record.protocol,
        verdict=_VERDICTS[record.verdict],
        count=record.count,
        first_seen_unix_ms=int(record.first_seen * 1000),
        last_seen_unix_ms=int(record.last_seen * 1000),
    )
    if record.process is not None:
        flow.process.CopyFrom(process_message(record.process))
    return flow


def connection_message(connection: Connection) -> agent_pb2.Connection:
    message = agent_pb2.Connection(
        protocol=connection.protocol,
        state=connection.state,
        local_address=connection.local_ip,
        local_port=connection.local_port,
        peer_address=connection.peer_ip,
        peer_port=connection.peer_port,
        direction=_DIRECTIONS[connection.direction],
    )
    if connection.process is not None:
        message.process.CopyFrom(process_message(connection.process))
    return message
