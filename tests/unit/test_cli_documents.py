"""Loading YAML resource documents for `bulkhead apply` (no controller involved)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.cli.documents import Source, load_documents, read_sources
from controller.cli.errors import BadInputError


def load(text: str, name: str = "in.yaml") -> list[object]:
    return [json.loads(document) for document in load_documents([Source(name, text)])]


def error_of(text: str, name: str = "in.yaml") -> str:
    with pytest.raises(BadInputError) as caught:
        load_documents([Source(name, text)])
    [line] = caught.value.lines
    return line


def test_documents_keep_their_order_and_empty_ones_are_skipped() -> None:
    text = "---\nkind: Policy\n---\n---\n# only a comment\n---\nkind: IPList\n...\n"
    assert load(text) == [{"kind": "Policy"}, {"kind": "IPList"}]


def test_several_sources_are_concatenated() -> None:
    documents = load_documents([Source("a.yaml", "kind: A\n"), Source("b.yaml", "kind: B\n")])
    assert [json.loads(document) for document in documents] == [{"kind": "A"}, {"kind": "B"}]


def test_syntax_error_names_file_line_and_column() -> None:
    message = error_of("kind: Policy\nspec:\n  rules: [\n    {from: a\n", name="p.yaml")
    assert message.startswith("p.yaml:5:1: ")


def test_syntax_error_in_stdin_is_named_stdin() -> None:
    assert error_of("a: 'x\n", name="-").startswith("<stdin>:2:1: ")


def test_non_mapping_document_is_named_by_its_number() -> None:
    message = error_of("kind: A\n---\n---\njust text\n")
    assert message == "in.yaml:4: document 3: expected a mapping (a resource), got a string"


def test_duplicate_keys_are_refused() -> None:
    message = error_of("kind: Policy\nspec:\n  ports: [tcp/1]\n  ports: [tcp/2]\n")
    assert message == "in.yaml:4:3: duplicate key 'ports'"


def test_merge_keys_are_not_duplicates() -> None:
    text = "base: &b {a: 1}\nuse:\n  <<: *b\n  c: 2\n"
    assert load(text) == [{"base": {"a": 1}, "use": {"a": 1, "c": 2}}]


def test_values_without_a_json_form_must_be_quoted() -> None:
    message = error_of("kind: Policy\nmetadata: {name: 2024-01-01}\n")
    assert message == (
        "in.yaml:1: document 1: value 2024-01-01 is a date; quote it to make it text"
    )


def test_no_documents_at_all_is_an_error() -> None:
    assert error_of("---\n# nothing\n") == "no documents to apply in in.yaml"


def test_read_sources_reports_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(BadInputError) as caught:
        read_sources([str(missing)])
    assert caught.value.lines == [f"cannot read {missing}: No such file or directory"]


def test_read_sources_refuses_non_utf8(tmp_path: Path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(BadInputError) as caught:
        read_sources([str(latin)])
    assert caught.value.lines[0].startswith(f"cannot read {latin}: not UTF-8 text (byte 10")


def test_stdin_may_be_given_only_once() -> None:
    with pytest.raises(BadInputError):
        read_sources(["-", "-"])
