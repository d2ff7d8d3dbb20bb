"""The agent owns its nftables table (owner + persist flags, Linux 6.9+), for real.

While the owning process lives, the kernel refuses every change from any other process;
when it dies the table stays and keeps enforcing; the next agent takes it back; a table
left without the flags by an older agent is converted in place. Namespaces are created
and removed by the fixture; the test process never enters one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.integration.nslab import PYTHON, Namespace, lab_unavailable_reason, namespace

_REASON = lab_unavailable_reason()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_REASON is not None, reason=f"namespace lab unavailable: {_REASON}"),
]

# Applies the ruleset read from stdin's first line, says "owned", then holds the table
# until stdin closes (or 60 s pass).
HOLD = """
import json, sys, select
from google.protobuf import json_format
from agent.dataplane.baseline import Baseline, Mode
from agent.dataplane.select import make_backend
from bulkhead.v1 import ruleset_pb2
backend = make_backend("nftables")
ruleset = json_format.ParseDict(json.loads(sys.stdin.readline()), ruleset_pb2.Ruleset())
backend.apply(ruleset, Baseline(Mode.ENFORCE))
print("owned" if backend.owns_table else "unowned", flush=True)
select.select([sys.stdin], [], [], 60)
"""
RULESET = {"sets": [{"name": "db", "hosts": ["198.18.0.2"]}]}
TAMPERING = (
    ("nft", "flush", "table", "inet", "bulkhead"),
    ("nft", "insert", "rule", "inet", "bulkhead", "input", "accept"),
    ("nft", "flush", "set", "inet", "bulkhead", "db_v4"),
    ("nft", "delete", "table", "inet", "bulkhead"),
)


@pytest.fixture
def ns() -> Iterator[Namespace]:
    with namespace("own") as created:
        yield created


@contextmanager
def owner(ns: Namespace) -> Iterator[None]:
    process = ns.popen([PYTHON, "-c", HOLD])
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        process.stdin.write(json.dumps(RULESET) + "\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "owned"
        yield
    finally:
        process.kill()
        process.wait(timeout=30)


def table(ns: Namespace) -> str:
    """Our table as nft prints it, without the owner's program name nft appends."""
    listing = ns.run(["nft", "list", "table", "inet", "bulkhead"]).stdout
    return re.sub(r" # progname \S+", "", listing)


def refused(ns: Namespace, argv: tuple[str, ...]) -> bool:
    result = ns.run(list(argv), check=False)
    return result.returncode != 0 and "Operation not permitted" in result.stderr


def test_the_owner_alone_may_change_the_table_and_it_outlives_the_owner(ns: Namespace) -> None:
    with owner(ns):
        held = table(ns)
        assert "flags owner" in held
        for argv in TAMPERING:
            assert refused(ns, argv), f"{' '.join(argv)} was not refused"
        assert table(ns) == held
        ns.run(["nft", "flush", "ruleset"])  # the kernel skips tables it owns for others
        assert table(ns) == held
    orphan = table(ns)  # the owner was SIGKILLed: the table stays, no longer owned
    assert "flags owner" not in orphan
    assert orphan.replace("\tflags \n", "\tflags owner\n") == held
    with owner(ns):  # the next agent takes it back
        assert "flags owner" in table(ns)
        assert refused(ns, TAMPERING[0])


def test_a_table_without_the_flags_is_converted_in_place(ns: Namespace) -> None:
    ns.run(
        ["nft", "-f", "-"],
        stdin="table inet bulkhead {\n set stale { type ipv4_addr; }\n"
        " chain input { type filter hook input priority 0; policy drop; }\n}\n",
    )
    with owner(ns):
        converted = table(ns)
        assert "flags owner" in converted
        assert "stale" not in converted
        assert "ownership_guard" not in converted
        assert "set db_v4" in converted


def test_uninstall_while_the_agent_runs_says_to_stop_it_and_changes_nothing(
    ns: Namespace,
) -> None:
    with owner(ns):
        held = table(ns)
        result = ns.run(
            [PYTHON, "-m", "agent.dataplane.apply_cli"],
            stdin=json.dumps({"command": "remove"}),
            check=False,
        )
        assert result.returncode == 1
        assert "owned by a running bulkhead-agent; stop the agent first" in result.stdout
        assert table(ns) == held
    removed = ns.run([PYTHON, "-m", "agent.dataplane.apply_cli"], stdin='{"command": "remove"}')
    assert json.loads(removed.stdout) == {"ok": True}
    assert "bulkhead" not in ns.run(["nft", "list", "tables"]).stdout


# Applies 1,000 peers, then the same policy with one peer moved, in one process; prints
# the chains' handles before and after and the set's elements after.
MOVE_ONE = """
import json
from agent.dataplane.baseline import Baseline, Mode
from agent.dataplane.select import make_backend
from bulkhead.v1 import ruleset_pb2 as pb
from agent.dataplane.libnftables import LibNftables

def ruleset(hosts):
    rule = pb.Rule(direction=pb.DIRECTION_INGRESS, protocol=pb.PROTOCOL_TCP,
                   peer_set="db", action=pb.ACTION_ALLOW)
    return pb.Ruleset(sets=[pb.AddressSet(name="db", hosts=hosts)], rules=[rule])

def chains():
    listing = LibNftables().json_cmd({"nftables": [{"list": {"chains": None}}]})
    return sorted((c["chain"]["name"], c["chain"]["handle"]) for c in listing["nftables"]
                  if "chain" in c)

hosts = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(1000)]
backend = make_backend("nftables")
backend.apply(ruleset(hosts), Baseline(Mode.ENFORCE))
before = chains()
moved = hosts[:-1] + ["198.19.9.9"]
backend.apply(ruleset(moved), Baseline(Mode.ENFORCE))
listing = LibNftables().json_cmd(
    {"nftables": [{"list": {"set": {"family": "inet", "table": "bulkhead", "name": "db_v4"}}}]})
elements = [s["set"].get("elem", []) for s in listing["nftables"] if "set" in s][0]
print(json.dumps({"before": before, "after": chains(), "elements": sorted(elements),
                  "wanted": sorted(moved)}))
"""


def test_a_moved_peer_changes_only_set_elements_in_the_kernel(ns: Namespace) -> None:
    result = json.loads(ns.run([PYTHON, "-c", MOVE_ONE]).stdout)
    assert result["elements"] == result["wanted"]
    assert result["before"] == result["after"], "chains were not re-created"
