"""The resources operators apply (Policy, IPList) and the all-or-nothing batch parser.

    apiVersion: bulkhead/v1
    kind: Policy
    metadata: {name: api-to-cache}
    spec:
      rules:
        - from: {app: api}
          to: [{app: cache}, {cidr: 198.18.5.0/24}]
          ports: [tcp/6379, udp/53, tcp/8000-8100, icmp, any]

Validation errors name the field as written in the document (`spec.rules[0].from.cidr`)
and say what is wrong in operator terms.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
)
from pydantic_core import ErrorDetails

from controller.policy.addresses import Network, network_order, parse_network
from controller.policy.errors import FieldError, FieldProblem, ValidationFailed
from controller.policy.names import describe_value, not_a_string, parse_labels, parse_name
from controller.policy.peers import Peer, parse_peer
from controller.policy.ports import PortSpec, parse_port

__all__ = [
    "API_VERSION",
    "FieldError",
    "IPList",
    "IPListSpec",
    "Metadata",
    "Policy",
    "PolicySpec",
    "Resource",
    "Rule",
    "ValidationFailed",
    "parse_documents",
    "resource_to_json",
]

API_VERSION = "bulkhead/v1"
# Mappings and lists inside one another. A resource needs six (spec.rules[].from[].app);
# Python's json and pydantic recurse per level, so a deeper document is refused unread.
MAX_DOCUMENT_DEPTH = 32

_T = TypeVar("_T")


def _non_empty(what: str) -> Callable[[tuple[_T, ...]], tuple[_T, ...]]:
    def check(items: tuple[_T, ...]) -> tuple[_T, ...]:
        if not items:
            raise FieldProblem(f"must list at least one {what}")
        return items

    return check


def _one_or_many(value: object) -> object:
    # `from: {app: web}` is shorthand for a list of one peer.
    if isinstance(value, Mapping):
        return [value]
    if not isinstance(value, list | tuple):
        raise FieldProblem(f"expected a peer or a list of peers, got {describe_value(value)}")
    return value


def _sorted_networks(networks: tuple[Network, ...]) -> tuple[Network, ...]:
    return tuple(sorted(set(networks), key=network_order))


Name = Annotated[str, PlainValidator(parse_name)]
Labels = Annotated[Mapping[str, str], PlainValidator(parse_labels), PlainSerializer(dict)]
PeerField = Annotated[Peer, PlainValidator(parse_peer), PlainSerializer(lambda p: p.to_json())]
Peers = Annotated[
    tuple[PeerField, ...], BeforeValidator(_one_or_many), AfterValidator(_non_empty("peer"))
]
PortField = Annotated[PortSpec, PlainValidator(parse_port), PlainSerializer(str)]
NetworkField = Annotated[Network, PlainValidator(parse_network), PlainSerializer(str)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metadata(_Model):
    name: Name
    labels: Labels = Field(default_factory=dict)


class Rule(_Model):
    """Traffic allowed from any `from` peer to any `to` peer on any of `ports`."""

    from_: Peers = Field(alias="from")
    to: Peers
    ports: Annotated[tuple[PortField, ...], AfterValidator(_non_empty("port"))]


class PolicySpec(_Model):
    rules: Annotated[tuple[Rule, ...], AfterValidator(_non_empty("rule"))]


class Policy(_Model):
    api_version: Literal["bulkhead/v1"] = Field(alias="apiVersion")
    kind: Literal["Policy"]
    metadata: Metadata
    spec: PolicySpec


class IPListSpec(_Model):
    # Stored sorted and deduplicated: the order of a set of networks carries no meaning.
    cidrs: Annotated[tuple[NetworkField, ...], AfterValidator(_sorted_networks)]


class IPList(_Model):
    """Named networks without an agent, matched by name or by their labels."""

    api_version: Literal["bulkhead/v1"] = Field(alias="apiVersion")
    kind: Literal["IPList"]
    metadata: Metadata
    spec: IPListSpec


Resource = Policy | IPList
_KINDS: dict[str, type[Policy] | type[IPList]] = {"Policy": Policy, "IPList": IPList}


def resource_to_json(resource: Resource) -> str:
    """Canonical JSON of a resource: the document's field names, sorted keys, no spaces."""
    data = resource.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def parse_documents(documents: Sequence[str]) -> list[Resource]:
    """Validate a batch of JSON documents, one resource each, all or nothing.

    Raises ValidationFailed listing every problem of every document (numbered from 1),
    including a (kind, name) defined twice in the batch.
    """
    resources: list[Resource] = []
    errors: list[FieldError] = []
    first_seen: dict[tuple[str, str], int] = {}
    for number, text in enumerate(documents, start=1):
        parsed = _parse_document(number, text)
        if isinstance(parsed, list):
            errors.extend(parsed)
            continue
        name = parsed.metadata.name
        earlier = first_seen.setdefault((parsed.kind, name), number)
        if earlier != number:
            message = f"{parsed.kind} {name!r} is already defined in document {earlier}"
            errors.append(FieldError(number, parsed.kind, name, "metadata.name", message))
        resources.append(parsed)
    if errors:
        raise ValidationFailed(errors)
    return resources


