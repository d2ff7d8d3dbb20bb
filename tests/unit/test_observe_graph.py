"""The traffic map: flow rows, DOT rendering (golden, escaping, clusters) and write_map."""

from __future__ import annotations

import difflib
import os
import random
import shutil
import stat
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from controller.observe import graph
from controller.observe.graph import (
    MapFormatError,
    MapRenderError,
    render_dot,
    write_map,
)
from controller.observe.model import (
    Endpoint,
    FlowRow,
    endpoint_key,
    endpoint_name,
    latest_labels,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "observe"
SVG = "{http://www.w3.org/2000/svg}"
DOT_PROGRAM = "/usr/bin/dot"

WEB = {"app": "web", "role": "frontend"}
API = {"app": "api", "role": "backend"}
DB = {"app": "db"}


def flow(
    source: Endpoint,
    destination: Endpoint,
    port: int,
    protocol: str = "tcp",
    *,
    verdict: str = "allowed",
    count: int = 1,
    last_seen: float = 2000.0,
) -> FlowRow:
    return FlowRow(source, destination, port, protocol, verdict, count, 1000.0, last_seen)


def scenario() -> list[FlowRow]:
    """Two web servers, an api, a database on two addresses, a jump host, DNS, a scanner."""
    web1 = Endpoint("web-1", "198.18.0.11", WEB, "nginx")
    web2 = Endpoint("web-2", "198.18.0.12", WEB, "nginx")
    api = Endpoint("api-1", "198.18.0.21", API, "gunicorn")
    db4 = Endpoint("db-1", "198.18.0.31", DB, "postgres")
    db6 = Endpoint("db-1", "2001:db8::31", DB, "sshd")
    jump = Endpoint("jump", "2001:db8::7", {}, "ssh")
    dns = Endpoint("", "198.18.1.53")
    scanner = Endpoint("", "203.0.113.9")
    return [
        flow(web1, api, 8000, count=40),
        flow(web2, api, 8000, count=35),
        flow(api, db4, 5432, count=12),
        flow(Endpoint("api-1", "198.18.0.21", API, "python3"), dns, 53, "udp", count=9),
        flow(web1, db4, 5432, verdict="denied", count=3),
        flow(jump, db6, 22, count=2),
        flow(jump, api, 0, "icmp"),
        flow(scanner, web1, 443, verdict="would-deny", count=7),
    ]


def svg_of(dot: str, tmp_path: Path) -> ET.Element:
    target = tmp_path / "map.svg"
    write_map(dot, target)
    return ET.fromstring(target.read_bytes())  # raises on malformed XML


def svg_texts(root: ET.Element) -> list[str]:
    return [element.text or "" for element in root.iter(f"{SVG}text")]


# --- the flow model ---------------------------------------------------------------------


def test_endpoint_name_is_the_workload_else_the_address() -> None:
    assert endpoint_name(Endpoint("web-1", "198.18.0.11")) == "web-1"
    assert endpoint_name(Endpoint("", "198.18.0.11")) == "198.18.0.11"


def test_endpoint_addresses_are_normalised() -> None:
    assert Endpoint("", "2001:DB8:0::0001").address == "2001:db8::1"
    # Dual-stack sockets report IPv4 peers as IPv4-mapped IPv6.
    assert Endpoint("", "::ffff:198.18.0.5").address == "198.18.0.5"


def test_endpoint_labels_are_a_read_only_copy_and_endpoints_hash() -> None:
    labels = {"app": "web"}
    endpoint = Endpoint("web-1", "198.18.0.11", labels)
    labels["app"] = "changed"
    assert endpoint.labels == {"app": "web"}
    with pytest.raises(TypeError):
        endpoint.labels["app"] = "x"  # type: ignore[index]
    assert len({endpoint, Endpoint("web-1", "198.18.0.11", {"app": "web"})}) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"protocol": "sctp"}, "FlowRow.protocol: 'sctp' is not one of tcp, udp, icmp"),
        ({"verdict": "dropped"}, "FlowRow.verdict: 'dropped' is not one of"),
        ({"port": 0}, "FlowRow.port: tcp port must be 1-65535, got 0"),
        ({"port": 65536}, "FlowRow.port: tcp port must be 1-65535, got 65536"),
        ({"protocol": "icmp", "port": 8}, "FlowRow.port: icmp flows have port 0, got 8"),
        ({"count": -1}, "FlowRow.count: must not be negative"),
        ({"last_seen": float("nan")}, "FlowRow.last_seen: must be a finite time"),
    ],
)
def test_bad_flow_rows_are_refused_naming_the_field(
    kwargs: dict[str, object], message: str
) -> None:
    values: dict[str, object] = {
        "source": Endpoint("a", "198.18.0.1"),
        "destination": Endpoint("b", "198.18.0.2"),
        "port": 80,
        "protocol": "tcp",
        "verdict": "allowed",
        "count": 1,
        "first_seen": 1.0,
        "last_seen": 2.0,
    } | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        FlowRow(**values)  # type: ignore[arg-type]


