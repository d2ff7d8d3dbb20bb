"""The one place controller errors become gRPC status codes."""

from __future__ import annotations

import logging

import grpc

from controller.errors import (
    Conflict,
    ControllerError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

_CODES: dict[type[ControllerError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_for(error: ControllerError) -> grpc.StatusCode:
    for kind, code in _CODES.items():
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def unexpected_status(error: Exception, what: str) -> tuple[grpc.StatusCode, str]:
    """The status for an exception no layer expected while serving WHAT; logged here, once.

    Left to gRPC, it would answer UNKNOWN with the exception's text and log a traceback
    for every request, which anyone allowed to call could repeat at will.
    """
    if isinstance(error, RecursionError):
        # Input nested deeper than some parser copes with: the input's fault, not ours.
        log.warning("%s: refused input nested too deeply to process (%s)", what, error)
        return grpc.StatusCode.INVALID_ARGUMENT, "the request is nested too deeply to process"
    log.error("%s failed unexpectedly", what, exc_info=error)
    kind = type(error).__name__
    return grpc.StatusCode.INTERNAL, f"internal error ({kind}); the controller log has details"
