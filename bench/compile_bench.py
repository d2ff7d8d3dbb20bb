"""How long compiling a realistic fleet takes: 1,000 workloads x 100 policies by default;
issue 7's size is --workloads 10000 --policies 1000.

Run: .venv/bin/python bench/compile_bench.py [--workloads N] [--policies N] [--runs N]

Besides the full compile (building the Estate: every agent's rules and the shared
address sets) it times the incremental one the controller does when one workload's labels
change (Estate.update: the sets it leaves and joins, its own rules, and the agents whose
ruleset that changes), and, apart, what the push pays afterwards per changed agent:
the new set versions and each changed agent's ruleset hash.

Workloads get app/env/role labels with a skewed spread (a few big apps, many small
ones) and one IPv4 plus one IPv6 address. Policies mix label equality, selectors, IP
lists and CIDRs. Prints the median compile time and what the compiler produced.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from bulkhead.v1.contract import ruleset_hash
from controller.policy import Estate, Workload, compile_rulesets
from controller.policy.resources import IPList, Policy, Resource, parse_documents

ENVS = ("prod", "staging", "dev")
ENV_WEIGHTS = (6, 3, 1)
ROLES = ("frontend", "backend", "db", "cache", "worker")
PORTS = ("tcp/443", "tcp/5432", "tcp/6379", "tcp/8000-8100", "udp/53", "icmp", "tcp/9090")
SEED = 20240601


def make_workloads(count: int, apps: Sequence[str], rng: random.Random) -> list[Workload]:
    # Zipf-like app sizes: app i is about 1/(i+1) as common as the first.
    weights = [1 / (i + 1) for i in range(len(apps))]
    workloads = []
    for index in range(count):
        labels = {
            "app": rng.choices(apps, weights)[0],
            "env": rng.choices(ENVS, ENV_WEIGHTS)[0],
            "role": rng.choice(ROLES),
        }
        if rng.random() < 0.02:
            labels["quarantine"] = "yes"
        v4 = f"198.18.{index // 250}.{index % 250 + 1}"
        v6 = f"2001:db8::{index // 250:x}:{index % 250 + 1:x}"
        workloads.append(Workload(f"host-{index:04d}", labels, (v4, v6)))
    return workloads


def _document(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str]) -> str:
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    return json.dumps(
        {"apiVersion": "bulkhead/v1", "kind": kind, "metadata": metadata, "spec": spec}
    )


def make_resources(count: int, apps: Sequence[str], rng: random.Random) -> list[Resource]:
    documents = [
        _document(
            "IPList",
            f"office-{i}",
            {"cidrs": [f"203.0.{i}.0/24", f"2001:db8:{i}::/48"]},
            {"zone": "office"},
        )
        for i in range(5)
    ]
    for index in range(count):
        source, destination = rng.sample(list(apps[: len(apps) // 2]), 2)
        env = rng.choice(ENVS)
        ports = rng.sample(PORTS, rng.randint(1, 3))
        kind = index % 10
        rule: dict[str, Any]
        if kind < 5:  # label equality, within one environment
            rule = {"from": {"app": source, "env": env}, "to": {"app": destination, "env": env}}
        elif kind < 8:  # selectors
            rule = {
                "from": {
                    "selector": f"app == '{source}' && env in {{'prod', 'staging'}} && !quarantine"
                },
                "to": {"selector": f"role in {{'db', 'cache'}} && app == '{destination}'"},
            }
        elif kind == 8:  # towards the outside
            rule = {
                "from": {"app": source},
                "to": [{"cidr": f"198.19.{index % 256}.0/24"}, {"iplist": "office-1"}],
            }
        else:  # from the offices, by label
            rule = {"from": {"zone": "office"}, "to": {"app": destination, "role": "frontend"}}
        spec = {"rules": [{**rule, "ports": ports}]}
        documents.append(_document("Policy", f"policy-{index:03d}", spec, {}))
    return parse_documents(documents)


def median_seconds(action: Callable[[], object], runs: int) -> float:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", type=int, default=1000)
    parser.add_argument("--policies", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    rng = random.Random(SEED)
    apps = [f"app{i:02d}" for i in range(40)]
    workloads = make_workloads(args.workloads, apps, rng)
    resources = make_resources(args.policies, apps, rng)
    policies = [r for r in resources if isinstance(r, Policy)]
    iplists = [r for r in resources if isinstance(r, IPList)]

    def compile_all() -> None:
        Estate(workloads, iplists, policies)

    seconds = median_seconds(compile_all, args.runs)
    rulesets = compile_rulesets(workloads, iplists, policies)
    hash_seconds = median_seconds(lambda: [ruleset_hash(r) for r in rulesets.values()], args.runs)
    # One workload changes app (a member of the busiest app moves to another), and back.
    estate = Estate(workloads, iplists, policies)
    middle = workloads[len(workloads) // 2 :]
    target = next(w for w in middle if w.labels["app"] == apps[0])
    moved = Workload(target.agent_id, {**target.labels, "app": apps[1]}, target.addresses)
    updates: list[float] = []
    hashing: list[float] = []
    changed_counts: list[int] = []
    for run in range(2 * args.runs):
        workload = moved if run % 2 == 0 else target
        started = time.perf_counter()
        changed = estate.update({target.agent_id: workload})
        updated = time.perf_counter()
        for agent_id in changed:
            estate.hash(agent_id)
        updates.append(updated - started)
        hashing.append(time.perf_counter() - updated)
        changed_counts.append(len(changed))
    rules = [len(r.rules) for r in rulesets.values()]
    sets = [len(r.sets) for r in rulesets.values()]
    elements = sum(len(s.hosts) + len(s.networks) for r in rulesets.values() for s in r.sets)
    distinct_sets = {s.name for r in rulesets.values() for s in r.sets}

    rows = [
        ("workloads / policies / IP lists", f"{len(workloads)} / {len(policies)} / {len(iplists)}"),
        (f"compile time, full (median of {args.runs})", f"{seconds * 1000:.1f} ms"),
        ("hash all rulesets, whole (median)", f"{hash_seconds * 1000:.1f} ms"),
        ("incremental: one workload relabelled", f"{statistics.median(updates) * 1000:.1f} ms"),
        ("  agents whose ruleset changed", f"{statistics.median(changed_counts):g}"),
        ("  then: their new hashes", f"{statistics.median(hashing) * 1000:.1f} ms"),
        ("rules, all agents", f"{sum(rules)}"),
        ("rules per agent (max / median)", f"{max(rules)} / {statistics.median(rules):g}"),
        ("agents with no rules", f"{rules.count(0)}"),
        ("sets, all agents (distinct)", f"{sum(sets)} ({len(distinct_sets)})"),
        ("set elements, all agents", f"{elements}"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


if __name__ == "__main__":
    main()
