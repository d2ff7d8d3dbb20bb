"""Policy deltas in the kernel: host changes go straight into the owned table's hash sets
in one batch, leaving rules, sets and their handles as they were; anything else falls
back to a full apply. Runs in a namespace of its own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.nslab import Namespace, namespace

# Applies the web_db golden case, then the delta given in argv[1] (JSON: add/remove
# lists for its first set, "db": 198.18.0.2 and 2001:db8::2), and prints what the kernel
# holds before and after, and whether the element path took it.
DELTA = """
import json, sys
from google.protobuf import json_format
from agent.dataplane.baseline import baseline_from_json
from agent.dataplane.libnftables import LibNftables
from agent.dataplane.nftables import NftablesBackend
from bulkhead.v1 import agent_pb2, ruleset_pb2
from bulkhead.v1.contract import apply_set_changes

request = json.load(open("tests/golden/nftables/web_db.input.json"))
ruleset = json_format.ParseDict(request["ruleset"], ruleset_pb2.Ruleset())
baseline = baseline_from_json(json.dumps(request["baseline"]))
change = agent_pb2.SetChange(name=ruleset.sets[0].name, **json.loads(sys.argv[1]))
owned = sys.argv[2] == "owned"

TABLE = {"family": "inet", "name": "bulkhead"}

def kernel(nft):
    listing = nft.json_cmd({"nftables": [{"list": {"table": TABLE}}]})
    sets = {i["set"]["name"]: (i["set"]["handle"], sorted(map(str, i["set"].get("elem", []))))
            for i in listing["nftables"] if "set" in i}
    rules = [(i["rule"]["chain"], i["rule"]["handle"]) for i in listing["nftables"] if "rule" in i]
    return {"sets": sets, "rules": rules}

with LibNftables() as nft:
    backend = NftablesBackend(nft, owner=nft if owned else None)
    backend.apply(ruleset, baseline)
    before = kernel(nft)
    result = apply_set_changes(ruleset, [change])
    took = backend.update_elements([change], result, baseline)
    if not took:
        backend.apply(result, baseline)
    after = kernel(nft)
    nft.json_cmd({"nftables": [{"delete": {"table": TABLE}}]})
print(json.dumps({"took": took, "before": before, "after": after}))
"""


@pytest.fixture
def single() -> Iterator[Namespace]:
    with namespace("delta") as ns:
        yield ns


def run_delta(ns: Namespace, change: dict[str, list[str]], *, owned: bool = True) -> Any:
    return json.loads(ns.python(DELTA, json.dumps(change), "owned" if owned else "unowned"))


def test_host_changes_go_into_the_sets_without_touching_rules_or_sets(single: Namespace) -> None:
    change = {"add_hosts": ["198.18.0.77", "2001:db8::77"], "remove_hosts": ["198.18.0.2"]}
    outcome = run_delta(single, change)
    assert outcome["took"], "the element path should take a host-only delta"
    before, after = outcome["before"], outcome["after"]
    assert after["rules"] == before["rules"], "rules (and their handles) stay"
    assert {n: h for n, (h, _) in after["sets"].items()} == {
        n: h for n, (h, _) in before["sets"].items()
    }, "no set is re-created"
    assert before["sets"]["db_v4"][1] == ["198.18.0.2"]
    assert after["sets"]["db_v4"][1] == ["198.18.0.77"]
    assert after["sets"]["db_v6"][1] == ["2001:db8::2", "2001:db8::77"]
    assert after["sets"]["web_v4"][1] == before["sets"]["web_v4"][1]


def test_network_changes_and_unowned_tables_take_the_full_apply(single: Namespace) -> None:
    networks = run_delta(single, {"add_networks": ["203.0.113.0/24"]})
    assert not networks["took"]
    assert any(
        "203.0.113.0" in str(elements) for _, elements in networks["after"]["sets"].values()
    ), "the full apply still loaded the network"
    unowned = run_delta(single, {"add_hosts": ["198.18.0.77"]}, owned=False)
    assert "198.18.0.77" in str(unowned["after"]["sets"]["db_v4"])
    assert not unowned["took"], "without the owner flag someone else may have changed the sets"
