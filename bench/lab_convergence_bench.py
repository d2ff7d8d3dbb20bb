"""Policy change -> enforced on every agent, with real agents in a namespace lab (run as root).

Issue 7's benchmark "convergence ... with 20 real agents in the lab (target p99 under
300 ms)". Brings up its own lab of --hosts hosts (half app=web, half app=db; a real
controller and one real bulkhead-agent per namespace), applies "web may reach db on tcp/P"
and waits until every agent is in sync. Then, for --rounds rounds, it changes P (which
changes every agent's ruleset: web's egress rule and db's ingress rule), takes t0 just
before the Apply call (admin gRPC in process, so no CLI start is counted) and measures:
* ack: polling ListAgents every --poll-ms, the first answer in which the agent's
  applied_revision reached the desired revision compiled for it (the agent acks only after
  the kernel commit); latency = that answer's arrival - t0, so it includes up to one poll
  interval plus one ListAgents round trip;
* kernel: after the round, each namespace's ruleset read back (nft -j list chain /
  iptables-legacy-save) must hold the new port and not the old one: a count, not a time.
Per round and overall it prints p50/p99/max over the agents (p99 is nearest-rank: with
20 agents per round it is the slowest one), CPU seconds the agents and the controller
spent, and, from the daemons' own log timestamps (ms resolution), when the controller
stored the change and when each agent logged "applied revision N", to tell where the
time goes. Asserts nothing about time; always removes the lab it made.
  .venv/bin/python bench/lab_convergence_bench.py [--hosts 20] [--rounds 10]
      [--dataplane nftables|iptables] [--mode enforce|visibility] [--poll-ms 5]
      [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from controller.cli.client import AdminClient
from lab import topology
from lab.daemons import wait_ready
from lab.lifecycle import DATAPLANES, MODES, down, up
from lab.spec import HostSpec, parse_host_specs
from lab.state import LabPaths, LabState, Role, load_state

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the lab helpers of the test suite are not installed
from tests.integration.labfixture import lab_unavailable  # noqa: E402

TARGET_P99_S = 0.300
ROUND_TIMEOUT_S = 10.0
FIRST_PORT = 20000
POLICY_NAME = "bench-web-to-db"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"


@dataclass
class Round:
    port: int
    apply_s: float = 0.0  # the Apply call's own round trip
    acked: dict[str, float] = field(default_factory=dict)  # agent -> seconds after t0
    revision: dict[str, int] = field(default_factory=dict)  # agent -> desired revision
    stored_revision: int = 0  # the revision Apply returned
    wall_t0: float = 0.0
    kernel_ok: int = 0
    kernel_bad: list[str] = field(default_factory=list)
    cpu_agents_s: float = 0.0
    cpu_controller_s: float = 0.0
    cpu_bench_s: float = 0.0  # this process: the Apply and the polling
    polls: int = 0
    poll_rtt_s: list[float] = field(default_factory=list)


def host_specs(count: int) -> list[HostSpec]:
    webs = [f"web{i:02d}:app=web" for i in range(1, count // 2 + 1)]
    dbs = [f"db{i:02d}:app=db" for i in range(1, count - count // 2 + 1)]
    return parse_host_specs(webs + dbs)


def policy_document(port: int) -> str:
    rule = {"from": {"app": "web"}, "to": {"app": "db"}, "ports": [f"tcp/{port}"]}
    document = {
        "apiVersion": "bulkhead/v1",
        "kind": "Policy",
        "metadata": {"name": POLICY_NAME},
        "spec": {"rules": [rule]},
    }
    return json.dumps(document)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: always a measured value)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of PID (all its threads, and its reaped children) from /proc;
    0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    # utime, stime, and cutime, cstime: the children it reaped (iptables-restore, ipset)
    return sum(int(value) for value in fields[11:15]) / _CLK_TCK


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    return done.stdout if done.returncode == 0 else ""


def _nft_dports(node: object) -> set[int]:
    """Every `th/tcp dport == N` constant in nft JSON, however deeply nested."""
    found: set[int] = set()
    if isinstance(node, dict):
        match = node.get("match")
        if isinstance(match, dict):
            left, right = match.get("left"), match.get("right")
            payload = left.get("payload") if isinstance(left, dict) else None
            dport = isinstance(payload, dict) and payload.get("field") == "dport"
            if dport and isinstance(right, int):
                found.add(right)
        for value in node.values():
            found |= _nft_dports(value)
    elif isinstance(node, list):
        for item in node:
            found |= _nft_dports(item)
    return found


def kernel_ports(state: LabState, host: str) -> set[int]:
    """The destination ports of the policy rules HOST's kernel holds now."""
    netns = ["ip", "netns", "exec", state.host(host).netns]
    if state.dataplane == "iptables":
        ports: set[int] = set()
        for line in _run([*netns, "iptables-legacy-save", "-t", "filter"]).splitlines():
            words = line.split()
            if line.startswith("-A BULKHEAD-") and "--dports" in words:
                ports |= {int(p) for p in words[words.index("--dports") + 1].split(",")}
        return ports
    ports = set()
    for chain in ("policy_in", "policy_out"):
        listing = _run([*netns, "nft", "-j", "list", "chain", "inet", "bulkhead", chain])
        if listing:
            ports |= _nft_dports(json.loads(listing))
    return ports


