"""A controller process of the simulator's own on 127.0.0.1, for benchmarks and tests:
started, stopped (SIGTERM), started again on the same port and state dir, measured with
psutil, its metrics scraped. Optionally under cProfile, one profile file per start."""

from __future__ import annotations

import contextlib
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

import psutil  # type: ignore[import-untyped]

from controller.sim.errors import SimError

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
_POLL_S = 0.05
# Descriptors beyond one socket per agent: the store, logs, grpc's own, a margin.
_SPARE_FILES = 1024
# Runs the controller under cProfile: argv[1] is the output file, the rest its options.
# cProfile.run() writes the profile when main() returns after SIGTERM.
_PROFILED = (
    "import cProfile, sys\n"
    "from controller.server.main import main\n"
    "out = sys.argv[1]\n"
    "sys.argv = ['bulkhead-controller', *sys.argv[2:]]\n"
    "cProfile.run('main()', out)\n"
)


def program(name: str) -> str:
    """A Bulkhead program: beside the running interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SimError(f"`{name}` is not installed (looked in {beside.parent} and PATH)")
    return found


def free_port_pair() -> int:
    """A port P on 127.0.0.1 such that P and P + 1 (the enrollment port) are both free."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise SimError("no two consecutive free ports on 127.0.0.1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raise_open_files_limit(agents: int) -> None:
    """Let this process (and the controller it starts) hold a socket per agent."""
    needed = agents + _SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), max(hard, needed)))
    except (ValueError, OSError) as exc:
        raise SimError(
            f"--agents {agents} needs about {needed} open files, the limit is {soft} "
            f"(hard {hard}) and cannot be raised ({exc}): raise `ulimit -n`"
        ) from exc


class LocalController:
    """bulkhead-controller on 127.0.0.1:PORT (enrollment on PORT + 1)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        port: int,
        metrics_port: int,
        log: Path,
        log_level: str = "info",
        profile: Path | None = None,
        trusted_label_keys: tuple[str, ...] = (),
    ) -> None:
        self.state_dir = state_dir
        # The simulated hosts report their labels in the hello; the controller compiles
        # those keys only when told to trust them (--trust-host-label-keys).
        self._trusted_label_keys = trusted_label_keys
        self.port = port
        self.metrics_port = metrics_port
        self.log = log
        self._log_level = log_level
        self._profile = profile
        self._process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.pids: list[int] = []  # of every process started, for checking they are gone

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def enroll_address(self) -> str:
        return f"127.0.0.1:{self.port + 1}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise SimError("the controller is not running")
        return self._process.pid

    def issue_operator(self, out: Path) -> Path:
        """An admin certificate in OUT (operator.crt, operator.key, ca.crt)."""
        argv = [program("bulkhead-controller"), "admin-cert",
                "--state-dir", str(self.state_dir), "--name", "bulkhead-sim",
                "--role", "admin", "--out", str(out)]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise SimError(f"bulkhead-controller admin-cert failed: {done.stderr.strip()}")
        return out

    def start(self) -> None:
        """Start the controller and wait until it accepts connections (bounded)."""
        if self._process is not None:
            raise SimError("the controller is already running")
        options = ["--listen", self.address, "--state-dir", str(self.state_dir),
                   "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                   "--log-level", self._log_level]  # fmt: skip
        if self._trusted_label_keys:
            options += ["--trust-host-label-keys", ",".join(self._trusted_label_keys)]
        if self._profile is None:
            argv = [program("bulkhead-controller"), *options]
        else:
            out = self._profile.with_suffix(f".{self.starts + 1}{self._profile.suffix}")
            argv = [sys.executable, "-c", _PROFILED, str(out), *options]
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1
        self.pids.append(self._process.pid)
        self._wait_listening()

    def stop(self) -> None:
        """SIGTERM, wait for the exit (SIGKILL after STOP_TIMEOUT_S); no-op if not running."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)

    def rss(self) -> int:
        """Resident set size in bytes."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def cpu_seconds(self) -> float:
        """User and system CPU time so far."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def metrics(self) -> dict[str, float]:
        """The controller's Prometheus samples without labels, by name."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if line.startswith("#") or "{" in name or not value:
                continue
            with contextlib.suppress(ValueError):
                samples[name] = float(value)
        return samples

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                self._process = None
                raise SimError(f"the controller exited during start; see {self.log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(_POLL_S)
        self.stop()
        raise SimError(
            f"the controller did not listen within {START_TIMEOUT_S:.0f} s; see {self.log}"
        )

    def __enter__(self) -> LocalController:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
