"""Label selector expressions: parsing, matching, canonical text and error messages."""

from __future__ import annotations

import pytest

from controller.policy.errors import SelectorError, SelectorTooComplex
from controller.policy.selector import (
    MAX_SELECTOR_DEPTH,
    MAX_SELECTOR_LENGTH,
    MatchAll,
    parse_selector,
    selector_from_labels,
)

API_PROD = {"app": "api", "env": "prod"}
API_QUARANTINED = {"app": "api", "env": "staging", "quarantine": "yes"}
WEB_DEV = {"app": "web", "env": "dev"}
NO_LABELS: dict[str, str] = {}


@pytest.mark.parametrize(
    ("text", "selected"),
    [
        ("app == 'api'", [API_PROD, API_QUARANTINED]),
        ('app == "api"', [API_PROD, API_QUARANTINED]),
        ("app != 'api'", [WEB_DEV, NO_LABELS]),  # absent label: not equal
        ("env in {'prod', 'staging'}", [API_PROD, API_QUARANTINED]),
        ("env in {}", []),
        ("env not in {'prod','staging'}", [WEB_DEV, NO_LABELS]),
        ("quarantine", [API_QUARANTINED]),
        ("has(quarantine)", [API_QUARANTINED]),
        ("!quarantine", [API_PROD, WEB_DEV, NO_LABELS]),
        ("app == 'api' && env in {'prod','staging'} && !quarantine", [API_PROD]),
        ("app == 'web' || env == 'prod'", [API_PROD, WEB_DEV]),
        ("app == 'web' || env == 'prod' && quarantine", [WEB_DEV]),  # && binds tighter
        ("(app == 'web' || env == 'prod') && !quarantine", [API_PROD, WEB_DEV]),
        ("!(app == 'api')", [WEB_DEV, NO_LABELS]),
        ("all()", [API_PROD, API_QUARANTINED, WEB_DEV, NO_LABELS]),
        ("!all()", []),
    ],
)
def test_matches(text: str, selected: list[dict[str, str]]) -> None:
    selector = parse_selector(text)
    candidates = [API_PROD, API_QUARANTINED, WEB_DEV, NO_LABELS]
    assert [labels for labels in candidates if selector.matches(labels)] == selected


def test_keys_may_hold_dots_slashes_and_dashes() -> None:
    selector = parse_selector("example.com/tier-1 == 'gold' && has(k8s.io/zone)")
    assert selector.matches({"example.com/tier-1": "gold", "k8s.io/zone": "a"})
    assert not selector.matches({"example.com/tier-1": "gold"})


def test_function_names_without_parentheses_are_label_keys() -> None:
    assert parse_selector("all").matches({"all": "x"})
    assert not parse_selector("all").matches({})
    assert parse_selector("has == 'x'").matches({"has": "x"})


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("app=='api'", "app == 'api'"),
        ('env in {"staging","prod","prod"}', "env in {'prod', 'staging'}"),
        ("env in {'prod'}", "env == 'prod'"),
        ("env not in {'prod'}", "env != 'prod'"),
        ("!(env in {'a','b'})", "env not in {'a', 'b'}"),
        ("!(env == 'a')", "env != 'a'"),
        ("b && a && (b && c)", "has(a) && has(b) && has(c)"),
        ("a || (b || a)", "has(a) || has(b)"),
        ("(a || b) && c", "(has(a) || has(b)) && has(c)"),
        ("!!a", "has(a)"),
        ("!(a && b)", "!(has(a) && has(b))"),
        ("all() && a", "has(a)"),
        ("all() || a", "all()"),
    ],
)
def test_canonical_text_is_normalised_and_parses_back(text: str, canonical: str) -> None:
    selector = parse_selector(text)
    assert selector.canonical() == canonical
    assert parse_selector(canonical) == selector


def test_operand_order_does_not_change_canonical_text() -> None:
    first = parse_selector("app == 'api' && env == 'prod' && !quarantine")
    second = parse_selector("!quarantine && env == 'prod' && app == 'api'")
    assert first.canonical() == second.canonical()


