"""controller.gc_tuning, run in a child process: it changes the whole interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

from controller import gc_tuning

_CHILD = """
import gc, json, weakref
from controller.gc_tuning import tune_for_many_streams
before = gc.get_threshold()
tune_for_many_streams()
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle only the collector can free
alive = weakref.ref(a)
del a, b
gc.collect()
print(json.dumps({"before": before, "after": gc.get_threshold(),
                  "frozen": gc.get_freeze_count(), "cycle_freed": alive() is None,
                  "enabled": gc.isenabled()}))
"""


def test_collects_less_often_freezes_start_up_and_still_frees_cycles() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True
    ).stdout
    found = json.loads(out)
    assert found["before"] == [700, 10, 10]  # CPython's defaults, so the change is visible
    assert found["after"] == [
        gc_tuning.YOUNG_THRESHOLD,
        gc_tuning.MIDDLE_THRESHOLD,
        gc_tuning.OLD_THRESHOLD,
    ]
    assert found["frozen"] > 1000  # start-up's objects (the imported modules) are out of scans
    assert found["enabled"]
    assert found["cycle_freed"]
