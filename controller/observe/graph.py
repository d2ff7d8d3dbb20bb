"""The traffic map: observed flows as a Graphviz DOT graph, and writing it as .dot/.svg/.png.

One node per workload (boxes) or unknown address (dashed ellipses); one edge per
(source, destination, verdict) labelled with its ports and flow count. Workload ids and
label values are user input, so every string goes through `_quote`, and the output is
sorted so the same flows always give the same text.

MapError
├── MapFormatError   the output format is unknown (also a ValueError)
└── MapRenderError   Graphviz is missing, fails or times out, or the file cannot be
                     written (also a RuntimeError)
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from controller.observe.model import EndpointKey, FlowRow, endpoint_key, latest_labels

__all__ = [
    "DOT_TIMEOUT_SECONDS",
    "MAP_FORMATS",
    "MapError",
    "MapFormatError",
    "MapRenderError",
    "render_dot",
    "write_map",
]

MAP_FORMATS = ("dot", "svg", "png")
DOT_TIMEOUT_SECONDS = 60.0
MAX_PROCESSES_SHOWN = 3  # per node; the busiest ones
MAX_PORTS_SHOWN = 8  # per edge
_MAX_ERROR_LINES = 5  # of dot's stderr quoted in an error

_VERDICT_ORDER = {"allowed": 0, "would-deny": 1, "denied": 2}
_PROTOCOL_ORDER = {"tcp": 0, "udp": 1, "icmp": 2}
_EDGE_STYLE = {
    "allowed": 'color="#555555", fontcolor="#333333"',
    "would-deny": 'color="#ef8a17", fontcolor="#b35c00", style=dashed',
    "denied": 'color="#d62728", fontcolor="#d62728", penwidth=1.6',
}
_HEADER = """\
digraph "bulkhead-traffic" {
  graph [rankdir=LR, fontname="Helvetica", fontsize=10, nodesep=0.35, ranksep=1.1,
         labelloc=b, label="edges: grey allowed, red denied, orange dashed would be denied"];
  node [fontname="Helvetica", fontsize=10, shape=box, style="rounded,filled",
        fillcolor="#eef3fb", color="#4a6fa5"];
  edge [fontname="Helvetica", fontsize=9, arrowsize=0.7];
"""
_ADDRESS_STYLE = 'shape=ellipse, style=dashed, color="#777777"'
_CLUSTER_STYLE = 'labelloc=t, style="rounded", color="#9a9a9a", fontcolor="#444444"'


class MapError(Exception):
    """Base of every error of the traffic map."""


class MapFormatError(MapError, ValueError):
    """The requested output format is not one we can write."""


class MapRenderError(MapError, RuntimeError):
    """Graphviz could not render the map, or the file could not be written."""


@dataclass
class _Edge:
    ports: set[tuple[str, int]] = field(default_factory=set)
    count: int = 0


def render_dot(rows: Sequence[FlowRow], group_by: str | None) -> str:
    """The traffic map of `rows` as DOT text.

    With `group_by` (a label key such as "app"), endpoints are boxed in one cluster per
    value of that label; workloads without it share a "(no <key>)" cluster, and unknown
    addresses without it stay outside every cluster.
    """
    if group_by is not None and not group_by:
        raise ValueError("group_by: give a label key such as 'app', or None")
    labels = latest_labels(rows)
    processes: dict[EndpointKey, Counter[str]] = {}
    addresses: dict[EndpointKey, set[str]] = {}
    edges: dict[tuple[EndpointKey, EndpointKey, str], _Edge] = {}
    for row in rows:
        for end in (row.source, row.destination):
            seen = processes.setdefault(endpoint_key(end), Counter())
            addresses.setdefault(endpoint_key(end), set()).add(end.address)
            if end.process:
                seen[end.process] += row.count
        ends = (endpoint_key(row.source), endpoint_key(row.destination), row.verdict)
        edge = edges.setdefault(ends, _Edge())
        edge.ports.add((row.protocol, row.port))
        edge.count += row.count

    lines = [_HEADER]
    for number, (cluster_label, members) in enumerate(
        _clusters(sorted(processes), labels, group_by)
    ):
        indent = "  "
        if cluster_label is not None:
            lines.append(f'  subgraph "cluster_{number}" {{\n')
            lines.append(f"    graph [label={_quote(cluster_label)}, {_CLUSTER_STYLE}];\n")
            indent = "    "
        for key in members:
            node = _node_line(key, processes[key], labels[key], addresses[key])
            lines.append(f"{indent}{node}\n")
        if cluster_label is not None:
            lines.append("  }\n")
    for (source, destination, verdict), edge in sorted(
        edges.items(), key=lambda item: (item[0][0], item[0][1], _VERDICT_ORDER[item[0][2]])
    ):
        flows = "flow" if edge.count == 1 else "flows"
        label = f"{_ports_text(edge.ports)}\n{edge.count} {flows}"
        lines.append(
            f"  {_node_id(source)} -> {_node_id(destination)} "
            f"[label={_quote(label)}, {_EDGE_STYLE[verdict]}];\n"
        )
    lines.append("}\n")
    return "".join(lines)


def _clusters(
    keys: list[EndpointKey], labels: Mapping[EndpointKey, Mapping[str, str]], group_by: str | None
) -> list[tuple[str | None, list[EndpointKey]]]:
    """(cluster label or None for "no cluster", member keys), in output order."""
    if group_by is None:
        return [(None, keys)]
    by_value: dict[str, list[EndpointKey]] = {}
    unlabelled_workloads: list[EndpointKey] = []
    loose: list[EndpointKey] = []
    for key in keys:
        value = labels[key].get(group_by)
        if value is not None:
            by_value.setdefault(value, []).append(key)
        elif key[0] == "workload":
            unlabelled_workloads.append(key)
        else:
            loose.append(key)
    clusters: list[tuple[str | None, list[EndpointKey]]] = [
        (f"{group_by}={value}", by_value[value]) for value in sorted(by_value)
    ]
    if unlabelled_workloads:
        clusters.append((f"(no {group_by})", unlabelled_workloads))
    if loose:
        clusters.append((None, loose))
    return clusters


def _node_line(
    key: EndpointKey, processes: Counter[str], labels: Mapping[str, str], addresses: set[str]
) -> str:
    kind, name = key
    busiest = sorted(processes.items(), key=lambda item: (-item[1], item[0]))
    text = name
    if busiest:
        shown = ", ".join(process for process, _ in busiest[:MAX_PROCESSES_SHOWN])
        hidden = len(busiest) - MAX_PROCESSES_SHOWN
        text += f"\n{shown}" + (f" +{hidden}" if hidden > 0 else "")
    # The tooltip (shown on hover in SVG) carries what would crowd the box.
    details = [f"{k}={v}" for k, v in sorted(labels.items())]
    details += sorted(addresses, key=_address_order)
    attributes = [f"label={_quote(text)}", f"tooltip={_quote(chr(10).join(details))}"]
    if kind == "address":
        attributes.append(_ADDRESS_STYLE)
    return f"{_node_id(key)} [{', '.join(attributes)}];"


def _address_order(text: str) -> tuple[int, int]:
    address = ipaddress.ip_address(text)
    return (address.version, int(address))


def _ports_text(ports: set[tuple[str, int]]) -> str:
    ordered = sorted(ports, key=lambda item: (_PROTOCOL_ORDER[item[0]], item[1]))
    texts = [protocol if protocol == "icmp" else f"{protocol}/{port}" for protocol, port in ordered]
    hidden = len(texts) - MAX_PORTS_SHOWN
    shown = ", ".join(texts[:MAX_PORTS_SHOWN])
    return shown + (f" +{hidden} more" if hidden > 0 else "")


def _node_id(key: EndpointKey) -> str:
    # The kind prefix keeps a workload named like an address apart from that address.
    return _quote(f"{key[0]}:{key[1]}")


def _quote(text: str) -> str:
    """`text` as a quoted DOT string that survives the lexer, label escapes and SVG/XML.

    Backslashes are doubled (labels read `\\n`, `\\N`... as escapes), `&` is written as an
    entity (Graphviz passes `&#0;` through to SVG, which makes it invalid XML), newlines
    become line breaks, and control, format and unassigned characters are shown as
    `\\xNN`/`\\uNNNN` text.
    """
    out: list[str] = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char == '"':
            out.append('\\"')
        elif char == "&":
            out.append("&amp;")
        elif char == "\n":
            out.append("\\n")
        elif unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            code = ord(char)
            if code <= 0xFF:
                out.append(f"\\\\x{code:02x}")
            elif code <= 0xFFFF:
                out.append(f"\\\\u{code:04x}")
            else:
                out.append(f"\\\\U{code:08x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def write_map(dot: str, path: Path, fmt: str | None = None) -> None:
    """Write the map to `path` as DOT text, SVG or PNG, atomically.

    The format comes from `fmt` or else from the file suffix. SVG and PNG are rendered by
    Graphviz's `dot` program. On any error nothing is left at `path` (an existing file
    there is kept as it was).
    """
    chosen = (fmt if fmt is not None else path.suffix.removeprefix(".")).lower()
    if chosen not in MAP_FORMATS:
        choices = ", ".join(f".{name}" for name in MAP_FORMATS)
        if fmt is not None:
            problem = f"unknown map format {fmt!r}"
        elif not path.suffix:
            problem = "the file name has no suffix to tell the format"
        else:
            problem = f"unknown map format {path.suffix!r}"
        raise MapFormatError(f"cannot write {path}: {problem}; use {choices}")
    data = dot.encode("utf-8") if chosen == "dot" else _run_dot(dot, chosen)
    _write_atomically(path, data)


def _run_dot(dot: str, fmt: str) -> bytes:
    program = shutil.which("dot")
    if program is None:
        raise MapRenderError(
            f"cannot render {fmt}: Graphviz's 'dot' program is not on PATH "
            "(Debian: apt-get install graphviz); a .dot file needs no Graphviz"
        )
    command = [program, f"-T{fmt}"]
    try:
        result = subprocess.run(
            command,
            input=dot.encode("utf-8"),
            capture_output=True,
            timeout=DOT_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise MapRenderError(
            f"dot -T{fmt} did not finish within {DOT_TIMEOUT_SECONDS:g} s"
        ) from None
    except OSError as exc:
        raise MapRenderError(f"cannot run {program}: {exc.strerror or exc}") from exc
    if result.returncode != 0 or not result.stdout:
        errors = result.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = "; ".join(errors[:_MAX_ERROR_LINES]) or "no error message"
        raise MapRenderError(f"dot -T{fmt} failed (exit status {result.returncode}): {detail}")
    return result.stdout


def _write_atomically(path: Path, data: bytes) -> None:
    # A temporary file beside the target, renamed over it: readers never see half a map.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    created = False
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        created = False
    except OSError as exc:
        raise MapRenderError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if created:
            temporary.unlink(missing_ok=True)