def test_label_equality_mapping_is_a_selector() -> None:
    selector = selector_from_labels({"env": "prod", "app": "api"})
    assert selector.matches(API_PROD)
    assert not selector.matches({"app": "api"})
    assert selector.canonical() == parse_selector("app == 'api' && env == 'prod'").canonical()
    assert selector_from_labels({}) == MatchAll()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("app == api", "expected a quoted value after '==' at column 8, found 'api'"),
        ("app = 'api'", "expected '==' at column 5, found '='"),
        ("a & b", "expected '&&' at column 3, found '&'"),
        ("", "expected a label key, '!', '(', has(key) or all() at column 1"),
        ("a &&", "expected a label key, '!', '(', has(key) or all() at column 5"),
        ("(a || b", "expected '&&', '||' or ')' at column 8, found end of expression"),
        ("a b", "expected '&&', '||' or end of expression at column 3, found 'b'"),
        ("a == 'x", "expected a closing ' for the value at column 6, found end of expression"),
        ("a not b", "expected 'in' after 'not' at column 7, found 'b'"),
        ("a in 'x'", "expected '{' to start the set of values at column 6, found 'x'"),
        ("a in {'x' 'y'}", "expected ',' or '}' at column 11, found 'y'"),
        ("a in {'x',}", "expected a quoted value in the set at column 11, found '}'"),
        ("has()", "expected a label key at column 5, found ')'"),
        ("all(a)", "expected ')' (all() takes no arguments) at column 5, found 'a'"),
        ("a == 'two words'", "expected a label value (up to 63 letters"),
        ("a == 'x' % b", "expected a label key, a quoted value or an operator at column 10"),
    ],
)
def test_errors_say_what_was_expected_and_where(text: str, message: str) -> None:
    with pytest.raises(SelectorError) as caught:
        parse_selector(text)
    assert str(caught.value).startswith(message)


def test_error_carries_the_column() -> None:
    with pytest.raises(SelectorError) as caught:
        parse_selector("app == 'api' && env in {prod}")
    assert caught.value.column == 25
    assert caught.value.found == "'prod'"


def nested(levels: int, opening: str) -> str:
    """`a`, inside LEVELS of '(' or '!(' (each '!(' counts two levels)."""
    closing = ")" * (levels // len(opening)) if "(" in opening else ""
    return opening * (levels // len(opening)) + "a" + closing


@pytest.mark.parametrize("opening", ["(", "!", "!("])
def test_nesting_up_to_the_limit_parses(opening: str) -> None:
    selector = parse_selector(nested(MAX_SELECTOR_DEPTH, opening))
    assert selector.matches({"a": "x"})  # an even number of negations
    assert parse_selector(selector.canonical()) == selector


@pytest.mark.parametrize("opening", ["(", "!", "!("])
@pytest.mark.parametrize("levels", [MAX_SELECTOR_DEPTH + 2, 300, 5_000])
def test_nesting_past_the_limit_is_refused_at_the_first_level_too_many(
    opening: str, levels: int
) -> None:
    # Without the limit: RecursionError from the parser (300 levels of '(' were enough).
    with pytest.raises(SelectorTooComplex) as caught:
        parse_selector(nested(levels, opening))
    assert str(caught.value) == (
        f"nested deeper than {MAX_SELECTOR_DEPTH} levels of '(' and '!' "
        f"at column {MAX_SELECTOR_DEPTH + 1}"
    )
    assert caught.value.column == MAX_SELECTOR_DEPTH + 1


def test_long_flat_selectors_are_not_limited_by_depth() -> None:
    keys = [f"k{number}" for number in range(1000)]
    assert parse_selector(" && ".join(keys)).matches(dict.fromkeys(keys, "x"))


def test_a_selector_longer_than_the_limit_is_refused_before_parsing() -> None:
    text = "a || " * (MAX_SELECTOR_LENGTH // 5 + 1) + "b"
    assert len(text) > MAX_SELECTOR_LENGTH
    with pytest.raises(SelectorTooComplex) as caught:
        parse_selector(text)
    assert str(caught.value) == (
        f"{len(text)} characters; a selector may have at most {MAX_SELECTOR_LENGTH}"
    )
    assert isinstance(caught.value, SelectorError)  # callers handle both alike


def test_a_selector_whose_canonical_form_is_too_long_is_refused() -> None:
    # Stored documents hold the canonical form, and the controller parses them again when
    # it starts: a selector that fits only as written would keep it from starting.
    keys = [f"k{number:04}" for number in range(MAX_SELECTOR_LENGTH // 8)]
    text = "||".join(keys)  # canonical: "has(k0000) || has(k0001) || ..."
    assert len(text) <= MAX_SELECTOR_LENGTH
    with pytest.raises(SelectorTooComplex) as caught:
        parse_selector(text)
    assert str(caught.value).endswith(
        f"characters in canonical form (as stored); a selector may have at most "
        f"{MAX_SELECTOR_LENGTH}"
    )
    shorter = "||".join(keys[: len(keys) // 3])
    assert parse_selector(parse_selector(shorter).canonical()) == parse_selector(shorter)
