"""Failed AdminService calls turned into one operator-facing line (or one per reason)."""

from __future__ import annotations

import re

import grpc

from controller.cli.credentials import CA_FILE, CREDENTIALS_ENV
from controller.cli.errors import ControllerError

_WHERE = "Set --controller or BULKHEAD_CONTROLLER"


def map_rpc_error(exc: grpc.RpcError, address: str, timeout: float) -> ControllerError:
    """Turn a failed call into the operator-facing error for its status code."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or ""
    lines = [line.strip() for line in details.splitlines() if line.strip()]
    reason = "; ".join(lines)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ControllerError(
            f"cannot reach the controller at {address} (no answer within {timeout:g}s; "
            f"raise --timeout if it is busy): is bulkhead-controller running? {_WHERE}."
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return ControllerError(_unavailable_message(details, address))
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ControllerError(
            f"the controller did not accept your certificate: {reason or 'no reason given'}"
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return ControllerError(reason or "the controller refused: permission denied")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ControllerError(lines or ["the controller rejected the request (no reason given)"])
    if code == grpc.StatusCode.NOT_FOUND:
        return ControllerError(reason or "not found")
    status = code.name if code is not None else "UNKNOWN"
    reason = reason or "no details"
    return ControllerError(f"the controller at {address} answered {status}: {reason}")


def _unavailable_message(details: str, address: str) -> str:
    prefix = f"cannot reach the controller at {address}"
    # The TLS library names the cause in capitals inside gRPC's long text.
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            f"{prefix}: its certificate is not signed by the CA in your {CA_FILE}; "
            f"is it the controller that issued your credentials? {_WHERE}."
        )
    if "WRONG_VERSION_NUMBER" in details:
        return f"{prefix}: it does not speak TLS; is it bulkhead-controller? {_WHERE}."
    cause = _unavailable_cause(details)
    if cause == "connection refused":
        # Refused before any TLS: a certificate cannot be the reason.
        return f"{prefix} ({cause}): is bulkhead-controller running? {_WHERE}."
    return (
        f"{prefix} ({cause}): is bulkhead-controller running, and does it trust your "
        f"certificate? {_WHERE}, --credentials or {CREDENTIALS_ENV}."
    )


def _unavailable_cause(details: str) -> str:
    # gRPC's text is long ("failed to connect to all addresses; last error: UNKNOWN:
    # ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused"): keep the cause.
    one_line = " ".join(details.split())
    cause = re.split(r":\s*", one_line)[-1].strip(" []")
    return cause.lower() or "unavailable"
