"""What the agent's imports cost in resident memory, and what an idle agent holds.

Every import figure comes from a fresh interpreter reading its own /proc/self/status, so
it needs neither root nor a lab:

1. The start path of `bulkhead-agent run` without the kernel's firewall and without a
   controller, metrics off and on: import agent.main and the modules `run` imports later,
   read a config, open the metrics (if `metrics_listen`), load and check credentials a
   real CA issued, check whether renewal is due, discover addresses, open (not connect)
   the controller channel. RSS after each step, and whether prometheus_client and
   cryptography got loaded.
2. The steady-state import set (the modules loaded at the end of 1, metrics off), one row
   per top-level package in load order, all imported in one fresh interpreter: RSS after
   each row. Then what the packages loaded on demand only would add on top.
3. Each of those packages alone, over a bare interpreter.

With --idle-agent (root): a real controller and a real agent in a namespace of their own
(bh-rss-*, 198.18.250.1 on a veth pair inside it, no route out, removed at the end). The
agent enrolls on its first start, then is restarted enrolled, ROUNDS times per variant
(metrics off and on, MALLOC_ARENA_MAX unset and 2); after SETTLE_S its VmRSS is sampled.
Never touches a lab.

Prints figures; asserts nothing. Run: .venv/bin/python bench/agent_import_rss.py
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("agent", "bulkhead", "controller", "lab")
ON_DEMAND = {  # packages loaded on the paths named only
    "prometheus_client": "metrics on (metrics_listen set)",
    "cryptography": "the key tool's child process only",
}
CONTROLLER = "198.18.250.1:50151"
# The agent holds the controller's ruleset: applied from a push, or in sync after a restart.
IN_SYNC = re.compile(r"applied revision|in sync with controller")
SETTLE_S = 10.0  # after the ruleset: the first heartbeats, address polls, flow reports
SAMPLE_S = 5.0
ROUNDS = 3  # restarts vary by a few MB: each variant runs once per round, in turn

# Runs in each fresh interpreter: VmRSS in MB.
RSS_CODE = """
import re
def rss():
    text = open("/proc/self/status").read()
    return int(re.search(r"VmRSS:\\s+(\\d+)", text).group(1)) / 1024
"""

# argv[1]: JSON list of rows, each a list of modules; prints the RSS before and after each.
CUMULATIVE_CODE = (
    RSS_CODE
    + """
import importlib, json, sys
print(rss(), flush=True)
for row in json.loads(sys.argv[1]):
    for name in row:
        try:
            importlib.import_module(name)
        except ImportError:  # optional imports that failed in the agent too
            pass
    print(rss(), flush=True)
"""
)

# argv[1]: a state directory to fill with credentials a real CA issued, loaded once as
# the agent's first connection does. Prints the modules loaded: those of cryptography
# are what the key tool (agent/keytool.py, a child process of the agent) loads.
CREDENTIALS_CODE = """
import json, sys
from datetime import timedelta
from pathlib import Path
from agent.identity import AgentCredentials, Names, load_credentials, save_credentials
from agent.keytool import check, generate_key, key_pem, make_csr
from controller.pki.authority import CertificateAuthority, cert_pem
state = Path(sys.argv[1])
ca = CertificateAuthority.load_or_create(state.parent / "ca")
key = generate_key()
cert = ca.issue_agent(make_csr(key, "bench-1"), "bench-1", timedelta(days=30))
pems = key_pem(key), cert_pem(cert), ca.certificate_pem
save_credentials(state, AgentCredentials(*pems, check(pems[1], pems[2], pems[0], Names())))
load_credentials(state)
print(json.dumps(list(sys.modules)))
"""

# argv[1]: the config file. One JSON line per step, [label, rss], then the modules loaded.
START_PATH_CODE = (
    RSS_CODE
    + """
import json, sys
def step(label):
    print(json.dumps([label, rss()]), flush=True)
step("interpreter")
import asyncio
from datetime import UTC, datetime
from pathlib import Path
import agent.main
step("import agent.main")
import agent.dataplane.libnftables, agent.observe.ctevents, agent.observe.nflog
step("+ modules `run` imports later (nftables binding, event listeners)")
from agent.reload import host_settings
config, _settings = host_settings(Path(sys.argv[1]))
metrics = agent.main.open_metrics(config)
if metrics is not None:
    metrics.serve("127.0.0.1", 0)  # any free port: only the cost of serving counts
step("+ config read, metrics served (if metrics_listen)")
from agent.identity import load_credentials
credentials = load_credentials(config.state_dir)
credentials.needs_renewal(datetime.now(UTC))
step("+ credentials loaded and checked, renewal due?")
from agent.addresses import discover_addresses
discover_addresses()
step("+ addresses discovered")
import grpc
async def channel():
    creds = grpc.ssl_channel_credentials(
        credentials.ca_pem, credentials.key_pem, credentials.cert_pem
    )
    async with grpc.aio.secure_channel(config.controller, creds):
        await asyncio.sleep(0.2)
