"""How long a connection may stay unauthenticated or unused, and how many the enrollment
port takes: the settings behind `bulkhead-controller --handshake-timeout` and friends.

Each gRPC setting below was checked against grpcio 1.85 with real connections
(tests/unit/test_connection_limits.py): a silent connection is closed after the handshake
timeout, a connection without calls gets GOAWAY after the idle time, and an enrollment
connection gets GOAWAY at its maximum age. The main port has no maximum age: agents hold
one stream for days, and the idle limit never touches a connection with a call open.
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.server.enrollment_front import DEFAULT_PER_SOURCE, DEFAULT_TOTAL, FrontLimits
from controller.server.enrollment_throttle import DEFAULT_FAILURES_PER_MINUTE

DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
# Main port: an operator's CLI call or an agent between streams; both reconnect at will.
DEFAULT_IDLE_TIMEOUT_S = 300.0
# Enrollment is a GetCA and an Enroll, milliseconds each.
ENROLL_IDLE_TIMEOUT_S = 30.0
ENROLL_MAX_AGE_S = 120.0
# Calls in flight when the age is reached get this long to finish.
ENROLL_AGE_GRACE_S = 30.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    enroll_idle_timeout_s: float = ENROLL_IDLE_TIMEOUT_S
    enroll_max_age_s: float = ENROLL_MAX_AGE_S
    enroll_per_source: int = DEFAULT_PER_SOURCE
    enroll_total: int = DEFAULT_TOTAL
    enroll_failures_per_minute: int = DEFAULT_FAILURES_PER_MINUTE

    def front(self) -> FrontLimits:
        return FrontLimits(
            per_source=self.enroll_per_source,
            total=self.enroll_total,
            first_byte_timeout_s=self.handshake_timeout_s,
        )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def main_port_options(limits: ConnectionLimits) -> list[tuple[str, int]]:
    """gRPC server settings of the mTLS port (added to its stream settings)."""
    return [
        # gRPC's default is 120 s: long enough for idle sockets to use up the descriptors.
        ("grpc.server_handshake_timeout_ms", _ms(limits.handshake_timeout_s)),
        ("grpc.max_connection_idle_ms", _ms(limits.idle_timeout_s)),
    ]


def enrollment_port_options(limits: ConnectionLimits) -> list[tuple[str, int]]:
    """gRPC server settings of the enrollment server behind the front."""
    return [
        ("grpc.server_handshake_timeout_ms", _ms(limits.handshake_timeout_s)),
        ("grpc.max_connection_idle_ms", _ms(limits.enroll_idle_timeout_s)),
        ("grpc.max_connection_age_ms", _ms(limits.enroll_max_age_s)),
        ("grpc.max_connection_age_grace_ms", _ms(ENROLL_AGE_GRACE_S)),
    ]
