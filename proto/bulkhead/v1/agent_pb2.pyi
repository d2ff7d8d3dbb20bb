from bulkhead.v1 import ruleset_pb2 as _ruleset_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_VISIBILITY: _ClassVar[Mode]
    MODE_ENFORCE: _ClassVar[Mode]

class FlowDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOW_DIRECTION_UNSPECIFIED: _ClassVar[FlowDirection]
    FLOW_DIRECTION_INBOUND: _ClassVar[FlowDirection]
    FLOW_DIRECTION_OUTBOUND: _ClassVar[FlowDirection]
    FLOW_DIRECTION_LISTEN: _ClassVar[FlowDirection]

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_ALLOWED: _ClassVar[Verdict]
    VERDICT_DENIED: _ClassVar[Verdict]
    VERDICT_WOULD_DENY: _ClassVar[Verdict]
MODE_UNSPECIFIED: Mode
MODE_VISIBILITY: Mode
MODE_ENFORCE: Mode
FLOW_DIRECTION_UNSPECIFIED: FlowDirection
FLOW_DIRECTION_INBOUND: FlowDirection
FLOW_DIRECTION_OUTBOUND: FlowDirection
FLOW_DIRECTION_LISTEN: FlowDirection
VERDICT_UNSPECIFIED: Verdict
VERDICT_ALLOWED: Verdict
VERDICT_DENIED: Verdict
VERDICT_WOULD_DENY: Verdict

class GetCARequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCAResponse(_message.Message):
    __slots__ = ("ca_pem",)
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    ca_pem: str
    def __init__(self, ca_pem: _Optional[str] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("token", "agent_id", "csr_pem", "hostname")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    token: str
    agent_id: str
    csr_pem: str
    hostname: str
    def __init__(self, token: _Optional[str] = ..., agent_id: _Optional[str] = ..., csr_pem: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_pem", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: str
    ca_pem: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, certificate_pem: _Optional[str] = ..., ca_pem: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TamperEvent(_message.Message):
    __slots__ = ("detected_unix_ms", "description", "repaired", "repair_seconds")
    DETECTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REPAIRED_FIELD_NUMBER: _ClassVar[int]
    REPAIR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    detected_unix_ms: int
    description: str
    repaired: bool
    repair_seconds: float
    def __init__(self, detected_unix_ms: _Optional[int] = ..., description: _Optional[str] = ..., repaired: _Optional[bool] = ..., repair_seconds: _Optional[float] = ...) -> None: ...

class ConfigChange(_message.Message):
    __slots__ = ("labels", "mode")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    mode: Mode
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ..., mode: _Optional[_Union[Mode, str]] = ...) -> None: ...

class RenewCertificate(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    def __init__(self, csr_pem: _Optional[str] = ...) -> None: ...

class CertificateIssued(_message.Message):
    __slots__ = ("certificate_pem",)
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: str
    def __init__(self, certificate_pem: _Optional[str] = ...) -> None: ...

class Baseline(_message.Message):
    __slots__ = ("failsafe_inbound", "failsafe_outbound", "controller", "dataplane")
    FAILSAFE_INBOUND_FIELD_NUMBER: _ClassVar[int]
    FAILSAFE_OUTBOUND_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    DATAPLANE_FIELD_NUMBER: _ClassVar[int]
    failsafe_inbound: _containers.RepeatedScalarFieldContainer[str]
    failsafe_outbound: _containers.RepeatedScalarFieldContainer[str]
    controller: str
    dataplane: str
    def __init__(self, failsafe_inbound: _Optional[_Iterable[str]] = ..., failsafe_outbound: _Optional[_Iterable[str]] = ..., controller: _Optional[str] = ..., dataplane: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("agent_id", "hostname", "labels", "addresses", "applied_revision", "applied_hash", "mode", "baseline", "agent_version")
    class LabelsEntry(_message.Message):
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
    APPLIED_REVISION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_HASH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    hostname: str
    labels: _containers.ScalarMap[str, str]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    applied_revision: int
    applied_hash: str
    mode: Mode
    baseline: Baseline
    agent_version: str
    def __init__(self, agent_id: _Optional[str] = ..., hostname: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., addresses: _Optional[_Iterable[str]] = ..., applied_revision: _Optional[int] = ..., applied_hash: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., baseline: _Optional[_Union[Baseline, _Mapping]] = ..., agent_version: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_unix_ms",)
    SENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    sent_unix_ms: int
    def __init__(self, sent_unix_ms: _Optional[int] = ...) -> None: ...

class AddressUpdate(_message.Message):
    __slots__ = ("addresses",)
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("revision", "hash", "ok", "error", "need_snapshot")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NEED_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    revision: int
    hash: str
    ok: bool
    error: str
    need_snapshot: bool
    def __init__(self, revision: _Optional[int] = ..., hash: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., need_snapshot: _Optional[bool] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "addresses", "ack", "renew", "tamper", "config", "flows", "connections")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    RENEW_FIELD_NUMBER: _ClassVar[int]
    TAMPER_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    FLOWS_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    addresses: AddressUpdate
    ack: Ack
    renew: RenewCertificate
    tamper: TamperEvent
    config: ConfigChange
    flows: FlowReport
    connections: ConnectionTable
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., addresses: _Optional[_Union[AddressUpdate, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., renew: _Optional[_Union[RenewCertificate, _Mapping]] = ..., tamper: _Optional[_Union[TamperEvent, _Mapping]] = ..., config: _Optional[_Union[ConfigChange, _Mapping]] = ..., flows: _Optional[_Union[FlowReport, _Mapping]] = ..., connections: _Optional[_Union[ConnectionTable, _Mapping]] = ...) -> None: ...

class PolicySnapshot(_message.Message):
    __slots__ = ("revision", "hash", "ruleset")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    RULESET_FIELD_NUMBER: _ClassVar[int]
    revision: int
    hash: str
    ruleset: _ruleset_pb2.Ruleset
    def __init__(self, revision: _Optional[int] = ..., hash: _Optional[str] = ..., ruleset: _Optional[_Union[_ruleset_pb2.Ruleset, _Mapping]] = ...) -> None: ...

class InSync(_message.Message):
    __slots__ = ("revision", "hash")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    revision: int
    hash: str
    def __init__(self, revision: _Optional[int] = ..., hash: _Optional[str] = ...) -> None: ...

class SetChange(_message.Message):
    __slots__ = ("name", "add_hosts", "remove_hosts", "add_networks", "remove_networks")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADD_HOSTS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_HOSTS_FIELD_NUMBER: _ClassVar[int]
    ADD_NETWORKS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_NETWORKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    add_hosts: _containers.RepeatedScalarFieldContainer[str]
    remove_hosts: _containers.RepeatedScalarFieldContainer[str]
    add_networks: _containers.RepeatedScalarFieldContainer[str]
    remove_networks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., add_hosts: _Optional[_Iterable[str]] = ..., remove_hosts: _Optional[_Iterable[str]] = ..., add_networks: _Optional[_Iterable[str]] = ..., remove_networks: _Optional[_Iterable[str]] = ...) -> None: ...

class PolicyDelta(_message.Message):
    __slots__ = ("base_revision", "base_hash", "revision", "hash", "sets")
    BASE_REVISION_FIELD_NUMBER: _ClassVar[int]
    BASE_HASH_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    SETS_FIELD_NUMBER: _ClassVar[int]
    base_revision: int
    base_hash: str
    revision: int
    hash: str
    sets: _containers.RepeatedCompositeFieldContainer[SetChange]
    def __init__(self, base_revision: _Optional[int] = ..., base_hash: _Optional[str] = ..., revision: _Optional[int] = ..., hash: _Optional[str] = ..., sets: _Optional[_Iterable[_Union[SetChange, _Mapping]]] = ...) -> None: ...

class ControllerMessage(_message.Message):
    __slots__ = ("snapshot", "in_sync", "certificate", "connections_request", "delta", "flows_stored", "addresses_refused")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_REQUEST_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FLOWS_STORED_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    snapshot: PolicySnapshot
    in_sync: InSync
    certificate: CertificateIssued
    connections_request: ConnectionsRequest
    delta: PolicyDelta
    flows_stored: FlowsStored
    addresses_refused: AddressesRefused
    def __init__(self, snapshot: _Optional[_Union[PolicySnapshot, _Mapping]] = ..., in_sync: _Optional[_Union[InSync, _Mapping]] = ..., certificate: _Optional[_Union[CertificateIssued, _Mapping]] = ..., connections_request: _Optional[_Union[ConnectionsRequest, _Mapping]] = ..., delta: _Optional[_Union[PolicyDelta, _Mapping]] = ..., flows_stored: _Optional[_Union[FlowsStored, _Mapping]] = ..., addresses_refused: _Optional[_Union[AddressesRefused, _Mapping]] = ...) -> None: ...

class RefusedAddress(_message.Message):
    __slots__ = ("address", "reason")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    address: str
    reason: str
    def __init__(self, address: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AddressesRefused(_message.Message):
    __slots__ = ("refused",)
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    refused: _containers.RepeatedCompositeFieldContainer[RefusedAddress]
    def __init__(self, refused: _Optional[_Iterable[_Union[RefusedAddress, _Mapping]]] = ...) -> None: ...

class Process(_message.Message):
    __slots__ = ("pid", "name", "exe", "cmdline", "user", "start_unix_ms", "systemd_unit")
    PID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXE_FIELD_NUMBER: _ClassVar[int]
    CMDLINE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SYSTEMD_UNIT_FIELD_NUMBER: _ClassVar[int]
    pid: int
    name: str
    exe: str
    cmdline: _containers.RepeatedScalarFieldContainer[str]
    user: str
    start_unix_ms: int
    systemd_unit: str
    def __init__(self, pid: _Optional[int] = ..., name: _Optional[str] = ..., exe: _Optional[str] = ..., cmdline: _Optional[_Iterable[str]] = ..., user: _Optional[str] = ..., start_unix_ms: _Optional[int] = ..., systemd_unit: _Optional[str] = ...) -> None: ...

class Flow(_message.Message):
    __slots__ = ("direction", "local_address", "peer_address", "port", "protocol", "process", "verdict", "count", "first_seen_unix_ms", "last_seen_unix_ms")
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    direction: FlowDirection
    local_address: str
    peer_address: str
    port: int
    protocol: str
    process: Process
    verdict: Verdict
    count: int
    first_seen_unix_ms: int
    last_seen_unix_ms: int
    def __init__(self, direction: _Optional[_Union[FlowDirection, str]] = ..., local_address: _Optional[str] = ..., peer_address: _Optional[str] = ..., port: _Optional[int] = ..., protocol: _Optional[str] = ..., process: _Optional[_Union[Process, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., count: _Optional[int] = ..., first_seen_unix_ms: _Optional[int] = ..., last_seen_unix_ms: _Optional[int] = ...) -> None: ...

class FlowReport(_message.Message):
    __slots__ = ("flows", "dropped", "epoch", "sequence")
    FLOWS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    flows: _containers.RepeatedCompositeFieldContainer[Flow]
    dropped: int
    epoch: int
    sequence: int
    def __init__(self, flows: _Optional[_Iterable[_Union[Flow, _Mapping]]] = ..., dropped: _Optional[int] = ..., epoch: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class FlowsStored(_message.Message):
    __slots__ = ("epoch", "sequence", "error")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    sequence: int
    error: str
    def __init__(self, epoch: _Optional[int] = ..., sequence: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class Connection(_message.Message):
    __slots__ = ("protocol", "state", "local_address", "local_port", "peer_address", "peer_port", "direction", "process")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PORT_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PEER_PORT_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    protocol: str
    state: str
    local_address: str
    local_port: int
    peer_address: str
    peer_port: int
    direction: FlowDirection
    process: Process
    def __init__(self, protocol: _Optional[str] = ..., state: _Optional[str] = ..., local_address: _Optional[str] = ..., local_port: _Optional[int] = ..., peer_address: _Optional[str] = ..., peer_port: _Optional[int] = ..., direction: _Optional[_Union[FlowDirection, str]] = ..., process: _Optional[_Union[Process, _Mapping]] = ...) -> None: ...

class ConnectionsRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ConnectionTable(_message.Message):
    __slots__ = ("request_id", "connections", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    connections: _containers.RepeatedCompositeFieldContainer[Connection]
    error: str
    def __init__(self, request_id: _Optional[str] = ..., connections: _Optional[_Iterable[_Union[Connection, _Mapping]]] = ..., error: _Optional[str] = ...) -> None: ...
