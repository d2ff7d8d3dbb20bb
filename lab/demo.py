"""`bulkhead-lab demo`: three hosts, one policy, and a table of what gets through.

web (app=web), db (app=db) and other (app=other); the policy in examples/web-db.yaml lets
web reach db on tcp/5432 and nothing else, so every other probe must be blocked, except
the operator's ssh to db, which the agent's failsafe keeps open.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lab.daemons import list_agents, program, wait_ready
from lab.errors import DaemonError, SpecError
from lab.lifecycle import add_listener, down, up
from lab.probe import ProbeResult, probe_hosts
from lab.spec import HostSpec
from lab.state import LabState, Role

DEMO_HOSTS = (
    HostSpec("web", {"app": "web"}),
    HostSpec("db", {"app": "db"}),
    HostSpec("other", {"app": "other"}),
)
DEMO_LISTENERS = {"db": [5432, 5433, 22], "web": [80]}
# The hosts whose rulesets the policy changes: the demo waits for their new hash.
POLICY_HOSTS = ("web", "db")
DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "examples" / "web-db.yaml"
_APPLY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Expectation:
    source: str
    target: str
    port: int
    allowed: bool
    why: str
    ipv6: bool = False


EXPECTATIONS = (
    Expectation("web", "db", 5432, True, "policy web-to-db"),
    Expectation("other", "db", 5432, False, "no policy for other"),
    Expectation("db", "web", 80, False, "rules are one-way"),
    Expectation("web", "db", 5433, False, "only tcp/5432 is open"),
    Expectation("ops", "db", 22, True, "ssh failsafe"),
    Expectation("web", "db", 5432, True, "policy web-to-db", ipv6=True),
)


def apply_policy(controller: str, credentials: str, policy: Path) -> str:
    """`bulkhead --controller ADDR apply -f POLICY`; its output, or DaemonError."""
    argv = [program("bulkhead"), "--controller", controller, "--credentials", credentials,
            "apply", "-f", str(policy)]  # fmt: skip
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=_APPLY_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise DaemonError(f"`bulkhead apply` did not finish in {_APPLY_TIMEOUT:.0f} s") from exc
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"
        raise DaemonError(f"`bulkhead apply -f {policy}` failed: {message}")
    return done.stdout.strip()


def run_probes(state: LabState) -> list[tuple[Expectation, ProbeResult]]:
    return [(e, probe_hosts(state, e.source, e.target, e.port, ipv6=e.ipv6)) for e in EXPECTATIONS]


def probe_table(results: list[tuple[Expectation, ProbeResult]]) -> Table:
    table = Table(title="web-db demo: expected vs actual")
    for column in ("from", "to", "IP", "expected", "actual", "", "why"):
        table.add_column(column, no_wrap=column != "actual")
    for expected, result in results:
        match = expected.allowed == result.connected
        table.add_row(
            expected.source,
            f"{expected.target}:{expected.port}",
            "v6" if expected.ipv6 else "v4",
            "allowed" if expected.allowed else "blocked",
            "allowed" if result.connected else f"blocked ({result.reason})",
            "[green]ok[/]" if match else "[red]MISMATCH[/]",
            expected.why,
        )
    return table


def run_demo(directory: Path, *, policy: Path, keep: bool, console: Console) -> bool:
    """Bring the demo lab up, apply the policy, probe; True if every probe matched."""
    if not policy.is_file():
        raise SpecError(f"--policy: {policy} does not exist")

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    state = up(directory, list(DEMO_HOSTS), report=say)
    try:
        for host, ports in DEMO_LISTENERS.items():
            add_listener(directory, host, ports, udp=False)
            say(f"listener on {host}: {', '.join(map(str, ports))}")
        credentials = Path(state.credentials)
        listed = list_agents(state.controller, credentials)
        before = {a.agent_id: a.desired_hash for a in listed}
        say(apply_policy(state.controller, state.credentials, policy) or f"applied {policy}")
        agents = [p for p in state.processes if p.role == Role.AGENT]
        wait_ready(
            state.controller, credentials, agents,
            changed_from={h: before.get(h, "") for h in POLICY_HOSTS},
        )  # fmt: skip
        say("all agents in sync with the new policy")
        results = run_probes(state)
        console.print(probe_table(results))
        return all(e.allowed == r.connected for e, r in results)
    finally:
        if keep:
            say("lab kept: see `bulkhead-lab status`; `bulkhead-lab down` when done")
        else:
            down(directory)
