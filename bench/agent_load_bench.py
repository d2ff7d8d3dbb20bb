"""Agent memory and CPU, idle and under 1,000 new TCP connections per second (run as root).

Brings up its own two-host namespace lab (client app=client, server app=server, nftables,
enforce), allows client -> server tcp/8080 and runs a server on server:8080 that accepts
and closes at once. Then, with psutil on the agent pids the lab recorded:
* idle: after SETTLE_S, each agent's CPU (% of one core) and RSS over IDLE_S of no traffic;
* load: a generator in client's namespace opens and closes RATE new connections per second
  to server:8080 for LOAD_S, in batches every 10 ms; each agent's CPU over that window and
  over the DRAIN_S after it, RSS at start, end and peak (sampled every 0.5 s), CPU per
  thread, and its counters (Prometheus text at 127.0.0.1:9471 in its namespace) before the
  load and DRAIN_S after it.
Prints figures beside the targets; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from lab.lifecycle import down, up
from lab.spec import parse_host_specs
from lab.state import Role, load_state

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the lab helpers of the test suite are not installed
from tests.integration.labfixture import Lab, lab_unavailable  # noqa: E402

HOSTS = ("client", "server")
PORT = 8080
SETTLE_S = 5.0
IDLE_S = 20.0
LOAD_S = 20.0
RATE = 1000  # new connections per second
DRAIN_S = 3.0  # verdict wait (0.5 s) + one flow report (2 s), with a margin
SAMPLE_S = 0.5
MB = 1024 * 1024
METRICS_URL = "http://127.0.0.1:9471/metrics"
COUNTERS = (
    "bulkhead_agent_connections_seen_total",
    "bulkhead_agent_flows_reported_total",
    "bulkhead_agent_flows_dropped_total",
)
POLICY = """\
apiVersion: bulkhead/v1
kind: Policy
metadata:
  name: client-to-server
spec:
  rules:
    - from: {app: client}
      to: {app: server}
      ports: [tcp/8080]
"""
# Accepts and closes at once: the connection's cost is the agent's, not the server's.
SERVER_CODE = """\
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4096)
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""
# Paced: batch k starts at k * 10 ms (late batches run at once); stops at the window's end.
GENERATOR_CODE = """\
import json, socket, sys, time
host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
batch = max(1, rate // 100)
total = int(rate * seconds)
ok = failed = sent = 0
ports = set()  # a client port used again is the same 5-tuple: agents count it once
print("go", flush=True)
start = time.monotonic()
while sent < total and time.monotonic() - start < seconds:
    wait = start + sent / rate - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    for _ in range(batch):
        s = socket.socket()
        s.settimeout(1.0)
        try:
            s.connect((host, port))
            ports.add(s.getsockname()[1])
            ok += 1
        except OSError:
            failed += 1
        finally:
            s.close()
    sent += batch
elapsed = time.monotonic() - start
print(json.dumps({"ok": ok, "failed": failed, "seconds": elapsed, "ports": len(ports)}))
"""


@dataclass
class Window:
    """One agent over one measuring window."""

    seconds: float = 0.0
    user_s: float = 0.0
    system_s: float = 0.0
    rss: list[int] = field(default_factory=list)
    threads: dict[str, float] = field(default_factory=dict)  # "tid name" -> CPU seconds

    @property
    def cpu_percent(self) -> float:
        return self.percent(self.user_s + self.system_s)

    def percent(self, cpu_s: float) -> float:
        return 100 * cpu_s / self.seconds if self.seconds else float("nan")