def log_times(path: Path, marker: str) -> dict[int, float]:
    """Revision -> wall time (Unix s) of log lines '... <marker><revision>...'; the daemons
    log with asctime (local time, ms resolution)."""
    found: dict[int, float] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return found
    for line in lines:
        at = line.find(marker)
        if at < 0 or len(line) < 23:
            continue
        digits = line[at + len(marker) :].split(" ", 1)[0].rstrip(")")
        try:
            stamp = datetime.strptime(line[:23], _LOG_TIME).timestamp()
            found.setdefault(int(digits), stamp)
        except ValueError:
            continue
    return found


def converge(client: AdminClient, names: list[str], port: int, poll_s: float) -> Round:
    """Apply the policy on PORT and poll until every agent acked its new revision (or the
    round times out); the agents missing from `acked` never converged."""
    before = {a.agent_id: a.desired_hash for a in client.list_agents().agents}
    result = Round(port=port)
    document = policy_document(port)
    result.wall_t0 = time.time()
    t0 = time.monotonic()
    reply = client.apply([document], dry_run=False)
    result.apply_s = time.monotonic() - t0
    result.stored_revision = reply.revision
    pending = set(names)
    while pending and time.monotonic() - t0 < ROUND_TIMEOUT_S:
        asked = time.monotonic()
        agents = client.list_agents().agents
        answered = time.monotonic()
        result.polls += 1
        result.poll_rtt_s.append(answered - asked)
        for agent in agents:
            if agent.agent_id not in pending or agent.desired_hash == before.get(agent.agent_id):
                continue  # not ours, or its change is not compiled yet
            result.revision[agent.agent_id] = agent.desired_revision
            if (
                agent.applied_revision >= agent.desired_revision
                and agent.applied_hash == agent.desired_hash
            ):
                result.acked[agent.agent_id] = answered - t0
                pending.discard(agent.agent_id)
        if pending:
            time.sleep(poll_s)
    return result


