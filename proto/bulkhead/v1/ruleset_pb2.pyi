from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    DIRECTION_INGRESS: _ClassVar[Direction]
    DIRECTION_EGRESS: _ClassVar[Direction]

class Protocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_UNSPECIFIED: _ClassVar[Protocol]
    PROTOCOL_ANY: _ClassVar[Protocol]
    PROTOCOL_TCP: _ClassVar[Protocol]
    PROTOCOL_UDP: _ClassVar[Protocol]
    PROTOCOL_ICMP: _ClassVar[Protocol]

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_ALLOW: _ClassVar[Action]
    ACTION_DENY: _ClassVar[Action]
DIRECTION_UNSPECIFIED: Direction
DIRECTION_INGRESS: Direction
DIRECTION_EGRESS: Direction
PROTOCOL_UNSPECIFIED: Protocol
PROTOCOL_ANY: Protocol
PROTOCOL_TCP: Protocol
PROTOCOL_UDP: Protocol
PROTOCOL_ICMP: Protocol
ACTION_UNSPECIFIED: Action
ACTION_ALLOW: Action
ACTION_DENY: Action

class PortRange(_message.Message):
    __slots__ = ("first", "last")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    first: int
    last: int
    def __init__(self, first: _Optional[int] = ..., last: _Optional[int] = ...) -> None: ...

class AddressSet(_message.Message):
    __slots__ = ("name", "hosts", "networks")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    NETWORKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    hosts: _containers.RepeatedScalarFieldContainer[str]
    networks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., hosts: _Optional[_Iterable[str]] = ..., networks: _Optional[_Iterable[str]] = ...) -> None: ...

class Rule(_message.Message):
    __slots__ = ("direction", "protocol", "ports", "peer_set", "action", "policy", "id")
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    PEER_SET_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    direction: Direction
    protocol: Protocol
    ports: _containers.RepeatedCompositeFieldContainer[PortRange]
    peer_set: str
    action: Action
    policy: str
    id: str
    def __init__(self, direction: _Optional[_Union[Direction, str]] = ..., protocol: _Optional[_Union[Protocol, str]] = ..., ports: _Optional[_Iterable[_Union[PortRange, _Mapping]]] = ..., peer_set: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., policy: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class Ruleset(_message.Message):
    __slots__ = ("sets", "rules")
    SETS_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    sets: _containers.RepeatedCompositeFieldContainer[AddressSet]
    rules: _containers.RepeatedCompositeFieldContainer[Rule]
    def __init__(self, sets: _Optional[_Iterable[_Union[AddressSet, _Mapping]]] = ..., rules: _Optional[_Iterable[_Union[Rule, _Mapping]]] = ...) -> None: ...