class Meter:
    """Samples a set of processes: CPU time (user + system, all threads) and RSS."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._start = 0.0
        self._cpu: dict[str, tuple[float, float]] = {}
        self._threads: dict[str, dict[int, float]] = {}
        self.windows: dict[str, Window] = {}

    def begin(self) -> None:
        self._start = time.monotonic()
        self._cpu = {n: _cpu_seconds(p) for n, p in self.processes.items()}
        self._threads = {n: _thread_seconds(p) for n, p in self.processes.items()}
        self.windows = {n: Window(rss=[p.memory_info().rss]) for n, p in self.processes.items()}

    def sample(self) -> None:
        for name, process in self.processes.items():
            self.windows[name].rss.append(process.memory_info().rss)

    def end(self) -> dict[str, Window]:
        seconds = time.monotonic() - self._start
        for name, process in self.processes.items():
            window = self.windows[name]
            window.seconds = seconds
            user, system = _cpu_seconds(process)
            window.user_s, window.system_s = user - self._cpu[name][0], system - self._cpu[name][1]
            window.rss.append(process.memory_info().rss)
            before = self._threads[name]
            window.threads = {
                _thread_label(process.pid, tid): cpu - before.get(tid, 0.0)
                for tid, cpu in _thread_seconds(process).items()
            }
        return self.windows


def _cpu_seconds(process: psutil.Process) -> tuple[float, float]:
    times = process.cpu_times()
    return float(times.user), float(times.system)


def _thread_seconds(process: psutil.Process) -> dict[int, float]:
    return {int(t.id): float(t.user_time + t.system_time) for t in process.threads()}


def _thread_label(pid: int, tid: int) -> str:
    if tid == pid:
        return f"{tid} main"
    try:
        return f"{tid} {Path(f'/proc/{pid}/task/{tid}/comm').read_text().strip()}"
    except OSError:
        return f"{tid} ?"


def measure_for(meter: Meter, seconds: float) -> dict[str, Window]:
    meter.begin()
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(SAMPLE_S, left))
        meter.sample()
    return meter.end()


def read_counters(netns: str) -> dict[str, float]:
    """The agent's counters, scraped from inside its namespace."""
    code = (
        "import sys, urllib.request; "
        f"sys.stdout.write(urllib.request.urlopen({METRICS_URL!r}, timeout=5).read().decode())"
    )
    text = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code],
        capture_output=True, text=True, check=True, timeout=15,
    ).stdout  # fmt: skip
    found: dict[str, float] = {}
    for name in COUNTERS:
        match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
        found[name] = float(match.group(1)) if match else float("nan")
    return found


def start_server(lab: Lab) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", lab.state.host("server").netns,
         sys.executable, "-c", SERVER_CODE, str(PORT)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert server.stdout is not None
    if server.stdout.readline().strip() != "ready":
        stop(server)
        raise SystemExit("the test server on server:8080 did not start")
    return server