def run_rounds(directory: Path, rounds: int, poll_s: float) -> list[Round]:
    state = load_state(directory)
    agents = [p for p in state.processes if p.role is Role.AGENT]
    controller = next(p for p in state.processes if p.role is Role.CONTROLLER)
    names = [host.name for host in state.hosts]
    webs = {name for name in names if state.host(name).labels.get("app") == "web"}
    results: list[Round] = []
    with AdminClient(state.controller, Path(state.credentials), timeout=5.0) as client:
        client.apply([policy_document(FIRST_PORT)], dry_run=False)
        wait_ready(state.controller, Path(state.credentials), agents)
        for index in range(1, rounds + 1):
            port = FIRST_PORT + index
            cpu_before = [cpu_seconds(p.pid) for p in agents], cpu_seconds(controller.pid)
            own_cpu = time.process_time()
            result = converge(client, names, port, poll_s)
            result.cpu_bench_s = time.process_time() - own_cpu
            result.cpu_agents_s = sum(cpu_seconds(p.pid) for p in agents) - sum(cpu_before[0])
            result.cpu_controller_s = cpu_seconds(controller.pid) - cpu_before[1]
            for name in names:
                ports = kernel_ports(state, name)
                if port in ports and port - 1 not in ports:
                    result.kernel_ok += 1
                else:
                    role = "web" if name in webs else "db"
                    result.kernel_bad.append(f"{name}({role}): {sorted(ports) or 'none'}")
            results.append(result)
            if len(result.acked) < len(names):  # let stragglers finish before the next round
                wait_ready(state.controller, Path(state.credentials), agents, timeout=30)
            time.sleep(0.2)  # let the post-apply work (flow reports, logs) settle
    return results


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def _spread(values: list[float]) -> str:
    if not values:
        return f"{'-':>8} {'-':>8} {'-':>8}"
    return f"{_ms(statistics.median(values))} {_ms(percentile(values, 0.99))} {_ms(max(values))}"


def print_report(results: list[Round], paths: LabPaths, names: list[str], poll_s: float) -> None:
    print(
        f"{'round':>5} {'apply':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'acked':>6} "
        f"{'kernel':>6} {'cpu agents':>10} {'cpu ctl':>8} {'bench':>6} {'polls':>5}"
    )
    everything: list[float] = []
    for number, result in enumerate(results, start=1):
        values = list(result.acked.values())
        everything += values
        print(
            f"{number:>5} {_ms(result.apply_s)} {_spread(values)} "
            f"{len(values):>3}/{len(names):<2} {result.kernel_ok:>3}/{len(names):<2} "
            f"{result.cpu_agents_s:>9.2f}s {result.cpu_controller_s:>7.2f}s "
            f"{result.cpu_bench_s:>5.2f}s {result.polls:>5}"
        )
        missing = sorted(set(names) - set(result.acked))
        if missing:
            print(f"      never converged within {ROUND_TIMEOUT_S:.0f} s: {', '.join(missing)}")
        if result.kernel_bad:
            print(f"      kernel without the new port only: {'; '.join(result.kernel_bad)}")
    total = len(results) * len(names)
    print(
        f"{'all':>5} {'':>8} {_spread(everything)} {len(everything):>3}/{total:<3} "
        f"{sum(r.kernel_ok for r in results):>3}/{total:<3}"
    )
    if everything:
        p99 = percentile(everything, 0.99)
        verdict = "met" if p99 < TARGET_P99_S and len(everything) == total else "NOT met"
        print(
            f"target: p99 < {TARGET_P99_S * 1000:.0f} ms over all rounds x agents -> "
            f"p99 {p99 * 1000:.1f} ms: {verdict}"
        )
    rtts = [rtt for r in results for rtt in r.poll_rtt_s]
    if rtts:
        median_rtt, max_rtt = statistics.median(rtts) * 1000, max(rtts) * 1000
        print(
            f"ack resolution: poll every {poll_s * 1000:.0f} ms + ListAgents round trip "
            f"(median {median_rtt:.1f} ms, max {max_rtt:.1f} ms)"
        )
    print_profile(results, paths, names)


