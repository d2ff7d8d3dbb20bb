"""Output formats (table, json, yaml) and the small text renderings shared by the views.

Nothing a host sent reaches the terminal raw (see controller/cli/terminal.py): every
table cell and describe value goes through ``printable`` (by ``cell``, or by the tables'
own ``add_row``), and ``dump_data`` and ``dump_documents`` escape json and yaml text.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.style import Style
from rich.text import Text

from bulkhead.v1 import admin_pb2, agent_pb2, ruleset_pb2
from controller.cli.durations import span_text
from controller.cli.errors import ControllerError
from controller.cli.terminal import escape_in_json, has_active, printable

OutputFormat = Literal["table", "json", "yaml"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
# Lists longer than this are cut in tables (never in json/yaml).
TABLE_LIST_LIMIT = 4
# Piped table output is not wrapped at 80 columns, so each row stays on one line for grep.
_PIPE_WIDTH = 240


def make_console() -> Console:
    """A console on the current stdout (looked up now, so CliRunner's capture is used)."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = _PIPE_WIDTH
    return console


def message_to_data(message: Message) -> dict[str, Any]:
    """A protobuf message as plain data: proto field names, defaults shown, numbers as numbers."""
    return json_format.MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )


def dump_data(data: object, fmt: OutputFormat) -> str:
    """Serialise one value as JSON or YAML text (ending in a newline), safe to print."""
    if fmt == "json":
        return escape_in_json(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return _safe_yaml(
        lambda unicode: yaml.safe_dump(
            data, sort_keys=False, allow_unicode=unicode, default_flow_style=False
        )
    )


def dump_documents(documents: Sequence[Mapping[str, Any]], fmt: OutputFormat) -> str:
    """Resources as a JSON list, or as multi-document YAML that `bulkhead apply` accepts."""
    if fmt == "json":
        return dump_data(list(documents), fmt)
    if not documents:
        return ""
    return _safe_yaml(
        lambda unicode: yaml.safe_dump_all(
            [dict(document) for document in documents],
            sort_keys=False,
            allow_unicode=unicode,
            default_flow_style=False,
            explicit_start=True,
        )
    )


def _safe_yaml(dump: Callable[[bool], str]) -> str:
    """DUMP's text with unicode as it is, unless that would print an active character
    (yaml leaves C1 controls and bidirectional marks raw); then its ASCII-only text, where
    every character outside ASCII is an escape in a double-quoted string."""
    text = dump(True)
    return dump(False) if has_active(text) else text


def parse_stored_document(resource: admin_pb2.Resource) -> dict[str, Any]:
    """The stored JSON document of a resource as an object."""
    try:
        document = json.loads(resource.document)
    except ValueError as exc:
        raise ControllerError(
            f"the controller returned an unreadable document for {resource.kind}/{resource.name}"
        ) from exc
    if not isinstance(document, dict):
        raise ControllerError(
            f"the controller returned a document for {resource.kind}/{resource.name} "
            "that is not an object"
        )
    return document


def cell(value: object, style: str | Style = "") -> Text:
    """Plain, printable text for a table cell: data is never parsed as rich markup
    ("[::1]"), and no character of it acts on the terminal."""
    return Text(printable(value), style=style)


def enum_word(enum_name: str) -> str:
    """MODE_ENFORCE -> enforce, PROTOCOL_TCP -> tcp."""
    return enum_name.split("_", 1)[-1].lower()


def mode_text(mode: int) -> str:
    return _enum_text(agent_pb2.Mode.Name, mode)


def direction_text(direction: int) -> str:
    if direction == ruleset_pb2.DIRECTION_INGRESS:
        return "in"
    if direction == ruleset_pb2.DIRECTION_EGRESS:
        return "out"
    return _enum_text(ruleset_pb2.Direction.Name, direction)


def protocol_text(protocol: int) -> str:
    return _enum_text(ruleset_pb2.Protocol.Name, protocol)


def action_text(action: int) -> str:
    return _enum_text(ruleset_pb2.Action.Name, action)


def _enum_text(name_of: Callable[[int], str], value: int) -> str:
    try:
        name = name_of(value)
    except ValueError:
        return f"unknown({value})"
    return "-" if name.endswith("_UNSPECIFIED") else enum_word(name)


def ports_text(ports: Sequence[ruleset_pb2.PortRange]) -> str:
    """`5432`, `8000-8100`, comma separated; `all` when the rule names no port."""
    if not ports:
        return "all"
    return ", ".join(
        str(port.first) if port.first == port.last else f"{port.first}-{port.last}"
        for port in ports
    )


def labels_text(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={labels[key]}" for key in sorted(labels)) or "-"


def truncated(items: Sequence[str], limit: int = TABLE_LIST_LIMIT) -> str:
    """`a, b, c (+12 more)`: the first items of a long list, and how many were left out."""
    if not items:
        return "-"
    shown = ", ".join(items[:limit])
    hidden = len(items) - limit
    return f"{shown} (+{hidden} more)" if hidden > 0 else shown


def in_sync(summary: admin_pb2.AgentSummary) -> bool:
    """Whether the agent enforces the ruleset the controller wants it to."""
    if summary.applied_revision != summary.desired_revision:
        return False
    return not summary.desired_hash or summary.applied_hash == summary.desired_hash


def revisions_text(summary: admin_pb2.AgentSummary) -> str:
    """`4/4`, or `3/5 *` when the agent is behind or its hash differs."""
    text = f"{summary.applied_revision}/{summary.desired_revision}"
    return text if in_sync(summary) else f"{text} *"


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def unix_ms_text(unix_ms: int) -> str:
    if unix_ms <= 0:
        return "never"
    try:
        moment = datetime.datetime.fromtimestamp(unix_ms / 1000, tz=datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{unix_ms} ms since 1970"
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def relative_text(unix_ms: int, now_ms: int) -> str:
    """`in 59m` or `3h ago`."""
    # Rounded, so that a token created for 2d reads `in 2d`, not `in 1d23h`.
    seconds = round((unix_ms - now_ms) / 1000)
    return f"in {span_text(seconds)}" if seconds >= 0 else f"{span_text(-seconds)} ago"


def moment_text(unix_ms: int, now_ms: int) -> str:
    """`in 59m (2025-01-02 03:04:05 UTC)`: how far off, and when exactly."""
    if unix_ms <= 0:
        return "never"
    return f"{relative_text(unix_ms, now_ms)} ({unix_ms_text(unix_ms)})"


def now_unix_ms() -> int:
    return time.time_ns() // 1_000_000