asyncio.run(channel())
step("+ controller channel opened and closed (no connection)")
print(json.dumps(["modules", list(sys.modules)]), flush=True)
"""
)


def python(code: str, *args: str) -> list[str]:
    """Run CODE in a fresh interpreter (the repository as working directory); its lines."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        sys.exit(f"a measuring interpreter failed:\n{done.stderr}")
    return done.stdout.splitlines()


def start_path(
    metrics_listen: str | None,
) -> tuple[list[tuple[str, float]], list[str], list[str]]:
    """The start path's steps with their RSS (MB), the modules loaded at its end, and the
    modules that issuing the credentials loaded."""
    with tempfile.TemporaryDirectory(prefix="bh-rss-") as tmp:
        state = Path(tmp) / "state"
        issuing = json.loads(python(CREDENTIALS_CODE, str(state))[-1])
        config = Path(tmp) / "agent.yaml"
        text = f"agent_id: bench-1\ncontroller: {CONTROLLER}\nstate_dir: {state}\n"
        if metrics_listen is not None:
            text += f"metrics_listen: {metrics_listen}\n"
        config.write_text(text)
        lines = [json.loads(line) for line in python(START_PATH_CODE, str(config))]
    return [(label, rss) for label, rss in lines[:-1]], lines[-1][1], issuing


def package_rows(modules: list[str]) -> list[tuple[str, list[str]]]:
    """Third-party top-level packages in load order, each with its loaded modules, then
    the agent's own modules (and the proto) as one last row."""
    owners = importlib.metadata.packages_distributions()
    rows: dict[str, list[str]] = {}
    ours: list[str] = []
    for module in modules:
        top = module.split(".", maxsplit=1)[0]
        if top in FIRST_PARTY:
            ours.append(module)
        elif top in owners and not top.startswith("_") and top not in sys.stdlib_module_names:
            rows.setdefault(f"{top} ({owners[top][0]})", []).append(module)
    return [*rows.items(), ("agent, bulkhead.v1 (first party)", ours)]


def cumulative(rows: list[list[str]]) -> list[float]:
    return [float(line) for line in python(CUMULATIVE_CODE, json.dumps(rows))]


def print_table(title: str, header: str, lines: list[str]) -> None:
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for line in lines:
        print(line)


def import_figures() -> None:
    off_steps, off_modules, issuing = start_path(None)
    on_steps, on_modules, _ = start_path("127.0.0.1:9471")
    print_table(
        "Start path of `bulkhead-agent run`, no kernel firewall, no controller (RSS, MB)",
        f"{'step':66} {'metrics off':>11} {'on':>6}",
        [
            f"{label:66} {off:11.1f} {on:6.1f}"
            for (label, off), (_, on) in zip(off_steps, on_steps, strict=True)
        ],
    )
    for name, when in ON_DEMAND.items():
        loaded = ", ".join(
            label for label, mods in (("off", off_modules), ("on", on_modules)) if name in mods
        )
        print(f"{name} (needed for: {when}) loaded with metrics: {loaded or 'neither'}")

    rows = package_rows(off_modules)
    extra = [
        (f"+ {name} ({when})", [m for m in on_modules + issuing if m.split(".")[0] == name])
        for name, when in ON_DEMAND.items()
        if name not in off_modules
    ]
    figures = cumulative([modules for _, modules in rows + extra])
    print_table(
        "Idle import set (metrics off), cumulative in load order, one interpreter (RSS, MB)",
        f"{'row':62} {'RSS':>6} {'+RSS':>6}",
        [f"{'interpreter':62} {figures[0]:6.1f}"]
        + [
            f"{label:62} {after:6.1f} {after - before:+6.1f}"
            for (label, _), before, after in zip(
                rows + extra, figures[:-1], figures[1:], strict=True
            )
        ],
    )
    alone = []
    for label, modules in rows[:-1] + extra:
        before, after = cumulative([modules])
        alone.append(f"{label.removeprefix('+ '):62} {after - before:+6.1f}")
    print_table(
        "Each package alone, over a bare interpreter (MB)", f"{'package':62} {'+RSS':>6}", alone
    )


# --- a real idle agent (root) -------------------------------------------------------------


