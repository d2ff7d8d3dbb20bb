"""Convergence and reconnect-storm measurement against a controller of our own.

1. Start bulkhead-controller on 127.0.0.1 (free ports, state in the work directory),
   issue an operator certificate, enroll N simulated agents (or reuse the credentials
   cached in the work directory) and wait until all are up and the controller records
   every one in sync.
2. Rounds: apply a policy that changes every agent's ruleset (a ring over the label
   groups: group i may reach group i+1 on one TCP port; then the port changes), and take,
   per agent, the time from the apply call's return to the arrival of its new snapshot.
3. Reconnect storm: SIGTERM the controller, start it again on the same port and state
   dir, and time until every agent has been answered (InSync or a snapshot) on a new stream.
Controller RSS and CPU come from psutil on its pid; the simulator's from its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from controller.cli.client import AdminClient
from controller.cli.errors import CliError
from controller.sim.agents import SimAgent
from controller.sim.credentials import CredentialCache
from controller.sim.enroll import EnrollReport, enroll_fleet, mint_tokens
from controller.sim.errors import SimError
from controller.sim.fleet import Fleet, FleetOptions, FleetStatus
from controller.sim.harness import LocalController, free_port, free_port_pair
from controller.sim.harness import raise_open_files_limit as raise_files_limit
from controller.sim.spec import FleetSpec, LabelPattern
from controller.sim.stats import LatencySummary, summarize

POLICY_NAME = "sim-ring"
FIRST_PORT = 8080
ADMIN_TIMEOUT_S = 300.0  # an apply recompiles every agent; at 10,000 that takes a while
_RSS_SAMPLE_S = 0.5
# ListAgents loads every agent: at 10,000 it holds the controller's loop for about half a
# second, so it is asked less often the larger the fleet (that coarsens `acked_seconds`).
_CONTROLLER_POLL_S = 0.5
_AGENTS_PER_POLL_SECOND = 5000


@dataclass(frozen=True)
class BenchConfig:
    agents: int
    groups: int = 100
    label_key: str = "app"
    workdir: Path | None = None  # reused: keeps controller state and agent credentials
    enroll_concurrency: int = 50
    fleet: FleetOptions = field(default_factory=FleetOptions)
    rounds: int = 2
    deadline: float = 30.0  # per round: snapshots not there by then count as missing
    connect_timeout: float = 600.0
    storm: bool = True
    storm_deadline: float = 120.0
    profile: Path | None = None
    controller_log_level: str = "info"


@dataclass
class RoundResult:
    name: str
    revision: int
    apply_seconds: float
    since_return: LatencySummary
    since_call: LatencySummary
    acked_seconds: float | None  # apply return -> the controller records all in sync


@dataclass
class StormResult:
    stop_seconds: float  # SIGTERM -> exited
    down_seconds: float  # SIGTERM -> listening again
    resync_seconds: float | None  # SIGTERM -> every agent answered on a new stream
    resync_after_listening: float | None
    resynced: int
    given_up: int
    snapshots: int  # snapshots received in the storm (InSync expected: nothing changed)
    status: FleetStatus
    controller_rss: int


@dataclass
class BenchReport:
    agents: int
    enroll: EnrollReport
    connect_seconds: float
    controller_rss_connected: int
    rounds: list[RoundResult] = field(default_factory=list)
    storm: StormResult | None = None
    controller_rss_peak: int = 0
    controller_cpu_rounds: float = 0.0  # CPU seconds the controller spent in the rounds
    sim_cpu_rounds: float = 0.0
    rounds_wall: float = 0.0
    sim_rss: int = 0
    sim_cpu_total: float = 0.0
    wall_total: float = 0.0
    status: FleetStatus | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    controller_pids: list[int] = field(default_factory=list)


def ring_policy(pattern: LabelPattern, port: int) -> list[str]:
    """One policy whose rule i lets group i reach group i+1 (cyclically) on tcp/PORT:
    every agent is on both sides of some rule, so every ruleset depends on PORT."""
    values = pattern.values
    rules = [
        {"from": {pattern.key: value}, "to": {pattern.key: values[(i + 1) % len(values)]},
         "ports": [f"tcp/{port}"]}
        for i, value in enumerate(values)
    ]  # fmt: skip
    document = {
        "apiVersion": "bulkhead/v1",
        "kind": "Policy",
        "metadata": {"name": POLICY_NAME},
        "spec": {"rules": rules},
    }
    return [json.dumps(document)]


def _remove_policy(address: str, operator: Path) -> None:
    """Start from no policy, so the first round creates it even in a reused work dir."""
    with AdminClient(address, operator, timeout=ADMIN_TIMEOUT_S) as admin:
        if any(r.name == POLICY_NAME for r in admin.list_resources("Policy").resources):
            admin.delete_resource("Policy", POLICY_NAME)


def round_names(rounds: int) -> list[tuple[str, int]]:
    """(description, port) per round: the policy created, then its port changed."""
    plan = []
    for index in range(rounds):
        port = FIRST_PORT + index
        name = f"policy created (tcp/{port})" if index == 0 else f"port changed to tcp/{port}"
        plan.append((name, port))
    return plan


class _RssPeak:
    """Samples a process's RSS in a thread until stopped; keeps the peak."""

    def __init__(self, pid: Callable[[], int]) -> None:
        self._pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(_RSS_SAMPLE_S):
            # Between a stop and a start there is no process to sample.
            with contextlib.suppress(psutil.Error, SimError):
                self.peak = max(self.peak, int(psutil.Process(self._pid()).memory_info().rss))


