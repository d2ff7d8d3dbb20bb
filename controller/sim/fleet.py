"""N simulated agents in one asyncio process.

Each agent keeps its stream up as the real agent does: when a stream fails, is cancelled
(grpc cancels some calls when a burst of connections arrives) or is ended by the
controller, it reconnects after a full-jitter exponential backoff. At most
`connect_concurrency` agents are between dialling and their first answer at any time, so
the simulator's own process does not turn a reconnect into a stampede it cannot serve. An
agent that fails `max_attempts` times in a row without ever being answered gives up and
is counted.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from controller.sim.agents import ResyncNeeded, SimAgent

# As the real agent (agent/link.py): 0.5 s doubling to 30 s, reset after a stable stream.
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_STREAM_S = 5.0
DEFAULT_MAX_ATTEMPTS = 12
DEFAULT_CONNECT_CONCURRENCY = 200
DEFAULT_HEARTBEAT_S = 30.0  # the real agent's default
_POLL_S = 0.1


class Backoff:
    """Full-jitter exponential backoff: the n-th delay is uniform in
    [initial / 2, min(maximum, initial * 2**n)]."""

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL_S,
        maximum: float = BACKOFF_MAX_S,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"backoff: need 0 < initial ({initial}) <= maximum ({maximum})")
        self._initial = initial
        self._maximum = maximum
        self._rng = rng or random.Random()
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        # min() before the power would overflow after ~1000 attempts; cap the exponent.
        ceiling = min(self._maximum, self._initial * 2 ** min(self._attempt, 64))
        self._attempt += 1
        return self._rng.uniform(self._initial / 2, ceiling)


@dataclass(frozen=True)
class FleetOptions:
    heartbeat_interval: float = DEFAULT_HEARTBEAT_S
    connect_concurrency: int = DEFAULT_CONNECT_CONCURRENCY
    backoff_initial: float = BACKOFF_INITIAL_S
    backoff_max: float = BACKOFF_MAX_S
    # Consecutive attempts that were never answered before an agent gives up.
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    stable_after: float = STABLE_STREAM_S


@dataclass
class FleetStatus:
    agents: int
    up: int
    given_up: int
    streams_opened: int
    # how streams ended: a gRPC status name, "ended" (closed by the controller), "resync"
    endings: Counter[str] = field(default_factory=Counter)
    # the first message seen per ending, for telling e.g. two kinds of INTERNAL apart
    examples: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        endings = ", ".join(f"{name} {count}" for name, count in self.endings.most_common())
        return (
            f"{self.up}/{self.agents} up, {self.given_up} given up, "
            f"{self.streams_opened} streams opened" + (f" (ended: {endings})" if endings else "")
        )


class Fleet:
    def __init__(
        self,
        agents: Sequence[SimAgent],
        options: FleetOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agents = list(agents)
        self.options = options
        self._clock = clock
        self._slots = asyncio.Semaphore(options.connect_concurrency)
        self._tasks: list[asyncio.Task[None]] = []
        self.given_up: dict[str, str] = {}  # agent id -> how its last attempt ended
        self.endings: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.streams_opened = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep(agent)) for agent in self.agents]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def status(self) -> FleetStatus:
        return FleetStatus(
            agents=len(self.agents),
            up=sum(agent.up for agent in self.agents),
            given_up=len(self.given_up),
            streams_opened=self.streams_opened,
            endings=Counter(self.endings),
            examples=dict(self.examples),
        )

    def resynced_since(self, moment: float) -> int:
        """Agents whose current stream was answered at or after MOMENT."""
        return sum(
            1
            for agent in self.agents
            if agent.up and agent.synced_at is not None and agent.synced_at >= moment
        )

    def first_arrivals_after(self, revision: int) -> list[float | None]:
        """Per agent, when its first snapshot newer than REVISION arrived (None: not yet)."""
        return [agent.first_arrival_after(revision) for agent in self.agents]

    async def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Poll CONDITION until it holds (True) or TIMEOUT seconds pass (False)."""
        deadline = self._clock() + timeout
        while not condition():
            if self._clock() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    async def _keep(self, agent: SimAgent) -> None:
        options = self.options
        backoff = Backoff(options.backoff_initial, options.backoff_max)
        unanswered = 0
        while True:
            await self._slots.acquire()
            held = True

            def release() -> None:
                nonlocal held
                if held:
                    held = False
                    self._slots.release()

            opened = self._clock()
            self.streams_opened += 1
            try:
                await agent.stream(heartbeat_interval=options.heartbeat_interval, on_up=release)
                ending = "ended"
            except grpc.aio.AioRpcError as exc:
                ending = exc.code().name
                self.examples.setdefault(ending, exc.details() or "")
            except ResyncNeeded:
                ending = "resync"
            except Exception as exc:  # like the agent: whatever it was, try again
                ending = type(exc).__name__
                self.examples.setdefault(ending, str(exc))
            finally:
                release()
            self.endings[ending] += 1
            answered = agent.synced_at is not None and agent.synced_at >= opened
            if answered:
                unanswered = 0
                if self._clock() - opened >= options.stable_after:
                    backoff.reset()
            else:
                unanswered += 1
                if unanswered >= options.max_attempts:
                    self.given_up[agent.agent_id] = ending
                    return
            await asyncio.sleep(backoff.next_delay())
