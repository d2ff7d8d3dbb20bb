"""Loading resource documents from multi-document YAML for `bulkhead apply`.

Everything here is checked locally so that a typo is reported with its file and line
without contacting the controller; the controller still validates the content.
"""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.nodes import MappingNode

from controller.cli.errors import BadInputError

STDIN_NAME = "-"


@dataclass(frozen=True)
class Source:
    """One input's name (a path, or "-" for stdin) and its text."""

    name: str
    text: str


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last one.

    A repeated `from:` or `ports:` in a rule would otherwise silently change a policy.
    """

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
    """Read each named file ("-" is stdin, allowed once)."""
    if list(names).count(STDIN_NAME) > 1:
        raise BadInputError("-f - (stdin) can be given only once")
    sources = []
    for name in names:
        try:
            if name == STDIN_NAME:
                raw = sys.stdin.buffer.read()
            else:
                with open(name, "rb") as handle:
                    raw = handle.read()
            text = raw.decode("utf-8")
        except OSError as exc:
            raise BadInputError(f"cannot read {name}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            display = _display_name(Source(name, ""))
            problem = f"byte {exc.start + 1}: {exc.reason}"
            raise BadInputError(f"cannot read {display}: not UTF-8 text ({problem})") from exc
        sources.append(Source(name=name, text=text))
    return sources


def load_documents(sources: Sequence[Source]) -> list[str]:
    """Parse every source as multi-document YAML and return each document as JSON text.

    Empty documents are skipped. Raises BadInputError naming the file, line and column
    of a syntax error, or the number of a document that is not a mapping.
    """
    documents: list[str] = []
    for source in sources:
        documents.extend(_load_source(source))
    if not documents:
        names = ", ".join(_display_name(source) for source in sources)
        raise BadInputError(f"no documents to apply in {names}")
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