async def run_benchmark(config: BenchConfig, progress: Callable[[str], None]) -> BenchReport:
    """The whole measurement; the controller is always stopped, a temporary work
    directory always removed."""
    raise_files_limit(config.agents)
    temporary = config.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bulkhead-sim-")) if temporary else config.workdir
    assert workdir is not None
    workdir.mkdir(parents=True, exist_ok=True)
    controller = LocalController(
        workdir / "controller",
        port=free_port_pair(),
        metrics_port=free_port(),
        log=workdir / "controller.log",
        log_level=config.controller_log_level,
        profile=config.profile,
        trusted_label_keys=(config.label_key,),
    )
    try:
        report = await _run(config, controller, workdir, progress)
    finally:
        controller.stop()
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    report.controller_pids = controller.pids
    return report


async def _run(
    config: BenchConfig, controller: LocalController, workdir: Path, progress: Callable[[str], None]
) -> BenchReport:
    started = time.monotonic()
    operator = workdir / "operator"
    if not (operator / "operator.crt").exists():
        controller.issue_operator(operator)
    await asyncio.to_thread(controller.start)
    progress(f"controller pid {controller.pid} on {controller.address}, log {controller.log}")
    await asyncio.to_thread(_remove_policy, controller.address, operator)
    pattern = LabelPattern(
        config.label_key, tuple(f"{config.label_key}{i}" for i in range(config.groups))
    )
    fleet, enrolled = await _enrolled_fleet(config, controller, workdir, pattern, progress)
    sim = psutil.Process()
    sim_cpu_start = _cpu(sim)
    rss = _RssPeak(lambda: controller.pid)
    rss.start()
    admin = AdminClient(controller.address, operator, timeout=ADMIN_TIMEOUT_S)
    try:
        report = await _connect(
            fleet, controller, admin, enrolled=enrolled, config=config, progress=progress
        )
        rounds_start, ctl_cpu, sim_cpu = time.monotonic(), controller.cpu_seconds(), _cpu(sim)
        for name, port in round_names(config.rounds):
            await _wait_controller_in_sync(admin, len(fleet.agents), config.deadline * 4)
            result = await _converge(fleet, admin, name, ring_policy(pattern, port), config)
            progress(f"{name}: {result.since_return.describe()}")
            report.rounds.append(result)
        report.rounds_wall = time.monotonic() - rounds_start
        report.controller_cpu_rounds = controller.cpu_seconds() - ctl_cpu
        report.sim_cpu_rounds = _cpu(sim) - sim_cpu
        report.metrics = await asyncio.to_thread(controller.metrics)
        if config.storm:
            report.storm = await _storm(fleet, controller, admin, config)
            progress(f"reconnect storm: {report.storm.status.describe()}")
        report.status = fleet.status()
        report.sim_rss = int(sim.memory_info().rss)
        report.sim_cpu_total = _cpu(sim) - sim_cpu_start
    finally:
        admin.close()
        await fleet.stop()
        rss.stop()
    # The sampler may miss the moments measured explicitly.
    measured = [report.controller_rss_connected] + (
        [report.storm.controller_rss] if report.storm else []
    )
    report.controller_rss_peak = max(rss.peak, *measured)
    report.wall_total = time.monotonic() - started
    return report


async def _enrolled_fleet(
    config: BenchConfig,
    controller: LocalController,
    workdir: Path,
    pattern: LabelPattern,
    progress: Callable[[str], None],
) -> tuple[Fleet, EnrollReport]:
    """The fleet's agents with credentials, reused from the work directory or enrolled."""
    spec = FleetSpec(config.agents, labels=(pattern,))
    cache = CredentialCache(workdir / "agents")
    operator = workdir / "operator"
    credentials, enrolled = await enroll_fleet(
        spec.agent_ids(), cache, enroll_address=controller.enroll_address,
        tokens=lambda missing: mint_tokens(controller.address, operator, missing),
        concurrency=config.enroll_concurrency,
        progress=lambda done: progress(f"enrolled {done}") if done % 1000 == 0 else None,
    )  # fmt: skip
    if enrolled.failed:
        agent_id, why = next(iter(enrolled.failed.items()))
        raise SimError(
            f"{len(enrolled.failed)} agent(s) have no credentials, e.g. {agent_id}: {why}"
        )
    progress(
        f"credentials: {enrolled.reused} reused, {enrolled.enrolled} enrolled "
        f"in {enrolled.seconds:.1f} s"
    )
    ca_pem = cache.ca_pem() or b""
    agents = [
        SimAgent(agent_id, credentials[agent_id], ca_pem, labels=spec.labels_for(i),
                 addresses=[spec.address_for(i)], controller=controller.address)
        for i, agent_id in enumerate(spec.agent_ids())
    ]  # fmt: skip
    return Fleet(agents, config.fleet), enrolled


