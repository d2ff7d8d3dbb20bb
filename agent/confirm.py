"""Commit-confirm: after a new ruleset is in the kernel, prove the controller is still
reachable over a *new* connection (an established one would pass through any ruleset).
If it is not, the enforcer rolls back, so no policy can cut a host off its controller."""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Sequence

from agent.dataplane.baseline import Endpoint

log = logging.getLogger(__name__)

_ATTEMPT_TIMEOUT_S = 1.0
_PAUSE_S = 0.2
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}


def controller_reachable(endpoints: Sequence[Endpoint], within: float) -> bool:
    """True once a TCP connection to any endpoint succeeds; False after WITHIN seconds."""
    if within <= 0 or not endpoints:
        return True
    deadline = time.monotonic() + within
    while True:
        for endpoint in endpoints:
            try:
                with socket.create_connection(
                    (endpoint.address, endpoint.port), timeout=_ATTEMPT_TIMEOUT_S
                ) as probe:
                    # Closed with a reset: a probe after every apply would otherwise leave
                    # a TIME_WAIT socket and conntrack entry for 2 minutes each, which
                    # every later conntrack cut has to read and judge.
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
                    return True
            except OSError as exc:
                last = exc
        if time.monotonic() >= deadline:
            log.error("commit-confirm: controller unreachable for %.1f s (%s)", within, last)
            return False
        time.sleep(_PAUSE_S)