def print_profile(results: list[Round], paths: LabPaths, names: list[str]) -> None:
    """Where the time goes, from the daemons' log timestamps (ms resolution)."""
    stored = log_times(paths.controller_log, "resource(s) at revision ")
    applied = {name: log_times(paths.agent_log(name), "applied revision ") for name in names}
    to_store: list[float] = []
    to_apply: list[float] = []
    after_apply: list[float] = []
    first_to_last: list[float] = []
    for result in results:
        if result.stored_revision in stored:
            to_store.append(stored[result.stored_revision] - result.wall_t0)
        this_round = []
        for name, revision in result.revision.items():
            at = applied[name].get(revision)
            if at is None:
                continue
            this_round.append(at - result.wall_t0)
            if name in result.acked:
                after_apply.append(result.acked[name] - (at - result.wall_t0))
        to_apply += this_round
        if this_round:
            first_to_last.append(max(this_round) - min(this_round))
    print("profile (log timestamps, ms after t0; ms resolution)  p50 / p99 / max:")
    print(f"  controller stored the change        {_spread(to_store)}")
    print(f"  agent logged 'applied revision N'   {_spread(to_apply)}")
    print(f"  first -> last agent applied, round  {_spread(first_to_last)}")
    print(f"  ack seen by the poll after that     {_spread(after_apply)}")


def machine_facts() -> str:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: nproc {os.cpu_count()} ({model or 'unknown CPU'}), kernel "
        f"{platform.release()}, Python {platform.python_version()}, load avg {load}"
    )


def wait_for_free_machine(wait_s: float) -> None:
    """Only one lab fits on the machine, and other namespace runs share the CPUs: wait
    until no bh-* namespace exists (never removing someone else's)."""
    deadline = time.monotonic() + wait_s
    while True:
        reason = lab_unavailable()
        if reason is not None and os.geteuid() != 0:
            raise SystemExit(f"cannot run: {reason}")
        others = topology.find_bh_namespaces()
        if reason is None and not others:
            return
        if time.monotonic() >= deadline:
            raise SystemExit(
                f"cannot run: {reason or 'bh-* namespaces exist: ' + ' '.join(others)}"
            )
        print(f"waiting: {reason or 'bh-* namespaces exist: ' + ' '.join(others)}", file=sys.stderr)
        time.sleep(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dataplane", choices=DATAPLANES, default="nftables")
    # visibility: same rulesets, but the agent skips the conntrack cut (enforce only)
    parser.add_argument("--mode", choices=MODES, default="enforce")
    parser.add_argument("--poll-ms", type=float, default=5.0)
    parser.add_argument(
        "--wait",
        type=float,
        default=600.0,
        help="seconds to wait for another lab/namespace run to finish",
    )
    parser.add_argument("--keep-logs", type=Path, help="copy the lab's logs here before teardown")
    args = parser.parse_args()
    if not 2 <= args.hosts <= 200:
        parser.error("--hosts: give between 2 and 200 hosts")
    if args.rounds < 1:
        parser.error("--rounds: give at least 1")
    wait_for_free_machine(args.wait)
    print(machine_facts())
    specs = host_specs(args.hosts)
    webs = sum(1 for s in specs if s.labels["app"] == "web")
    print(
        f"lab: {len(specs)} agents ({webs} app=web, {len(specs) - webs} app=db), "
        f"{args.dataplane}, {args.mode}; {args.rounds} rounds; poll {args.poll_ms:g} ms"
    )
    parent = Path(tempfile.mkdtemp(prefix="bh-bench-conv-"))
    directory = parent / "lab"
    paths = LabPaths(directory)
    started = time.monotonic()
    try:
        # `up` removes what it made if it fails; `down` would also sweep any other lab's
        # marked namespaces, so it is called only for the lab this run brought up.
        up(directory, specs, mode=args.mode, dataplane=args.dataplane)
    except BaseException:
        shutil.rmtree(parent, ignore_errors=True)
        raise
    try:
        print(f"lab up and in sync in {time.monotonic() - started:.1f} s")
        results = run_rounds(directory, args.rounds, args.poll_ms / 1000)
        print_report(results, paths, [s.name for s in specs], args.poll_ms / 1000)
    finally:
        if args.keep_logs is not None and paths.logs.is_dir():
            shutil.copytree(paths.logs, args.keep_logs, dirs_exist_ok=True)
        down(directory)
        shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()
