"""Run one dataplane request read as JSON from stdin, in the caller's network namespace.

Tests (and operators debugging a lab) use it to drive the real backend inside a
namespace without moving their own process: ``ip netns exec NS python -m
agent.dataplane.apply_cli < request.json``. The request is an object with
``command`` (apply, remove, is_present, cut), optionally ``backend`` (nftables, the
default, or iptables) and, as the command needs them, ``ruleset`` (the Ruleset in
protobuf's JSON mapping), ``baseline`` (see baseline_to_json) and
``local_addresses``. The reply on stdout is a JSON object; failures print
``{"error": ...}`` and exit with status 1.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from google.protobuf import json_format

from agent.dataplane.backend import Backend
from agent.dataplane.baseline import Baseline, baseline_from_json
from agent.dataplane.conntrack import cut_disallowed
from agent.dataplane.select import make_backend
from bulkhead.v1 import ruleset_pb2

BACKENDS = ("nftables", "iptables")


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Carry out one request and return the reply object."""
    command = request.get("command")
    if command == "remove":
        _backend(request).remove()
        return {"ok": True}
    if command == "is_present":
        return {"present": _backend(request).is_present()}
    ruleset, baseline = _ruleset(request), _baseline(request)
    if command == "apply":
        _backend(request).apply(ruleset, baseline)
        return {"ok": True}
    if command == "cut":
        local = request.get("local_addresses", [])
        return {"cut": cut_disallowed(ruleset, baseline, [str(address) for address in local])}
    raise ValueError(f"command: {command!r} is not apply, remove, is_present or cut")


def _backend(request: dict[str, Any]) -> Backend:
    name = request.get("backend", "nftables")
    if name not in BACKENDS:
        raise ValueError(f"backend: {name!r} is not one of {', '.join(BACKENDS)}")
    return make_backend(name)


def _ruleset(request: dict[str, Any]) -> ruleset_pb2.Ruleset:
    return json_format.ParseDict(request.get("ruleset", {}), ruleset_pb2.Ruleset())


def _baseline(request: dict[str, Any]) -> Baseline:
    return baseline_from_json(json.dumps(request.get("baseline")))


def main() -> int:
    try:
        reply = run(json.load(sys.stdin))
    except Exception as exc:  # a CLI boundary: report any failure as JSON, not a traceback
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
