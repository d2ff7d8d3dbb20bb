"""The controller's exception tree. The gRPC layer maps it to status codes in one place.

ControllerError
├── InvalidArgument     bad input: one operator-facing line per problem; nothing changed
├── NotFound            the named agent or resource does not exist
└── Conflict            valid input that the current state forbids (e.g. a referenced IP list)
"""

from __future__ import annotations

from collections.abc import Sequence


class ControllerError(Exception):
    """Base of every error the controller reports to a client."""


class InvalidArgument(ControllerError):
    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class NotFound(ControllerError):
    pass


class Conflict(ControllerError):
    pass


class Unavailable(ControllerError):
    """Something the request needs (e.g. a connected agent) is not there right now."""


class Unauthenticated(ControllerError):
    pass


class PermissionDenied(ControllerError):
    pass
