"""Garbage-collector settings for a process that holds thousands of gRPC streams.

Each stream keeps a task, futures, a call object and messages alive for hours, so the
heap holds about a million long-lived objects. With CPython's default thresholds (700, 10,
10) every burst of messages promotes enough short-lived objects to trigger full
collections, each walking that whole heap while the event loop waits: with 10,000
agent streams the controller ran 19 of them in 45 s, about 0.45 s each, a quarter of its
time (docs/benchmarks.md). A larger young generation lets a message's objects die before
they are ever examined, and freezing what start-up built keeps it out of every scan.
Cycles are still collected; only less often.
"""

from __future__ import annotations

import gc

# Objects allocated (net) between young collections; CPython's default is 700.
YOUNG_THRESHOLD = 50_000
# Young collections per middle one, middle ones per full one (defaults: 10 and 10).
MIDDLE_THRESHOLD = 20
OLD_THRESHOLD = 10


def tune_for_many_streams() -> None:
    """Freeze what exists now (call once start-up has loaded its state) and collect less
    often from here on."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)
