"""Policy convergence and reconnect storm with N simulated agents on one controller.

Starts its own bulkhead-controller on 127.0.0.1 (free ports, temporary state dir,
metrics on another port), enrolls N simulated agents (controller.sim; credentials cached
in --workdir if given, so a second run does not enroll again), waits until all are up
and in sync, then:
* rounds: applies a policy that changes every agent's ruleset (a ring over --groups label
  groups: app=appI may reach app=app(I+1) on one TCP port; later rounds change the port)
  and prints, per round, the latency from the apply call's return to each agent's new
  snapshot (p50/p90/p99/max, and how many never arrived within --deadline);
* controller RSS with N agents connected (psutil on its pid), its peak, and the CPU the
  controller and this process (the simulator) spent;
* reconnect storm: SIGTERM the controller, start it again on the same port and state dir,
  and time until every agent is answered (InSync or a snapshot) on a new stream; how many
  gave up.
Prints figures beside issue 7's targets; asserts nothing. Needs no root and no namespace.
  .venv/bin/python bench/convergence_bench.py --agents 1000 [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from controller.gc_tuning import tune_for_many_streams
from controller.sim.benchmark import BenchConfig, BenchReport, StormResult, run_benchmark
from controller.sim.errors import SimError
from controller.sim.fleet import DEFAULT_HEARTBEAT_S, FleetOptions

MIB = 1024 * 1024
TARGET_P99_S = 2.0
TARGET_RSS = 1024 * MIB
TARGET_RESYNC_S = 30.0


def _parse(argv: list[str]) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--groups", type=int, default=100, help="label groups (app=app0..)")
    parser.add_argument("--workdir", type=Path, help="keep controller state and credentials")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds per round")
    parser.add_argument("--enroll-concurrency", type=int, default=50)
    parser.add_argument("--connect-concurrency", type=int, default=200)
    parser.add_argument("--heartbeat-interval", type=float, default=DEFAULT_HEARTBEAT_S)
    parser.add_argument("--no-storm", action="store_true", help="skip the reconnect storm")
    parser.add_argument("--storm-deadline", type=float, default=120.0)
    parser.add_argument("--controller-log-level", default="info")
    parser.add_argument(
        "--profile-controller",
        type=Path,
        help="run the controller under cProfile; FILE.1.prof, FILE.2.prof per start",
    )
    args = parser.parse_args(argv)
    if args.groups < 1 or args.rounds < 1:
        parser.error("--groups and --rounds must be at least 1")
    return BenchConfig(
        agents=args.agents,
        groups=min(args.groups, args.agents),
        workdir=args.workdir,
        enroll_concurrency=args.enroll_concurrency,
        fleet=FleetOptions(
            heartbeat_interval=args.heartbeat_interval,
            connect_concurrency=args.connect_concurrency,
        ),
        rounds=args.rounds,
        deadline=args.deadline,
        storm=not args.no_storm,
        storm_deadline=args.storm_deadline,
        profile=args.profile_controller,
        controller_log_level=args.controller_log_level,
    )


def _verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def _mib(size: int) -> str:
    return f"{size / MIB:.0f} MiB"


def _share(cpu: float, wall: float) -> str:
    return f"{cpu:.1f} s ({100 * cpu / wall:.0f}% of a core)" if wall > 0 else f"{cpu:.1f} s"


def _print_rounds(report: BenchReport) -> None:
    for result in report.rounds:
        acked = "-" if result.acked_seconds is None else f"{result.acked_seconds:.2f} s"
        print(f"\n{result.name} (revision {result.revision}): "
              f"apply call took {result.apply_seconds * 1000:.0f} ms")  # fmt: skip
        print(f"  since apply returned: {result.since_return.describe()}")
        print(f"  since apply called:   {result.since_call.describe()}")
        print(f"  controller records every ack {acked} after the apply returned")
    last = report.rounds[-1].since_return
    ok = last.missing == 0 and last.p99 < TARGET_P99_S
    print(f"last round p99 {last.p99:.3f} s, target < {TARGET_P99_S:g} s: {_verdict(ok)}")


def _print_storm(storm: StormResult, agents: int) -> None:
    print(f"\nreconnect storm: controller stopped in {storm.stop_seconds:.1f} s, "
          f"listening again {storm.down_seconds:.1f} s after SIGTERM")  # fmt: skip
    if storm.resync_seconds is None or storm.resync_after_listening is None:
        print(f"  NOT all resynced: {storm.resynced}/{agents}, {storm.given_up} gave up")
    else:
        print(f"  all {agents} resynced {storm.resync_seconds:.1f} s after SIGTERM "
              f"({storm.resync_after_listening:.1f} s after it listened again)")  # fmt: skip
    ok = storm.resync_seconds is not None and storm.resync_seconds < TARGET_RESYNC_S
    print(f"  {storm.given_up} gave up, {storm.snapshots} snapshots re-sent (InSync expected); "
          f"target all within {TARGET_RESYNC_S:g} s, none given up: {_verdict(ok)}")  # fmt: skip
    print(f"  streams: {storm.status.describe()}")
    for ending, example in storm.status.examples.items():
        print(f"    {ending}: e.g. {example!r}")
    print(f"  controller RSS after the storm: {_mib(storm.controller_rss)}")


def _print(report: BenchReport, config: BenchConfig) -> None:
    print(f"\n== {report.agents} simulated agents, {config.groups} label groups, "
          f"heartbeat {config.fleet.heartbeat_interval:g} s ==")  # fmt: skip
    enroll = report.enroll
    print(f"credentials: {enroll.reused} reused, {enroll.enrolled} enrolled "
          f"in {enroll.seconds:.1f} s; all up in {report.connect_seconds:.1f} s")  # fmt: skip
    _print_rounds(report)
    peak = report.controller_rss_peak
    rss = report.controller_rss_connected
    print(f"\ncontroller RSS with {report.agents} agents connected: {_mib(rss)} "
          f"({_verdict(rss < TARGET_RSS)} < {_mib(TARGET_RSS)}); peak over the whole "
          f"run, storm included: {_mib(peak)} ({_verdict(peak < TARGET_RSS)})")  # fmt: skip
    print(f"CPU in the rounds ({report.rounds_wall:.1f} s): "
          f"controller {_share(report.controller_cpu_rounds, report.rounds_wall)}, "
          f"simulator {_share(report.sim_cpu_rounds, report.rounds_wall)}")  # fmt: skip
    print(f"simulator: RSS {_mib(report.sim_rss)}, "
          f"CPU {report.sim_cpu_total:.1f} s since the fleet started")  # fmt: skip
    pushed = report.metrics.get("bulkhead_controller_snapshots_pushed_total", float("nan"))
    connected = report.metrics.get("bulkhead_controller_connected_agents", float("nan"))
    print(f"controller metrics after the rounds: {connected:.0f} connected, "
          f"{pushed:.0f} snapshots pushed since it started")  # fmt: skip
    if report.storm is not None:
        _print_storm(report.storm, report.agents)
    print(f"\ntotal {report.wall_total:.0f} s")


def main(argv: list[str]) -> int:
    config = _parse(argv)
    start = time.monotonic()

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - start:6.1f} s] {line}", file=sys.stderr, flush=True)

    try:
        tune_for_many_streams()  # the simulator holds as many streams as the controller
        report = asyncio.run(run_benchmark(config, progress))
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print(report, config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