def test_bad_endpoint_address_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"Endpoint.address: 'web-1' is not an IPv4 or IPv6"):
        Endpoint("web-1", "web-1")


def test_latest_labels_take_the_most_recent_row_whatever_the_order() -> None:
    old = flow(
        Endpoint("w", "198.18.0.1", {"app": "old"}), Endpoint("", "198.18.0.2"), 80, last_seen=1
    )
    new = flow(
        Endpoint("w", "198.18.0.1", {"app": "new"}), Endpoint("", "198.18.0.2"), 80, last_seen=2
    )
    key = endpoint_key(old.source)
    assert latest_labels([old, new])[key] == {"app": "new"}
    assert latest_labels([new, old])[key] == {"app": "new"}


# --- rendering ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "group_by"), [("map", None), ("map-by-app", "app")])
def test_render_matches_golden(name: str, group_by: str | None) -> None:
    actual = render_dot(scenario(), group_by)
    golden = GOLDEN / f"{name}.dot"
    if os.environ.get("BULKHEAD_UPDATE_GOLDEN") == "1":
        golden.write_text(actual, encoding="utf-8")
    expected = golden.read_text(encoding="utf-8") if golden.exists() else ""
    if actual != expected:
        diff = difflib.unified_diff(
            expected.splitlines(), actual.splitlines(), str(golden), "rendered", lineterm=""
        )
        pytest.fail(
            "rendered map differs from golden (BULKHEAD_UPDATE_GOLDEN=1 regenerates):\n"
            + "\n".join(diff)
        )


@pytest.mark.parametrize("group_by", [None, "app"])
def test_render_does_not_depend_on_row_order(group_by: str | None) -> None:
    rows = scenario()
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    assert render_dot(shuffled, group_by) == render_dot(rows, group_by)
    assert render_dot(list(reversed(rows)), group_by) == render_dot(rows, group_by)


def test_edges_aggregate_per_verdict_with_sorted_ports_and_summed_counts() -> None:
    a = Endpoint("a", "198.18.0.1", {}, "client")
    b = Endpoint("b", "198.18.0.2", {}, "server")
    dot = render_dot(
        [
            flow(a, b, 443, count=2),
            flow(a, b, 53, "udp", count=1),
            flow(a, b, 80, count=3),
            flow(a, b, 0, "icmp", count=1),
            flow(a, b, 443, count=4),
            flow(a, b, 5432, verdict="denied", count=5),
        ],
        None,
    )
    edges = [line.strip() for line in dot.splitlines() if " -> " in line]
    assert edges == [
        '"workload:a" -> "workload:b" [label="tcp/80, tcp/443, udp/53, icmp\\n11 flows", '
        'color="#555555", fontcolor="#333333"];',
        '"workload:a" -> "workload:b" [label="tcp/5432\\n5 flows", '
        'color="#d62728", fontcolor="#d62728", penwidth=1.6];',
    ]


