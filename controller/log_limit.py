"""Log lines an agent causes, at most one per agent and kind per interval.

What a host reports can be repeated at will (a refused flow report, an address it keeps
dropping and claiming, its labels, a failed apply), and one line each would let one host
fill the controller's journal. The first line of a kind is logged; the next one within the
interval is not, and the one after it says how many were left out.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

DEFAULT_INTERVAL_S = 60.0
MAX_KEYS = 10_000  # the least recently logged are forgotten beyond this


class LogLimit:
    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._last: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()

    def allow(self, agent_id: str, kind: str) -> int | None:
        """None if a line of KIND for AGENT_ID is not to be logged now; otherwise how
        many were left out before it."""
        key = (agent_id, kind)
        now = self._clock()
        found = self._last.get(key)
        if found is not None and now - found[0] < self._interval_s:
            self._last[key] = (found[0], found[1] + 1)
            return None
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > MAX_KEYS:
            self._last.popitem(last=False)
        return found[1] if found is not None else 0


def left_out(count: int) -> str:
    """The suffix of a line after COUNT lines were left out ("" for none)."""
    return f" ({count} more like it not logged)" if count else ""