def program(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def vm_rss(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+)", text)
    return int(match.group(1)) / 1024 if match else 0.0


def wait_for(ready: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.2)
    return False


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class IdleLab:
    """One controller and one agent in a namespace of their own."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.netns = f"bh-rss-{secrets.token_hex(3)}"
        self.processes: list[subprocess.Popen[bytes]] = []

    def ip(self, *argv: str) -> None:
        subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)

    def start(
        self, argv: list[str], log: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.workdir / log).open("ab") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *argv],
                stdout=out,
                stderr=out,
                env={**os.environ, **(env or {})},
                cwd=self.workdir,
            )
        self.processes.append(process)
        return process

    def up(self) -> str:
        """The namespace and the controller; an enrollment token for the agent."""
        self.ip("netns", "add", self.netns)
        self.ip("-n", self.netns, "link", "set", "lo", "up")
        # Both ends of a veth pair inside: an address on a link that is up (no dummy module).
        self.ip("-n", self.netns, "link", "add", "bhrss0", "type", "veth", "peer", "bhrss1")
        self.ip("-n", self.netns, "addr", "add", "198.18.250.1/24", "dev", "bhrss0")
        for link in ("bhrss0", "bhrss1"):
            self.ip("-n", self.netns, "link", "set", link, "up")
        state, operator = self.workdir / "controller", self.workdir / "operator"
        subprocess.run(
            [program("bulkhead-controller"), "admin-cert", "--state-dir", str(state),
             "--name", "rss", "--role", "admin", "--out", str(operator)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.start(
            [program("bulkhead-controller"), "--listen", CONTROLLER, "--state-dir", str(state)],
            "controller.log",
        )
        code = (
            "import sys; from pathlib import Path; from lab.daemons import create_token; "
            "print(create_token(sys.argv[1], Path(sys.argv[2]), {'app': 'rss'}))"
        )
        argv = ["ip", "netns", "exec", self.netns, sys.executable, "-c", code, CONTROLLER]
        for _ in range(100):  # until the controller listens
            done = subprocess.run(
                [*argv, str(operator)],
                check=False,
                capture_output=True,
                text=True,
                timeout=30,
                cwd=ROOT,
            )
            if done.returncode == 0:
                return done.stdout.strip()
            time.sleep(0.3)
        sys.exit(f"no token from the controller: {done.stderr}")

    def agent(self, token: str | None, metrics: bool, env: dict[str, str]) -> float:
        """Start the agent, let it settle after its hello; its mean VmRSS (MB), then stop."""
        config = {
            "agent_id": "rss-1",
            "controller": CONTROLLER,
            "state_dir": str(self.workdir / "agent-state"),
            "dataplane": "nftables",
            **({"token": token} if token else {}),
            **({"metrics_listen": "127.0.0.1:9471"} if metrics else {}),
        }
        path = self.workdir / "agent.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        log = self.workdir / "agent.log"
        start = log.stat().st_size if log.exists() else 0
        agent = self.start(
            [program("bulkhead-agent"), "--config", str(path)],
            "agent.log",
            {"BULKHEAD_REQUIRE_NETNS": "1", **env},
        )
        if not wait_for(lambda: IN_SYNC.search(log.read_text()[start:]) is not None, 60.0):
            logs = log.read_text()[start:][-2000:]
            controller = (self.workdir / "controller.log").read_text()[-2000:]
            sys.exit(f"the agent is not in sync after 60 s:\n{logs}\ncontroller:\n{controller}")
        time.sleep(SETTLE_S)
        samples = []
        for _ in range(int(SAMPLE_S / 0.5)):
            samples.append(vm_rss(agent.pid))  # `ip netns exec` execs: the agent's pid
            time.sleep(0.5)
        stop(agent)
        return sum(samples) / len(samples)

    def down(self) -> None:
        for process in reversed(self.processes):
            stop(process)
        with suppress(subprocess.CalledProcessError):
            self.ip("netns", "del", self.netns)


def idle_agent_figures() -> None:
    if os.geteuid() != 0:
        sys.exit("--idle-agent needs root (network namespaces)")
    with tempfile.TemporaryDirectory(prefix="bh-rss-") as tmp:
        lab = IdleLab(Path(tmp))
        try:
            token = lab.up()
            first = lab.agent(token, True, {})
            runs: dict[tuple[bool, str | None], list[float]] = {}
            for _ in range(ROUNDS):
                for metrics in (False, True):
                    for arenas in (None, "2"):
                        env = {"MALLOC_ARENA_MAX": arenas} if arenas else {}
                        runs.setdefault((metrics, arenas), []).append(lab.agent(None, metrics, env))
        finally:
            lab.down()
    lines = [f"{'first start, enrolls (metrics on, as in the lab)':52} {first:7.1f}"]
    for (metrics, arenas), figures in runs.items():
        label = f"restarted, metrics {'on' if metrics else 'off'}, MALLOC_ARENA_MAX={arenas or '-'}"
        low, high = min(figures), max(figures)
        lines.append(f"{label:52} {statistics.median(figures):7.1f} {low:6.1f}-{high:.1f}")
    print_table(
        f"A real idle agent holding its ruleset, mean VmRSS over {SAMPLE_S:.0f} s (MB), "
        f"median of {ROUNDS} restarts",
        f"{'run':52} {'median':>7} {'range':>11}",
        lines,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--idle-agent", action="store_true", help="also measure a real idle agent (root)"
    )
    args = parser.parse_args()
    import_figures()
    if args.idle_agent:
        idle_agent_figures()


if __name__ == "__main__":
    main()
