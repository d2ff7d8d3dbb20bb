"""CPU the controller core spends on one agent's hello: a first connect (a new agent, whose
addresses are decided, stored and recorded at once) and a reconnect (nothing changed).

The core is driven in this process, without gRPC: N agents with two addresses each in ten
label groups, a policy from group 0 to group 1, each agent connecting and disconnecting
in turn, then all of them again. Printed per hello, as CPU time (process_time), median of
--repeats runs. The hello path carries the checks that keep a host's claims under the
operator's control (controller/address_claims.py, host_reports.py, fleet_claims.py); a
reconnect storm of 10,000 agents is 10,000 of these.

    .venv/bin/python bench/hello_cost_bench.py [--agents 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bulkhead.v1 import agent_pb2
from controller.core import Controller
from controller.enrollment import Enrollment
from controller.pki import CertificateAuthority
from controller.store.sqlite_store import SqliteStore

POLICY = {
    "apiVersion": "bulkhead/v1",
    "kind": "Policy",
    "metadata": {"name": "g0-to-g1"},
    "spec": {"rules": [{"from": {"app": "g0"}, "to": {"app": "g1"}, "ports": ["tcp/5432"]}]},
}


def hellos(count: int) -> list[agent_pb2.Hello]:
    return [
        agent_pb2.Hello(
            agent_id=f"a{i}",
            hostname=f"a{i}",
            labels={"app": f"g{i % 10}"},
            addresses=[f"198.18.{i // 250}.{i % 250 + 1}", f"2001:db8::{i:x}"],
        )
        for i in range(count)
    ]


def one_run(count: int) -> tuple[float, float]:
    """Microseconds of CPU per hello: first connect, reconnect."""
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        store = SqliteStore(root / "c.db")
        enrollment = Enrollment(store, CertificateAuthority.load_or_create(root / "pki"))
        # The hello's labels stand in for the operator's here (the benchmark's agents are
        # not enrolled): the controller is told to trust the key, as the simulator does.
        core = Controller(store, enrollment, trusted_label_keys=frozenset({"app"}))
        core.apply([json.dumps(POLICY)], actor="operator:bench")
        messages = hellos(count)
        figures = []
        for _ in ("first connect", "reconnect"):
            started = time.process_time()
            for hello in messages:
                core.disconnect(core.connect(hello.agent_id, hello))
            figures.append((time.process_time() - started) / count * 1e6)
        store.close()
    return figures[0], figures[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    runs = [one_run(options.agents) for _ in range(options.repeats)]
    first = statistics.median(run[0] for run in runs)
    again = statistics.median(run[1] for run in runs)
    print(f"{options.agents} agents, median of {options.repeats} runs, CPU per hello:")
    print(f"  first connect  {first:6.0f} us")
    print(f"  reconnect      {again:6.0f} us")


if __name__ == "__main__":
    main()