def test_long_port_and_process_lists_are_cut() -> None:
    client = Endpoint("a", "198.18.0.1")
    rows = [flow(client, Endpoint("b", "198.18.0.2", {}, f"p{n}"), 1000 + n) for n in range(10)]
    dot = render_dot(rows, None)
    assert "tcp/1000, tcp/1001, tcp/1002, tcp/1003, tcp/1004, tcp/1005, tcp/1006, tcp/1007" in dot
    assert "tcp/1007 +2 more\\n10 flows" in dot
    assert 'label="b\\np0, p1, p2 +7"' in dot


def test_a_workload_named_like_an_address_stays_apart_from_that_address() -> None:
    lookalike = Endpoint("198.18.0.9", "198.18.0.1")
    stranger = Endpoint("", "198.18.0.9")
    dot = render_dot([flow(stranger, lookalike, 80)], None)
    assert '"address:198.18.0.9" -> "workload:198.18.0.9"' in dot


def test_grouping_boxes_workloads_by_label_and_leaves_unknown_addresses_out() -> None:
    dot = render_dot(scenario(), "app")
    clusters = dot.split("subgraph")[1:]
    assert [part.split('label="')[1].split('"')[0] for part in clusters] == [
        "app=api",
        "app=db",
        "app=web",
        "(no app)",
    ]
    assert '"workload:jump"' in clusters[3]
    after_clusters = clusters[3].split("  }\n", 1)[1]
    assert '"address:198.18.1.53" [' in after_clusters
    assert '"address:203.0.113.9" [' in after_clusters


def test_an_unknown_address_with_ip_list_labels_joins_its_cluster() -> None:
    office = Endpoint("", "203.0.113.7", {"app": "office"})
    dot = render_dot([flow(office, Endpoint("web-1", "198.18.0.11", WEB), 443)], "app")
    office_cluster = dot.split('"app=office"')[1].split("  }\n")[0]
    assert '"address:203.0.113.7"' in office_cluster


def test_an_empty_group_key_is_refused() -> None:
    with pytest.raises(ValueError, match="group_by"):
        render_dot(scenario(), "")


def test_no_rows_is_an_empty_but_valid_graph(tmp_path: Path) -> None:
    root = svg_of(render_dot([], "app"), tmp_path)
    assert root.tag == f"{SVG}svg"


HOSTILE_IDS = [
    'quote"inside',
    "back\\slash\\",
    "new\nline",
    "ünïcødé-🚀",
    "&#0;entity",
    "nul\x00and\rcr",
    "\\N\\G",
    "}; digraph x {",
    "<b>html</b>",
]


def test_hostile_ids_and_labels_render_to_well_formed_svg(tmp_path: Path) -> None:
    hostile = {"app": 'v"\\al\nue&#1;'}
    rows = [
        flow(
            Endpoint(name, f"198.18.0.{n + 1}", hostile, 'proc"\\'), Endpoint("", "198.18.9.9"), 80
        )
        for n, name in enumerate(HOSTILE_IDS)
    ]
    for group_by in (None, "app", 'k"e\\y'):
        root = svg_of(render_dot(rows, group_by), tmp_path)
        texts = svg_texts(root)
        joined = "\n".join(texts)
        for name in HOSTILE_IDS:
            shown = name.replace("\x00", "\\x00").replace("\r", "\\x0d")
            for line in shown.split("\n"):
                assert line in joined, (group_by, name)
        assert 'proc"\\' in joined
    # The cluster of the hostile label value is named as written.
    assert 'app=v"\\al' in svg_texts(svg_of(render_dot(rows, "app"), tmp_path))


