"""Small renderings shared by the CLI's tables and the json/yaml outputs."""

from __future__ import annotations

import json

import pytest
import yaml

from bulkhead.v1 import admin_pb2, ruleset_pb2
from controller.cli.errors import ControllerError
from controller.cli.output import (
    dump_documents,
    in_sync,
    parse_stored_document,
    ports_text,
    protocol_text,
    revisions_text,
    truncated,
)


def test_ports_render_single_ports_and_ranges() -> None:
    ports = [
        ruleset_pb2.PortRange(first=5432, last=5432),
        ruleset_pb2.PortRange(first=8000, last=8100),
    ]
    assert ports_text(ports) == "5432, 8000-8100"
    assert ports_text([]) == "all"


def test_long_lists_are_cut_with_a_count() -> None:
    assert truncated(["a", "b", "c", "d", "e", "f"], limit=4) == "a, b, c, d (+2 more)"
    assert truncated(["a", "b"], limit=4) == "a, b"
    assert truncated([]) == "-"


@pytest.mark.parametrize(
    ("applied", "desired", "expected"),
    [((5, "h"), (5, "h"), "5/5"), ((3, "g"), (5, "h"), "3/5 *"), ((5, "g"), (5, "h"), "5/5 *")],
)
def test_revisions_are_marked_when_out_of_sync(
    applied: tuple[int, str], desired: tuple[int, str], expected: str
) -> None:
    summary = admin_pb2.AgentSummary(
        applied_revision=applied[0],
        applied_hash=applied[1],
        desired_revision=desired[0],
        desired_hash=desired[1],
    )
    assert revisions_text(summary) == expected
    assert in_sync(summary) == (expected == "5/5")


def test_unknown_enum_values_do_not_crash() -> None:
    assert protocol_text(ruleset_pb2.PROTOCOL_UDP) == "udp"
    assert protocol_text(99) == "unknown(99)"


def test_documents_dump_as_reappliable_yaml_and_a_json_list() -> None:
    documents: list[dict[str, object]] = [
        {"kind": "IPList", "metadata": {"name": "a"}},
        {"kind": "Policy"},
    ]
    assert list(yaml.safe_load_all(dump_documents(documents, "yaml"))) == documents
    assert json.loads(dump_documents(documents, "json")) == documents


def test_unreadable_stored_document_is_a_controller_error() -> None:
    resource = admin_pb2.Resource(kind="Policy", name="p", document="[1, 2]")
    with pytest.raises(ControllerError):
        parse_stored_document(resource)
