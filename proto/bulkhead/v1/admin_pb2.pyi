from bulkhead.v1 import agent_pb2 as _agent_pb2
from bulkhead.v1 import ruleset_pb2 as _ruleset_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApplyRequest(_message.Message):
    __slots__ = ("documents", "dry_run")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedScalarFieldContainer[str]
    dry_run: bool
    def __init__(self, documents: _Optional[_Iterable[str]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ResourceChange(_message.Message):
    __slots__ = ("kind", "name", "action")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    action: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., action: _Optional[str] = ...) -> None: ...

class ApplyResponse(_message.Message):
    __slots__ = ("changes", "revision")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[ResourceChange]
    revision: int
    def __init__(self, changes: _Optional[_Iterable[_Union[ResourceChange, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentSummary(_message.Message):
    __slots__ = ("agent_id", "hostname", "labels", "addresses", "mode", "connected", "applied_revision", "applied_hash", "desired_revision", "desired_hash", "last_seen_unix_ms", "revoked", "certificate_not_after_unix_ms", "offline", "stuck", "reported_labels", "refused_addresses", "allowed_ranges")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ReportedLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    APPLIED_REVISION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_HASH_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REVISION_FIELD_NUMBER: _ClassVar[int]
    DESIRED_HASH_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_NOT_AFTER_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_FIELD_NUMBER: _ClassVar[int]
    STUCK_FIELD_NUMBER: _ClassVar[int]
    REPORTED_LABELS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_RANGES_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    hostname: str
    labels: _containers.ScalarMap[str, str]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    mode: _agent_pb2.Mode
    connected: bool
    applied_revision: int
    applied_hash: str
    desired_revision: int
    desired_hash: str
    last_seen_unix_ms: int
    revoked: bool
    certificate_not_after_unix_ms: int
    offline: bool
    stuck: bool
    reported_labels: _containers.ScalarMap[str, str]
    refused_addresses: _containers.RepeatedCompositeFieldContainer[_agent_pb2.RefusedAddress]
    allowed_ranges: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_id: _Optional[str] = ..., hostname: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., addresses: _Optional[_Iterable[str]] = ..., mode: _Optional[_Union[_agent_pb2.Mode, str]] = ..., connected: _Optional[bool] = ..., applied_revision: _Optional[int] = ..., applied_hash: _Optional[str] = ..., desired_revision: _Optional[int] = ..., desired_hash: _Optional[str] = ..., last_seen_unix_ms: _Optional[int] = ..., revoked: _Optional[bool] = ..., certificate_not_after_unix_ms: _Optional[int] = ..., offline: _Optional[bool] = ..., stuck: _Optional[bool] = ..., reported_labels: _Optional[_Mapping[str, str]] = ..., refused_addresses: _Optional[_Iterable[_Union[_agent_pb2.RefusedAddress, _Mapping]]] = ..., allowed_ranges: _Optional[_Iterable[str]] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentSummary]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentSummary, _Mapping]]] = ...) -> None: ...

class DescribeAgentRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class AgentDetail(_message.Message):
    __slots__ = ("summary", "ruleset", "baseline", "last_error")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    RULESET_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    summary: AgentSummary
    ruleset: _ruleset_pb2.Ruleset
    baseline: _agent_pb2.Baseline
    last_error: str
    def __init__(self, summary: _Optional[_Union[AgentSummary, _Mapping]] = ..., ruleset: _Optional[_Union[_ruleset_pb2.Ruleset, _Mapping]] = ..., baseline: _Optional[_Union[_agent_pb2.Baseline, _Mapping]] = ..., last_error: _Optional[str] = ...) -> None: ...