def run_load(lab: Lab, meter: Meter) -> tuple[dict[str, Window], dict[str, object]]:
    """Generate the load from client's namespace while sampling the agents."""
    state = lab.state
    generator = subprocess.Popen(
        ["ip", "netns", "exec", state.host("client").netns, sys.executable, "-c",
         GENERATOR_CODE, state.host("server").ipv4, str(PORT), str(RATE), str(LOAD_S)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert generator.stdout is not None
        if generator.stdout.readline().strip() != "go":
            raise SystemExit("the load generator did not start")
        meter.begin()
        deadline = time.monotonic() + LOAD_S + 10
        next_sample = time.monotonic() + SAMPLE_S
        # Polled often so that the window ends when the generator does.
        while generator.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            if time.monotonic() >= next_sample:
                next_sample += SAMPLE_S
                meter.sample()
        windows = meter.end()
        generator.wait(5)
        result: dict[str, object] = json.loads(generator.stdout.read())
        return windows, result
    finally:
        if generator.poll() is None:
            generator.kill()
            generator.wait(5)


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@dataclass
class Results:
    idle: dict[str, Window]
    load: dict[str, Window]
    drain: dict[str, Window]
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    generated: dict[str, object]


def measure(workdir: Path) -> Results:
    directory = workdir / "lab"
    policy = workdir / "client-to-server.yaml"
    policy.write_text(POLICY)
    try:
        up(directory, parse_host_specs(["client:app=client", "server:app=server"]))
        lab = Lab(directory)
        lab.ok("apply", "-f", str(policy))
        lab.wait_in_sync()
        server = start_server(lab)
        try:
            if not lab.probe("client", "server", PORT):
                raise SystemExit("client cannot reach server:8080 after the policy was applied")
            state = load_state(directory)
            agents = {p.host: p.pid for p in state.processes if p.role is Role.AGENT and p.host}
            meter = Meter({name: agents[name] for name in HOSTS})
            time.sleep(SETTLE_S)
            idle = measure_for(meter, IDLE_S)
            before = {h: read_counters(state.host(h).netns) for h in HOSTS}
            load, generated = run_load(lab, meter)
            drain = measure_for(meter, DRAIN_S)
            after = {h: read_counters(state.host(h).netns) for h in HOSTS}
        finally:
            stop(server)
    finally:
        down(directory)
        shutil.rmtree(workdir, ignore_errors=True)  # only once the lab is gone
    return Results(idle, load, drain, before, after, generated)


def _mb(value: float) -> str:
    return f"{value / MB:.1f}"


def report(results: Results) -> None:
    print(f"{'agent':<7} {'window':<6} {'s':>5} {'CPU %':>6} {'user':>5} {'sys':>5} "
          f"{'RSS MB start':>12} {'end':>6} {'peak':>6}")  # fmt: skip
    for name in HOSTS:
        for label, windows in (("idle", results.idle), ("load", results.load),
                               ("drain", results.drain)):  # fmt: skip
            w = windows[name]
            print(f"{name:<7} {label:<6} {w.seconds:>5.1f} {w.cpu_percent:>6.2f} "
                  f"{w.percent(w.user_s):>5.1f} {w.percent(w.system_s):>5.1f} "
                  f"{_mb(w.rss[0]):>12} {_mb(w.rss[-1]):>6} {_mb(max(w.rss)):>6}")  # fmt: skip
    _report_counters(results)
    print("\nCPU per thread under load (top 3, % of one core):")
    for name in HOSTS:
        w = results.load[name]
        top = sorted(w.threads.items(), key=lambda item: -item[1])[:3]
        print(f"  {name}: " + ", ".join(f"{t} {w.percent(cpu):.1f}" for t, cpu in top))
    _report_targets(results)


def _report_counters(results: Results) -> None:
    gen = results.generated
    ok, failed = int(str(gen["ok"])), int(str(gen["failed"]))
    seconds, ports = float(str(gen["seconds"])), int(str(gen["ports"]))
    print(f"\ngenerated: {ok} connections ok, {failed} failed, in {seconds:.1f} s "
          f"= {ok / seconds:.0f}/s (target {RATE}/s); {ports} distinct client ports")  # fmt: skip
    print(f"{'agent':<7} {'seen':>7} {'seen/s':>7} {'flows reported':>15} {'dropped':>8}")
    for name in HOSTS:
        seen, reported, dropped = (
            results.after[name][c] - results.before[name][c] for c in COUNTERS
        )
        print(f"{name:<7} {seen:>7.0f} {seen / seconds:>7.0f} {reported:>15.0f} {dropped:>8.0f}")


def _report_targets(results: Results) -> None:
    idle_rss = max(max(results.idle[h].rss) for h in HOSTS)
    idle_cpu = max(results.idle[h].cpu_percent for h in HOSTS)
    load_rss = max(max(results.load[h].rss + results.drain[h].rss) for h in HOSTS)
    print("\ntargets (worst agent):")
    for target, figure, met in (
        ("RSS idle < 60 MB (issue 5)", f"{_mb(idle_rss)} MB", idle_rss < 60 * MB),
        ("CPU idle < 2% of one core (issue 5)", f"{idle_cpu:.2f} %", idle_cpu < 2),
        ("CPU idle < 1% of one core (issue 7)", f"{idle_cpu:.2f} %", idle_cpu < 1),
        (f"RSS at {RATE} new connections/s < 60 MB", f"{_mb(load_rss)} MB", load_rss < 60 * MB),
    ):
        print(f"  {target:<40} {figure:>9}  {'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    reason = lab_unavailable()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    report(measure(Path(tempfile.mkdtemp(prefix="bh-bench-load-"))))


if __name__ == "__main__":
    main()
