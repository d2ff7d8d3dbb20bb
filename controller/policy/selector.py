"""Label selector expressions: parsing, matching and a canonical text form.

    app == 'api' && env in {'prod', 'staging'} && !quarantine

Grammar (lowest precedence first; `!` applies to one primary):

    expression := and ('||' and)*
    and        := unary ('&&' unary)*
    unary      := '!' unary | primary
    primary    := '(' expression ')' | 'all' '(' ')' | 'has' '(' KEY ')'
                | KEY [ ('==' | '!=') VALUE | 'in' SET | 'not' 'in' SET ]
    SET        := '{' [VALUE (',' VALUE)*] '}'

A bare KEY (like has(KEY)) means "the label is present". `!=` and `not in` also match
workloads without the label, which makes `!(k in S)` the same as `k not in S`.

A selector is at most MAX_SELECTOR_LENGTH characters and nests '(' and '!' at most
MAX_SELECTOR_DEPTH deep: the parser, matching and the canonical form all recurse.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from bulkhead.v1.contract import LABEL_KEY_PATTERN, MAX_LABEL_KEY_LENGTH
from controller.policy.errors import SelectorError, SelectorTooComplex
from controller.policy.names import label_value_problem

# Far above what people write (a few levels), far below Python's recursion limit: each
# level costs the parser four frames, and matching and canonical() one or two.
MAX_SELECTOR_DEPTH = 32
# Bounds the tokens one selector costs (some 200 bytes each) before anything is parsed.
MAX_SELECTOR_LENGTH = 16 * 1024


class Selector(ABC):
    """A parsed selector; equal selectors have equal canonical text."""

    @abstractmethod
    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a workload or IP list with these labels is selected."""

    @abstractmethod
    def canonical(self) -> str:
        """Normalised text (parses back to an equal selector); used for hashing."""

    def __str__(self) -> str:
        return self.canonical()


@dataclass(frozen=True)
class MatchAll(Selector):
    def matches(self, labels: Mapping[str, str]) -> bool:
        return True

    def canonical(self) -> str:
        return "all()"


@dataclass(frozen=True)
class HasLabel(Selector):
    key: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.key in labels

    def canonical(self) -> str:
        return f"has({self.key})"


@dataclass(frozen=True)
class LabelIn(Selector):
    """`key in values` (label present, value listed), or its complement when negated."""

    key: str
    values: frozenset[str]
    negated: bool = False

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        return (value is not None and value in self.values) != self.negated

    def canonical(self) -> str:
        if len(self.values) == 1:
            (value,) = self.values
            return f"{self.key} {'!=' if self.negated else '=='} '{value}'"
        listed = ", ".join(f"'{value}'" for value in sorted(self.values))
        return f"{self.key} {'not in' if self.negated else 'in'} {{{listed}}}"


@dataclass(frozen=True)
class Not(Selector):
    operand: Selector

    def matches(self, labels: Mapping[str, str]) -> bool:
        return not self.operand.matches(labels)

    def canonical(self) -> str:
        inner = self.operand.canonical()
        return f"!{inner}" if isinstance(self.operand, HasLabel | MatchAll) else f"!({inner})"


