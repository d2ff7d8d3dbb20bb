"""The policy package's exceptions.

PolicyError
├── SelectorError      a selector expression does not parse (says what and at which column)
│   └── SelectorTooComplex   longer, or nested deeper, than a selector may be
├── ValidationFailed   one or more documents of a batch are invalid (.errors lists them all)
└── FieldProblem       one field value is invalid (raised inside validation, also a ValueError)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class PolicyError(Exception):
    """Base of every error this package raises on bad input."""


class SelectorError(PolicyError, ValueError):
    """A selector expression is malformed."""

    def __init__(self, expected: str, column: int, found: str) -> None:
        self.expected = expected
        self.column = column  # 1-based
        self.found = found
        super().__init__(f"expected {expected} at column {column}, found {found}")


class SelectorTooComplex(SelectorError):
    """A selector is longer, or nests '(' and '!' deeper, than the parser allows.

    The limits keep parsing, matching and the canonical form bounded in time, memory and
    stack depth whatever an operator (or a stolen operator credential) sends.
    """

    def __init__(self, problem: str, column: int | None = None) -> None:
        PolicyError.__init__(self, problem if column is None else f"{problem} at column {column}")
        self.expected = "a smaller selector"
        self.column = column or 1
        self.found = problem


class FieldProblem(PolicyError, ValueError):
    """One field value is invalid.

    `key` names the entry inside the value that is wrong (a label key, or a peer's
    reserved key), so the reported path can point at it.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        self.message = message
        self.key = key
        super().__init__(message)


@dataclass(frozen=True)
class FieldError:
    """One problem in one document of a batch; `document` is 1-based, kind/name may be ''."""

    document: int
    kind: str
    name: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"document {self.document}"
        if self.kind:
            where += f" ({self.kind} {self.name})" if self.name else f" ({self.kind})"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"


class ValidationFailed(PolicyError):
    """A batch of documents was rejected as a whole; `errors` lists every problem found."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(error) for error in self.errors))
