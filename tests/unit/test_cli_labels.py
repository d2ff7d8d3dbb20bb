"""Parsing `bulkhead label agent ID key=value key-` arguments."""

from __future__ import annotations

import pytest

from controller.cli.errors import BadInputError
from controller.cli.labels import parse_label_args, parse_label_list


def test_sets_and_removals_are_separated() -> None:
    changes = parse_label_args(["app=web", "env=prod", "tier-", "team.io/owner=ops"])
    assert changes.set == {"app": "web", "env": "prod", "team.io/owner": "ops"}
    assert changes.remove == ["tier"]


def test_repeating_the_same_change_is_harmless() -> None:
    changes = parse_label_args(["app=web", "app=web", "tier-", "tier-"])
    assert changes.set == {"app": "web"}
    assert changes.remove == ["tier"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no labels given: expected key=value to set a label or key- to remove one"),
        (["k=v="], "label argument 'k=v=': a value cannot contain '='"),
        (["app"], "label argument 'app': expected key=value to set a label or key- to remove one"),
        (["=web"], "label argument '=web': the key is empty; expected key=value to set a label"),
        (["-"], "label argument '-': the key is empty"),
        (["app="], "label argument 'app=': the value is empty (use app- to remove)"),
        (["app=a b"], "label argument 'app=a b': the value cannot contain blanks or quotes"),
        (["-app=web"], "label argument '-app=web': key '-app' may hold only letters"),
        (["app=web", "app-"], "label 'app' is both set and removed"),
        (["app-", "app=web"], "label 'app' is both set and removed"),
        (["app=web", "app=db"], "label 'app' is given two different values"),
    ],
)
def test_malformed_arguments_are_refused(args: list[str], message: str) -> None:
    with pytest.raises(BadInputError) as caught:
        parse_label_args(args)
    [line] = caught.value.lines
    assert line.startswith(message)


def test_label_list_parses_comma_separated_pairs() -> None:
    assert parse_label_list("app=web,env=prod", "--labels") == {"app": "web", "env": "prod"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "--labels item '': expected key=value (comma separated)"),
        ("app=web,", "--labels item '': expected key=value (comma separated)"),
        ("app=web,app=db", "--labels: label 'app' is given twice"),
        ("app=", "--labels item 'app=': the value is empty"),
        ("app=a b", "label argument 'app=a b': the value cannot contain blanks or quotes"),
    ],
)
def test_label_list_problems_are_named(text: str, problem: str) -> None:
    with pytest.raises(BadInputError) as caught:
        parse_label_list(text, "--labels")
    assert caught.value.lines == [problem]