def test_dot_reads_back_the_names_it_was_given(tmp_path: Path) -> None:
    # `dot -Tcanon` re-emits the graph as parsed: one node per hostile id, no more.
    rows = [
        flow(Endpoint(name, "198.18.0.1"), Endpoint("", "198.18.9.9"), 80) for name in HOSTILE_IDS
    ]
    canonical = subprocess.run(
        [DOT_PROGRAM, "-Tcanon"],
        input=render_dot(rows, None).encode(),
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    node_lines = [
        line
        for line in canonical.splitlines()
        if line.lstrip().startswith('"workload:') and "->" not in line
    ]
    assert len(node_lines) == len(HOSTILE_IDS)


# --- writing ------------------------------------------------------------------------------


def test_dot_suffix_writes_the_text(tmp_path: Path) -> None:
    dot = render_dot(scenario(), "app")
    write_map(dot, tmp_path / "map.dot")
    assert (tmp_path / "map.dot").read_text(encoding="utf-8") == dot


def test_svg_and_png_are_rendered_by_graphviz(tmp_path: Path) -> None:
    dot = render_dot(scenario(), "app")
    root = svg_of(dot, tmp_path)
    texts = svg_texts(root)
    assert {"web-1", "db-1", "app=web", "(no app)", "tcp/5432", "198.18.1.53"} <= set(texts)
    red = [e for e in root.iter(f"{SVG}path") if e.get("stroke") == "#d62728"]
    assert len(red) == 1  # the one denied edge
    write_map(dot, tmp_path / "map.PNG")
    assert (tmp_path / "map.PNG").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_fmt_overrides_the_suffix(tmp_path: Path) -> None:
    write_map("digraph { a -> b }", tmp_path / "map.txt", fmt="svg")
    assert ET.fromstring((tmp_path / "map.txt").read_bytes()).tag == f"{SVG}svg"


def test_the_written_file_follows_the_umask(tmp_path: Path) -> None:
    write_map("digraph {}", tmp_path / "map.dot")
    mode = stat.S_IMODE((tmp_path / "map.dot").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


@pytest.mark.parametrize(
    ("name", "fmt", "message"),
    [
        ("map.pdf", None, r"map.pdf: unknown map format '.pdf'; use .dot, .svg, .png"),
        ("map", None, r"map: the file name has no suffix to tell the format"),
        ("map.svg", "jpeg", r"map.svg: unknown map format 'jpeg'"),
    ],
)
def test_unknown_formats_are_refused_and_write_nothing(
    tmp_path: Path, name: str, fmt: str | None, message: str
) -> None:
    with pytest.raises(MapFormatError, match=message):
        write_map("digraph {}", tmp_path / name, fmt)
    assert list(tmp_path.iterdir()) == []


def test_missing_dot_program_is_reported_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(MapRenderError, match=r"Graphviz's 'dot' program is not on PATH"):
        write_map("digraph {}", tmp_path / "map.svg")
    assert list(tmp_path.iterdir()) == []


def test_failing_dot_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "map.svg"
    target.write_text("previous map")
    with pytest.raises(MapRenderError, match=r"dot -Tsvg failed \(exit status 1\): .*syntax error"):
        write_map("digraph { a -> }", target)
    assert target.read_text() == "previous map"
    assert [path.name for path in tmp_path.iterdir()] == ["map.svg"]


def fake_dot(directory: Path, body: str) -> None:
    directory.mkdir()
    program = directory / "dot"
    program.write_text(f"#!/bin/sh\n{body}\n")
    program.chmod(0o755)


def test_dot_writing_nothing_is_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dot(tmp_path / "bin", f"{shutil.which('cat')} >/dev/null; exit 0")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(MapRenderError, match=r"exit status 0\): no error message"):
        write_map("digraph {}", tmp_path / "map.png")
    assert not (tmp_path / "map.png").exists()


def test_a_hanging_dot_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dot(tmp_path / "bin", f"exec {shutil.which('sleep')} 30")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(graph, "DOT_TIMEOUT_SECONDS", 0.2)
    with pytest.raises(MapRenderError, match=r"did not finish within 0.2 s"):
        write_map("digraph {}", tmp_path / "map.svg")
    assert not (tmp_path / "map.svg").exists()


def test_an_unwritable_place_is_reported(tmp_path: Path) -> None:
    with pytest.raises(MapRenderError, match=r"cannot write .*missing/map.dot: No such file"):
        write_map("digraph {}", tmp_path / "missing" / "map.dot")
    target = tmp_path / "a-directory.dot"
    target.mkdir()
    with pytest.raises(MapRenderError, match=r"cannot write .*a-directory.dot"):
        write_map("digraph {}", target)
    assert [path.name for path in tmp_path.iterdir()] == ["a-directory.dot"]
