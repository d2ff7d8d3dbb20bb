"""Loading YAML resource documents for `bulkhead apply` (no controller involved)."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller.cli import documents
from controller.cli.documents import MAX_YAML_DEPTH, Source, load_documents, read_sources
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
    text = "use:\n  <<: {a: 1}\n  <<: {b: 2}\n  c: 2\n"
    assert load(text) == [{"use": {"a": 1, "b": 2, "c": 2}}]


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


def laughs(levels: int) -> str:
    """A resource whose `a` lists nine "lol"s, `b` nine `a`s, and so on: 9^LEVELS in all."""
    names = "abcdefghijklmnopqrstuvwxyz"[:levels]
    lines = [f"a: &a [{', '.join(['lol'] * 9)}]"]
    lines += [
        f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]"
        for previous, name in itertools.pairwise(names)
    ]
    return "apiVersion: bulkhead/v1\nkind: Policy\n" + "\n".join(lines) + "\n"


# "Billion laughs": 9^9 "lol"s. As JSON, some 2.7 GB; `bulkhead apply` took 2.9 GB before
# it refused aliases.
BILLION_LAUGHS = laughs(9)
ONE_RESOURCE = "apiVersion: bulkhead/v1\nkind: Policy\nmetadata: {name: p}\n"


def test_aliases_are_refused_naming_file_document_line_and_column() -> None:
    text = "kind: Policy\nbase: &b {a: 1}\nuse:\n  <<: *b\n  c: 2\n"
    message = error_of(f"kind: IPList\n---\n{text}", name="p.yaml")
    assert message == "p.yaml:6:7: document 2: aliases (*b) are not supported; write the value out"


def test_a_small_bomb_is_refused_at_its_first_alias() -> None:
    # 9^3 laughs: small enough to expand in this process if it were not refused.
    message = error_of(f"{ONE_RESOURCE}---\n{laughs(3)}", name="bomb.yaml")
    assert message == (
        "bomb.yaml:8:8: document 2: aliases (*a) are not supported; write the value out"
    )


def test_bulkhead_apply_refuses_a_billion_laughs_without_growing(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    assert BILLION_LAUGHS.count("*") == 8 * 9
    errors = tmp_path / "stderr"
    # Without the refusal the CLI would grow to about 3 GB: prlimit stops it at 1 GiB, or
    # a minute of CPU, rather than let it take this machine's memory.
    guard = ["prlimit", f"--as={1 << 30}", "--cpu=60"]
    bulkhead = Path(sys.executable).parent / "bulkhead"
    argv = [*guard, str(bulkhead), "--controller", "127.0.0.1:1", "apply", "-f", str(bomb)]
    with errors.open("wb") as stderr:
        cli = subprocess.Popen(argv, stderr=stderr, stdout=subprocess.DEVNULL)
        # wait4 gives this child's own peak memory (prlimit sets the limits, then execs
        # the CLI in its place), not the test suite's.
        _, status, usage = os.wait4(cli.pid, 0)
        cli.returncode = os.waitstatus_to_exitcode(status)
    assert (cli.returncode, errors.read_text()) == (
        2,
        f"error: {bomb}:4:8: document 1: aliases (*a) are not supported; write the value out\n",
    )
    assert usage.ru_maxrss < 200 * 1024  # KiB; the CLI itself takes about 60 MB


@pytest.mark.parametrize(
    ("nested", "where"),
    [
        # Flow style, as deep as the attack: it used to end in RecursionError. The 32nd
        # '[' opens level 33 (the document is level 1).
        ("spec: " + "[" * 100_000 + "]" * 100_000, "4:38"),
        # Block style: the document's mapping and 32 more, one per line.
        ("".join(f"{'  ' * level}k:\n" for level in range(MAX_YAML_DEPTH)) + "  " * 32 + "k: x",
         "36:65"),
    ],
)  # fmt: skip
def test_nesting_past_the_limit_is_refused(nested: str, where: str) -> None:
    message = error_of(f"{ONE_RESOURCE}{nested}\n")
    limit = f"nested deeper than {MAX_YAML_DEPTH} mappings and lists"
    assert message == f"in.yaml:{where}: document 1: {limit}"


def test_nesting_up_to_the_limit_is_loaded() -> None:
    nested = "[" * (MAX_YAML_DEPTH - 1) + "]" * (MAX_YAML_DEPTH - 1)
    (document,) = load(f"{ONE_RESOURCE}spec: {nested}\n")
    assert isinstance(document, dict)
    assert json.dumps(document["spec"]) == nested


def test_a_normal_file_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "apiVersion: bulkhead/v1\nkind: Policy\nmetadata: {name: web-db}\n"
        "spec:\n  rules:\n    - from: {app: web}\n      to: [{selector: \"app == 'db'\"}]\n"
        "      ports: [tcp/5432]\n---\n"
        "apiVersion: bulkhead/v1\nkind: IPList\nmetadata: {name: office}\n"
        "spec: {cidrs: [203.0.113.0/24]}\n"
    )
    policy, iplist = (json.loads(text) for text in load_documents(read_sources([str(path)])))
    assert policy["spec"]["rules"][0]["to"] == [{"selector": "app == 'db'"}]
    assert iplist["spec"] == {"cidrs": ["203.0.113.0/24"]}


def test_a_file_larger_than_the_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(documents, "MAX_FILE_BYTES", 64)
    path = tmp_path / "big.yaml"
    path.write_text(ONE_RESOURCE + "#" * (64 - len(ONE_RESOURCE)))
    assert len(read_sources([str(path)])[0].text) == 64
    path.write_text(ONE_RESOURCE + "#" * (65 - len(ONE_RESOURCE)))
    with pytest.raises(BadInputError) as caught:
        read_sources([str(path)])
    assert caught.value.lines == [f"cannot read {path}: larger than 0 MiB"]


def test_stdin_larger_than_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(documents, "MAX_FILE_BYTES", 1024 * 1024)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"#" * (1024 * 1024 + 1))))
    with pytest.raises(BadInputError) as caught:
        read_sources(["-"])
    assert caught.value.lines == ["cannot read <stdin>: larger than 1 MiB"]


def test_documents_too_large_for_one_request_are_refused_before_sending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(documents, "MAX_REQUEST_BYTES", 1024 * 1024)
    body = f"{ONE_RESOURCE}spec: {{note: {'x' * 300_000}}}\n"
    assert len(load("---\n".join([body] * 3))) == 3
    message = error_of("---\n".join([body] * 4), name="big.yaml")
    assert message == (
        "big.yaml: 4 documents come to 1.1 MiB; "
        "one apply carries at most 1 MiB, apply them in parts"
    )
