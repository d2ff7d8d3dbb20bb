"""The one place controller errors become gRPC status codes."""

from __future__ import annotations

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
