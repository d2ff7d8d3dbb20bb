"""Loading resource documents from multi-document YAML for `bulkhead apply`.

Everything here is checked locally so that a typo is reported with its file and line
without contacting the controller; the controller still validates the content.

Input is bounded before it can cost memory or stack: files of at most MAX_FILE_BYTES,
mappings and lists nested at most MAX_YAML_DEPTH deep, and no aliases (`*name`): an
alias repeats a whole value, so a few lines of them ("billion laughs") expand to
gigabytes of JSON. A resource needs none of them.
"""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionStartEvent
from yaml.nodes import MappingNode, Node

from bulkhead.channel import MAX_REQUEST_BYTES
from controller.cli.errors import BadInputError

STDIN_NAME = "-"
_MIB = 1024 * 1024
# Far above any file of resources (one apply carries MAX_REQUEST_BYTES of JSON at most).
MAX_FILE_BYTES = 16 * _MIB
# A resource nests six deep; the controller refuses documents deeper than 32 anyway.
# Composing YAML and writing JSON both recurse per level.
MAX_YAML_DEPTH = 32
# What a document costs in the request besides its text: a protobuf tag and length.
_FRAMING_BYTES = 8


@dataclass(frozen=True)
class Source:
    """One input's name (a path, or "-" for stdin) and its text."""

    name: str
    text: str


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases, nesting past MAX_YAML_DEPTH, and duplicate
    mapping keys (instead of keeping the last one).

    A repeated `from:` or `ports:` in a rule would otherwise silently change a policy.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.document_number = 0  # 1-based, counting empty documents too
        self._depth = 0  # mappings and lists open around the node being composed

    def compose_document(self) -> Node | None:
        self.document_number += 1
        self._depth = 0
        return super().compose_document()

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(AliasEvent):
            # Refused before the composer looks the anchor up: nothing is ever expanded.
            alias = self._next_event()
            problem = f"aliases (*{alias.anchor}) are not supported; write the value out"
            raise self._refusal(problem, alias)
        if not self.check_event(CollectionStartEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                problem = f"nested deeper than {MAX_YAML_DEPTH} mappings and lists"
                raise self._refusal(problem, self._next_event())
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def _next_event(self) -> Any:  # yaml.Event; untyped in PyYAML's stubs
        return self.peek_event()  # type: ignore[no-untyped-call]

    def _refusal(self, problem: str, event: Any) -> yaml.MarkedYAMLError:
        return yaml.MarkedYAMLError(
            problem=f"document {self.document_number}: {problem}", problem_mark=event.start_mark
        )

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base constructor reports it with its position
            if duplicate:
                mark = key_node.start_mark
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=mark)
        return super().construct_mapping(node, deep=deep)


def read_sources(names: Sequence[str]) -> list[Source]:
    """Read each named file ("-" is stdin, allowed once), of at most MAX_FILE_BYTES."""
    if list(names).count(STDIN_NAME) > 1:
        raise BadInputError("-f - (stdin) can be given only once")
    sources = []
    for name in names:
        display = _display_name(Source(name, ""))
        try:
            if name == STDIN_NAME:
                raw = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
            else:
                with open(name, "rb") as handle:
                    raw = handle.read(MAX_FILE_BYTES + 1)
            if len(raw) > MAX_FILE_BYTES:
                limit = MAX_FILE_BYTES // (1024 * 1024)
                raise BadInputError(f"cannot read {display}: larger than {limit} MiB")
            text = raw.decode("utf-8")
        except OSError as exc:
            raise BadInputError(f"cannot read {name}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            problem = f"byte {exc.start + 1}: {exc.reason}"
            raise BadInputError(f"cannot read {display}: not UTF-8 text ({problem})") from exc
        sources.append(Source(name=name, text=text))
    return sources


def load_documents(sources: Sequence[Source]) -> list[str]:
    """Parse every source as multi-document YAML and return each document as JSON text.

    Empty documents are skipped. Raises BadInputError naming the file, line and column
    of a syntax error, or the number of a document that is not a mapping; or when the
    documents are too many to send in one request.
    """
    documents: list[str] = []
    for source in sources:
        documents.extend(_load_source(source))
    names = ", ".join(_display_name(source) for source in sources)
    if not documents:
        raise BadInputError(f"no documents to apply in {names}")
    size = sum(len(document.encode()) + _FRAMING_BYTES for document in documents)
    if size > MAX_REQUEST_BYTES:
        raise BadInputError(
            f"{names}: {len(documents)} documents come to {size / _MIB:.1f} MiB; "
            f"one apply carries at most {MAX_REQUEST_BYTES // _MIB} MiB, apply them in parts"
        )
    return documents


def _load_source(source: Source) -> list[str]:
    display = _display_name(source)
    documents = []
    loader = None
    try:
        loader = _StrictLoader(source.text)
        number = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                break
            number += 1
            data = loader.construct_document(node)
            if data is None:
                continue
            line = node.start_mark.line + 1
            where = f"{display}:{line}: document {number}"
            if not isinstance(data, dict):
                kind = _yaml_type_name(data)
                raise BadInputError(f"{where}: expected a mapping (a resource), got {kind}")
            documents.append(_to_json(data, where))
    except yaml.MarkedYAMLError as exc:
        raise BadInputError(_describe_yaml_error(display, exc)) from exc
    except yaml.reader.ReaderError as exc:
        problem = f"{exc.reason} (character {exc.position + 1})"
        raise BadInputError(f"{display}: {problem}") from exc
    except yaml.YAMLError as exc:
        raise BadInputError(f"{display}: {' '.join(str(exc).split())}") from exc
    finally:
        if loader is not None:
            loader.dispose()
    return documents


def _display_name(source: Source) -> str:
    return "<stdin>" if source.name == STDIN_NAME else source.name


def _describe_yaml_error(display: str, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "invalid YAML"
    if exc.context and exc.problem:
        problem = f"{problem} ({exc.context})"
    if mark is None:
        return f"{display}: {problem}"
    return f"{display}:{mark.line + 1}:{mark.column + 1}: {problem}"


def _to_json(data: dict[Any, Any], where: str) -> str:
    def refuse(value: object) -> object:
        # YAML dates, timestamps and binary have no JSON form: the operator should quote them.
        raise BadInputError(
            f"{where}: value {value} is {_yaml_type_name(value)}; quote it to make it text"
        )

    try:
        return json.dumps(data, default=refuse, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"{where}: cannot be converted to JSON: {exc}") from exc


def _yaml_type_name(value: object) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", int: "a number"}
    names |= {float: "a number", bytes: "binary data", datetime.date: "a date"}
    names |= {datetime.datetime: "a timestamp"}
    return names.get(type(value), f"a {type(value).__name__}")