@dataclass(frozen=True)
class AllOf(Selector):
    operands: tuple[Selector, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(operand.matches(labels) for operand in self.operands)

    def canonical(self) -> str:
        return " && ".join(
            f"({op.canonical()})" if isinstance(op, AnyOf) else op.canonical()
            for op in self.operands
        )


@dataclass(frozen=True)
class AnyOf(Selector):
    operands: tuple[Selector, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return any(operand.matches(labels) for operand in self.operands)

    def canonical(self) -> str:
        return " || ".join(op.canonical() for op in self.operands)


def _flatten(kind: type[AllOf | AnyOf], operands: Iterable[Selector]) -> list[Selector]:
    # Nested same-kind groups are flattened and operands sorted and deduplicated, so
    # `b && a && a` and `a && b` share one canonical form (and one address set name).
    unique: dict[str, Selector] = {}
    for operand in operands:
        for part in operand.operands if isinstance(operand, kind) else (operand,):
            unique.setdefault(part.canonical(), part)
    return [unique[text] for text in sorted(unique)]


def all_of(operands: Iterable[Selector]) -> Selector:
    """The conjunction of `operands`, normalised (no operands: matches everything)."""
    parts = [op for op in _flatten(AllOf, operands) if not isinstance(op, MatchAll)]
    if not parts:
        return MatchAll()
    return parts[0] if len(parts) == 1 else AllOf(tuple(parts))


def any_of(operands: Iterable[Selector]) -> Selector:
    """The disjunction of `operands`, normalised."""
    parts = _flatten(AnyOf, operands)
    if any(isinstance(op, MatchAll) for op in parts):
        return MatchAll()
    return parts[0] if len(parts) == 1 else AnyOf(tuple(parts))


def negate(operand: Selector) -> Selector:
    """The complement of `operand`, normalised."""
    if isinstance(operand, Not):
        return operand.operand
    if isinstance(operand, LabelIn):
        return LabelIn(operand.key, operand.values, not operand.negated)
    return Not(operand)


def selector_from_labels(labels: Mapping[str, str]) -> Selector:
    """Label equality (`{app: api, env: prod}`: every pair must match) as a Selector."""
    return all_of(LabelIn(key, frozenset({value})) for key, value in labels.items())


class _Token(NamedTuple):
    kind: str  # "op", "word", "string" or "end"
    text: str
    column: int  # 1-based

    def describe(self) -> str:
        if self.kind == "end":
            return "end of expression"
        return self.text if self.kind == "string" else f"'{self.text}'"


_TOKENS = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<op>&&|\|\||==|!=|!|\(|\)|\{|\}|,)"
    r"""|(?P<string>'[^']*'|"[^"]*")"""
    rf"|(?P<word>{LABEL_KEY_PATTERN})"
)
_HALF_OPERATORS = {"=": "'=='", "&": "'&&'", "|": "'||'"}


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        match = _TOKENS.match(text, position)
        column = position + 1
        if match is None:
            char = text[position]
            if char in "'\"":
                raise SelectorError(f"a closing {char} for the value", column, "end of expression")
            expected = _HALF_OPERATORS.get(char, "a label key, a quoted value or an operator")
            raise SelectorError(expected, column, f"'{char}'")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append(_Token(kind, match.group(), column))
        position = match.end()
    tokens.append(_Token("end", "", len(text) + 1))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self._tokens = _tokenize(text)
        self._index = 0
        self._depth = 0  # '(' and '!' open around the current token

    def parse(self) -> Selector:
        result = self._expression()
        self._expect("end", "", "'&&', '||' or end of expression")
        return result

    def _peek(self, offset: int = 0) -> _Token:
        return self._tokens[min(self._index + offset, len(self._tokens) - 1)]

    def _next(self) -> _Token:
        token = self._peek()
        self._index += 1
        return token

    def _at(self, kind: str, text: str) -> bool:
        token = self._peek()
        return token.kind == kind and token.text == text

    def _expect(self, kind: str, text: str, expected: str) -> None:
        token = self._peek()
        if token.kind != kind or token.text != text:
            raise SelectorError(expected, token.column, token.describe())
        self._index += 1

    def _expression(self) -> Selector:
        operands = [self._conjunction()]
        while self._at("op", "||"):
            self._next()
            operands.append(self._conjunction())
        return any_of(operands)

    def _conjunction(self) -> Selector:
        operands = [self._unary()]
        while self._at("op", "&&"):
            self._next()
            operands.append(self._unary())
        return all_of(operands)

    def _nest(self) -> None:
        """Consume a '(' or '!' one level deeper, refusing a level past the limit."""
        token = self._next()
        self._depth += 1
        if self._depth > MAX_SELECTOR_DEPTH:
            problem = f"nested deeper than {MAX_SELECTOR_DEPTH} levels of '(' and '!'"
            raise SelectorTooComplex(problem, token.column)

    def _unary(self) -> Selector:
        if self._at("op", "!"):
            self._nest()
            operand = self._unary()
            self._depth -= 1
            return negate(operand)
        return self._primary()

    def _primary(self) -> Selector:
        token = self._peek()
        if self._at("op", "("):
            self._nest()
            inner = self._expression()
            self._expect("op", ")", "'&&', '||' or ')'")
            self._depth -= 1
            return inner
        if token.kind != "word":
            raise SelectorError(
                "a label key, '!', '(', has(key) or all()", token.column, token.describe()
            )
        is_call = self._peek(1).kind == "op" and self._peek(1).text == "("
        if token.text == "all" and is_call:
            self._index += 2
            self._expect("op", ")", "')' (all() takes no arguments)")
            return MatchAll()
        if token.text == "has" and is_call:
            self._index += 2
            key = self._key()
            self._expect("op", ")", "')' to close has(")
            return HasLabel(key)
        key = self._key()
        if self._at("op", "==") or self._at("op", "!="):
            operator = self._next().text
            value = self._value(f"a quoted value after '{operator}'")
            return LabelIn(key, frozenset({value}), negated=operator == "!=")
        if self._at("word", "in"):
            self._next()
            return LabelIn(key, self._value_set())
        if self._at("word", "not"):
            self._next()
            if not self._at("word", "in"):
                token = self._peek()
                raise SelectorError("'in' after 'not'", token.column, token.describe())
            self._next()
            return LabelIn(key, self._value_set(), negated=True)
        return HasLabel(key)

    def _key(self) -> str:
        token = self._peek()
        if token.kind != "word":
            raise SelectorError("a label key", token.column, token.describe())
        if len(token.text) > MAX_LABEL_KEY_LENGTH:
            raise SelectorError(
                f"a label key of at most {MAX_LABEL_KEY_LENGTH} characters",
                token.column,
                f"one of {len(token.text)}",
            )
        self._index += 1
        return token.text

    def _value(self, expected: str) -> str:
        token = self._peek()
        if token.kind != "string":
            raise SelectorError(expected, token.column, token.describe())
        value = token.text[1:-1]
        if label_value_problem(value) is not None:
            raise SelectorError(
                "a label value (up to 63 letters, digits, '.', '_' or '-')",
                token.column,
                token.describe(),
            )
        self._index += 1
        return value

    def _value_set(self) -> frozenset[str]:
        self._expect("op", "{", "'{' to start the set of values")
        values: set[str] = set()
        if self._at("op", "}"):
            self._next()
            return frozenset()
        while True:
            values.add(self._value("a quoted value in the set"))
            if self._at("op", "}"):
                self._next()
                return frozenset(values)
            self._expect("op", ",", "',' or '}'")


def parse_selector(text: str) -> Selector:
    """Parse a selector expression; raises SelectorError naming what was expected where."""
    if len(text) > MAX_SELECTOR_LENGTH:
        raise SelectorTooComplex(
            f"{len(text)} characters; a selector may have at most {MAX_SELECTOR_LENGTH}"
        )
    selector = _Parser(text).parse()
    # Documents are stored with the canonical form, which must parse again when the
    # controller starts. It can be longer (`k` reads `has(k)`), never deeper.
    stored = len(selector.canonical())
    if stored > MAX_SELECTOR_LENGTH:
        raise SelectorTooComplex(
            f"{stored} characters in canonical form (as stored); "
            f"a selector may have at most {MAX_SELECTOR_LENGTH}"
        )
    return selector
