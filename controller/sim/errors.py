"""The simulator's one exception: bad options or an unusable controller, said plainly.

SimError   (the message names the option or file at fault and what to do)
"""

from __future__ import annotations


class SimError(Exception):
    """The simulation cannot go on; the message says why and what to do."""
