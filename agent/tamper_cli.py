"""Apply a ruleset and guard it for a while, in the caller's network namespace.

Tests (and operators trying tamper detection in a lab) run it as ``ip netns exec NS
python -m agent.tamper_cli < request.json``. The request is an object with ``backend``
(nftables, the default, or iptables), ``ruleset`` (protobuf's JSON mapping), ``baseline``
(see baseline_to_json), ``seconds`` to guard (at most MAX_SECONDS) and ``own_table``
(default true; false leaves an nftables table unowned, as kernels before 6.9 do). Standard output
gets JSON lines: ``{"ready": true, "fingerprint": ...}`` once the ruleset is applied and
guarded, then ``{"event": {...}, "fingerprint": ...}`` per TamperEvent (the fingerprint
recorded after the repair), and ``{"done": true}`` at the end. A failure prints
``{"error": ...}`` and exits with status 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from contextlib import suppress
from typing import Any

from google.protobuf import json_format

from agent.dataplane.baseline import baseline_from_json
from agent.dataplane.select import make_backend
from agent.tamper import TamperGuard
from bulkhead.v1 import agent_pb2, ruleset_pb2

BACKENDS = ("nftables", "iptables")
MAX_SECONDS = 600.0


def _emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def _guard(request: dict[str, Any]) -> tuple[TamperGuard, float]:
    name = request.get("backend", "nftables")
    if name not in BACKENDS:
        raise ValueError(f"backend: {name!r} is not one of {', '.join(BACKENDS)}")
    seconds = request.get("seconds")
    if not isinstance(seconds, int | float) or not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"seconds: {seconds!r} is not a number in (0, {MAX_SECONDS:g}]")
    ruleset = json_format.ParseDict(request.get("ruleset", {}), ruleset_pb2.Ruleset())
    baseline = baseline_from_json(json.dumps(request.get("baseline")))
    own_table = request.get("own_table", True)
    if not isinstance(own_table, bool):
        raise ValueError(f"own_table: {own_table!r} is not true or false")
    guard = TamperGuard.for_dataplane(name, make_backend(name, own_table=own_table))
    guard.backend.apply(ruleset, baseline)
    return guard, float(seconds)


async def _watch(guard: TamperGuard, seconds: float) -> None:
    async def report(event: agent_pb2.TamperEvent) -> None:
        _emit(
            {"event": json_format.MessageToDict(event), "fingerprint": guard.expected_fingerprint}
        )

    task = asyncio.create_task(guard.watch(report))
    with suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), seconds)
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        guard, seconds = _guard(json.load(sys.stdin))
    except Exception as exc:  # a CLI boundary: report any failure as JSON, not a traceback
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _emit({"ready": True, "fingerprint": guard.expected_fingerprint})
    asyncio.run(_watch(guard, seconds))
    _emit({"done": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