async def _connect(
    fleet: Fleet,
    controller: LocalController,
    admin: AdminClient,
    *,
    enrolled: EnrollReport,
    config: BenchConfig,
    progress: Callable[[str], None],
) -> BenchReport:
    """Start the fleet; wait until every agent is up and recorded in sync."""
    total = len(fleet.agents)
    started = time.monotonic()
    fleet.start()
    if not await fleet.wait_for(lambda: fleet.status().up == total, config.connect_timeout):
        raise SimError(
            f"not every agent came up within {config.connect_timeout:.0f} s: "
            + fleet.status().describe()
        )
    seconds = time.monotonic() - started
    progress(f"{total} agents up in {seconds:.1f} s")
    await _wait_controller_in_sync(admin, total, config.connect_timeout)
    return BenchReport(
        agents=total, enroll=enrolled, connect_seconds=seconds,
        controller_rss_connected=controller.rss(),
    )  # fmt: skip


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection in the simulator while it times arrivals. It stands
    in for 10,000 agent processes with small heaps; in its one large heap a young
    collection held the loop 50-190 ms, and the arrivals it delayed were counted as the
    controller's latency. Reference counting still frees; collection resumes after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def _converge(
    fleet: Fleet, admin: AdminClient, name: str, documents: list[str], config: BenchConfig
) -> RoundResult:
    with collector_paused():
        return await _timed_round(fleet, admin, name, documents, config)


async def _timed_round(
    fleet: Fleet, admin: AdminClient, name: str, documents: list[str], config: BenchConfig
) -> RoundResult:
    def apply() -> tuple[int, float, float]:
        # Times taken in this thread: the event loop may be busy with arrivals meanwhile.
        called = time.monotonic()
        try:
            revision = admin.apply(documents, dry_run=False).revision
        except CliError as exc:
            raise SimError(f"apply failed: {exc}") from exc
        return revision, called, time.monotonic()

    revision, called, returned = await asyncio.to_thread(apply)
    total = len(fleet.agents)

    def arrived() -> bool:
        return all(agent.first_arrival_after(revision) is not None for agent in fleet.agents)

    await fleet.wait_for(arrived, config.deadline)
    arrivals = fleet.first_arrivals_after(revision)
    acked = await _wait_controller_in_sync(admin, total, config.deadline, required=False)
    return RoundResult(
        name=name,
        revision=revision,
        apply_seconds=returned - called,
        since_return=summarize([None if at is None else at - returned for at in arrivals]),
        since_call=summarize([None if at is None else at - called for at in arrivals]),
        acked_seconds=None if acked is None else acked - returned,
    )


async def _storm(
    fleet: Fleet, controller: LocalController, admin: AdminClient, config: BenchConfig
) -> StormResult:
    total = len(fleet.agents)
    snapshots_before = sum(agent.snapshots for agent in fleet.agents)
    mark = time.monotonic()
    await asyncio.to_thread(controller.stop)
    stopped = time.monotonic()
    await asyncio.to_thread(controller.start)
    listening = time.monotonic()
    done = await fleet.wait_for(
        lambda: fleet.resynced_since(mark) + len(fleet.given_up) >= total, config.storm_deadline
    )
    finished = time.monotonic()
    all_back = done and not fleet.given_up
    await _wait_controller_in_sync(admin, total, config.deadline, required=False)
    return StormResult(
        stop_seconds=stopped - mark,
        down_seconds=listening - mark,
        resync_seconds=finished - mark if all_back else None,
        resync_after_listening=finished - listening if all_back else None,
        resynced=fleet.resynced_since(mark),
        given_up=len(fleet.given_up),
        snapshots=sum(agent.snapshots for agent in fleet.agents) - snapshots_before,
        status=fleet.status(),
        controller_rss=controller.rss(),
    )


async def _wait_controller_in_sync(
    admin: AdminClient, expected: int, timeout: float, *, required: bool = True
) -> float | None:
    """Poll ListAgents until EXPECTED agents are connected with applied == desired; the
    monotonic time it held, or None (SimError if REQUIRED) after TIMEOUT."""
    deadline = time.monotonic() + timeout
    in_sync = 0
    while time.monotonic() < deadline:
        try:
            listed = await asyncio.to_thread(admin.list_agents)
        except CliError as exc:
            raise SimError(f"cannot list agents: {exc}") from exc
        in_sync = sum(
            1 for a in listed.agents
            if a.connected and a.desired_hash and a.applied_hash == a.desired_hash
        )  # fmt: skip
        if in_sync >= expected:
            return time.monotonic()
        await asyncio.sleep(max(_CONTROLLER_POLL_S, expected / _AGENTS_PER_POLL_SECOND))
    if required:
        raise SimError(
            f"the controller records {in_sync}/{expected} agents in sync after {timeout:.0f} s"
        )
    return None


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)