class ListResourcesRequest(_message.Message):
    __slots__ = ("kind",)
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: str
    def __init__(self, kind: _Optional[str] = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ("kind", "name", "document", "revision")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    document: str
    revision: int
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., document: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class ListResourcesResponse(_message.Message):
    __slots__ = ("resources",)
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    resources: _containers.RepeatedCompositeFieldContainer[Resource]
    def __init__(self, resources: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ...) -> None: ...

class DeleteResourceRequest(_message.Message):
    __slots__ = ("kind", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteResourceResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class LabelAgentRequest(_message.Message):
    __slots__ = ("agent_id", "set", "remove", "accept_reported", "expected_reported")
    class SetEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ExpectedReportedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SET_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_REPORTED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REPORTED_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    set: _containers.ScalarMap[str, str]
    remove: _containers.RepeatedScalarFieldContainer[str]
    accept_reported: bool
    expected_reported: _containers.ScalarMap[str, str]
    def __init__(self, agent_id: _Optional[str] = ..., set: _Optional[_Mapping[str, str]] = ..., remove: _Optional[_Iterable[str]] = ..., accept_reported: _Optional[bool] = ..., expected_reported: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LabelAgentResponse(_message.Message):
    __slots__ = ("labels",)
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("labels", "ttl_seconds", "uses", "addresses")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    USES_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    ttl_seconds: int
    uses: int
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ..., ttl_seconds: _Optional[int] = ..., uses: _Optional[int] = ..., addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("token", "info")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    token: str
    info: TokenInfo
    def __init__(self, token: _Optional[str] = ..., info: _Optional[_Union[TokenInfo, _Mapping]] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("token_id", "labels", "uses", "used", "expires_unix_ms", "revoked", "created_by", "created_unix_ms", "addresses")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    USES_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    labels: _containers.ScalarMap[str, str]
    uses: int
    used: int
    expires_unix_ms: int
    revoked: bool
    created_by: str
    created_unix_ms: int
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, token_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., uses: _Optional[int] = ..., used: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ..., revoked: _Optional[bool] = ..., created_by: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("token_id",)
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    def __init__(self, token_id: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RevokeAgentRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class RevokeAgentResponse(_message.Message):
    __slots__ = ("certificates",)
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    certificates: int
    def __init__(self, certificates: _Optional[int] = ...) -> None: ...

class SetAgentAddressesRequest(_message.Message):
    __slots__ = ("agent_id", "allowed_ranges")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_RANGES_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    allowed_ranges: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_id: _Optional[str] = ..., allowed_ranges: _Optional[_Iterable[str]] = ...) -> None: ...

class SetAgentAddressesResponse(_message.Message):
    __slots__ = ("allowed_ranges", "addresses", "refused_addresses")
    ALLOWED_RANGES_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    allowed_ranges: _containers.RepeatedScalarFieldContainer[str]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    refused_addresses: _containers.RepeatedCompositeFieldContainer[_agent_pb2.RefusedAddress]
    def __init__(self, allowed_ranges: _Optional[_Iterable[str]] = ..., addresses: _Optional[_Iterable[str]] = ..., refused_addresses: _Optional[_Iterable[_Union[_agent_pb2.RefusedAddress, _Mapping]]] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("since_unix_ms", "limit", "include_agents")
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_AGENTS_FIELD_NUMBER: _ClassVar[int]
    since_unix_ms: int
    limit: int
    include_agents: bool
    def __init__(self, since_unix_ms: _Optional[int] = ..., limit: _Optional[int] = ..., include_agents: _Optional[bool] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("at_unix_ms", "actor", "action", "target", "detail", "repeated_count")
    AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    REPEATED_COUNT_FIELD_NUMBER: _ClassVar[int]
    at_unix_ms: int
    actor: str
    action: str
    target: str
    detail: str
    repeated_count: int
    def __init__(self, at_unix_ms: _Optional[int] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., detail: _Optional[str] = ..., repeated_count: _Optional[int] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class ListFlowsRequest(_message.Message):
    __slots__ = ("workload", "labels", "verdicts", "since_unix_ms", "limit")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    workload: str
    labels: _containers.ScalarMap[str, str]
    verdicts: _containers.RepeatedScalarFieldContainer[_agent_pb2.Verdict]
    since_unix_ms: int
    limit: int
    def __init__(self, workload: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., verdicts: _Optional[_Iterable[_Union[_agent_pb2.Verdict, str]]] = ..., since_unix_ms: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class FlowEndpoint(_message.Message):
    __slots__ = ("workload", "address", "labels", "process", "pid")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    workload: str
    address: str
    labels: _containers.ScalarMap[str, str]
    process: str
    pid: int
    def __init__(self, workload: _Optional[str] = ..., address: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., process: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class FlowEntry(_message.Message):
    __slots__ = ("source", "destination", "port", "protocol", "verdict", "count", "first_seen_unix_ms", "last_seen_unix_ms")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    source: FlowEndpoint
    destination: FlowEndpoint
    port: int
    protocol: str
    verdict: _agent_pb2.Verdict
    count: int
    first_seen_unix_ms: int
    last_seen_unix_ms: int
    def __init__(self, source: _Optional[_Union[FlowEndpoint, _Mapping]] = ..., destination: _Optional[_Union[FlowEndpoint, _Mapping]] = ..., port: _Optional[int] = ..., protocol: _Optional[str] = ..., verdict: _Optional[_Union[_agent_pb2.Verdict, str]] = ..., count: _Optional[int] = ..., first_seen_unix_ms: _Optional[int] = ..., last_seen_unix_ms: _Optional[int] = ...) -> None: ...

class ListFlowsResponse(_message.Message):
    __slots__ = ("flows", "truncated")
    FLOWS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    flows: _containers.RepeatedCompositeFieldContainer[FlowEntry]
    truncated: bool
    def __init__(self, flows: _Optional[_Iterable[_Union[FlowEntry, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class GetConnectionsRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...