def _parse_document(number: int, text: str) -> Resource | list[FieldError]:
    offset = _too_deep_at(text)
    if offset is not None:
        line = text.count("\n", 0, offset) + 1
        column = offset - text.rfind("\n", 0, offset)
        where = f"line {line} column {column}"
        message = f"nested deeper than {MAX_DOCUMENT_DEPTH} levels of mappings and lists at {where}"
        return [FieldError(number, "", "", "", message)]
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        return [FieldError(number, "", "", "", f"not valid JSON: {error.msg} at {where}")]
    if not isinstance(raw, dict):
        message = f"expected one resource as a mapping, got {describe_value(raw)}"
        return [FieldError(number, "", "", "", message)]
    kind = raw.get("kind")
    model = _KINDS.get(kind) if isinstance(kind, str) else None
    metadata = raw.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    name = name if isinstance(name, str) else ""
    if model is None:
        expected = " or ".join(_KINDS)
        if kind is None:
            message = f"required field is missing; expected {expected}"
        else:
            message = f"{describe_value(kind)}: unknown kind; expected {expected}"
        return [FieldError(number, "", name, "kind", message)]
    try:
        return model.model_validate(raw)
    except ValidationError as failure:
        return [
            FieldError(number, model.__name__, name, *_describe(raw, error))
            for error in failure.errors(include_url=False)
        ]


# A JSON string (escapes included; an unterminated one runs to the end), or one bracket
# that opens or closes a level. Possessive, so nothing is tried twice: linear in the text
# (a backtracking form took 17.8 s on 80 kB of '\\"').
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]++|\\.)*+"?|[\[\]{}]')


def _too_deep_at(text: str) -> int | None:
    """The offset where `text` opens a level past MAX_DOCUMENT_DEPTH, or None.

    Counts brackets outside strings without parsing, so the check costs no recursion.
    Malformed JSON is left to the parser to describe.
    """
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        bracket = match.group()
        if bracket in "[{":
            depth += 1
            if depth > MAX_DOCUMENT_DEPTH:
                return match.start()
        elif bracket in "]}":
            depth -= 1
    return None


def _describe(raw: object, error: ErrorDetails) -> tuple[str, str]:
    """(path as written in the document, operator-facing message) for one pydantic error."""
    loc: list[str | int] = list(error["loc"])
    value = error["input"]
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    if kind == "value_error" and isinstance(ctx.get("error"), FieldProblem):
        problem: FieldProblem = ctx["error"]
        if problem.key is not None:
            loc.append(problem.key)
        message = problem.message
    elif kind == "missing":
        message = "required field is missing"
    elif kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "literal_error":
        message = f"{describe_value(value)}: must be {ctx['expected']}"
    elif kind == "string_type":
        message = not_a_string(value, "value")
    elif kind in ("list_type", "tuple_type"):
        message = f"expected a list, got {describe_value(value)}"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        message = f"expected a mapping, got {describe_value(value)}"
    else:
        message = error["msg"]
    return _path_as_written(raw, loc), message


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _path_as_written(raw: object, loc: Sequence[str | int]) -> str:
    # Walks the document alongside the error location, so a single peer written without
    # a list (`from: {app: web}`) is reported as `from.app`, not `from[0].app`.
    path = ""
    node: object = raw
    for step in loc:
        if isinstance(step, int):
            if isinstance(node, Mapping):
                continue
            path += f"[{step}]"
            node = node[step] if isinstance(node, list) and step < len(node) else None
            continue
        if _PLAIN_KEY.fullmatch(step):
            path += f".{step}" if path else step
        else:
            path += f"[{json.dumps(step)}]"
        node = node.get(step) if isinstance(node, Mapping) else None
    return path
