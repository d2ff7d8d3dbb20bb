"""Policy change to enforcement, end to end in a namespace lab (run as root).

Measures, over several rounds on web/db/other with examples/web-db.yaml:
* relabel -> access: `bulkhead label agent other app=web` until other reaches db:5432;
* delete -> cut: `bulkhead delete policy` until an established web->db:5432 connection
  stops echoing (its conntrack entries deleted).
Both include the CLI's own start (a new Python process, about 0.2 s here).
Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lab.lifecycle import add_listener, down, up
from lab.spec import parse_host_specs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the lab helpers of the test suite are not installed
from tests.integration.labfixture import Lab, lab_unavailable  # noqa: E402

POLICY = ROOT / "examples" / "web-db.yaml"
_ECHO_WAIT = 0.05  # seconds a ping may take before the connection counts as cut


def _cut_after(lab: Lab) -> float:
    with lab.connect("web", "db", 5432) as conn:
        conn.sendall(b"x\n")
        conn.recv(8)
        conn.settimeout(_ECHO_WAIT)
        start = time.monotonic()
        lab.ok("delete", "policy", "web-to-db")
        while time.monotonic() - start < 5:
            try:
                conn.sendall(b"p\n")
                if conn.recv(8) != b"p\n":
                    break
            except OSError:
                break
        return time.monotonic() - start


def measure(rounds: int) -> tuple[list[float], list[float]]:
    relabel: list[float] = []
    cut: list[float] = []
    directory = Path(tempfile.mkdtemp(prefix="bulkhead-bench-")) / "lab"
    try:
        up(directory, parse_host_specs(["web:app=web", "db:app=db", "other:app=other"]))
        add_listener(directory, "db", [5433], udp=False)
        lab = Lab(directory)
        echo = lab.start_echo("db", 5432)
        try:
            lab.ok("apply", "-f", str(POLICY))
            lab.wait_in_sync()
            for _ in range(rounds):
                start = time.monotonic()
                lab.ok("label", "agent", "other", "app=web")
                reached = lab.probe_until("other", "db", 5432, want=True, within=5)
                relabel.append(time.monotonic() - start if reached is not None else float("nan"))
                lab.ok("label", "agent", "other", "app=other")
                lab.wait_in_sync()
                cut.append(_cut_after(lab))
                lab.ok("apply", "-f", str(POLICY))
                lab.wait_in_sync()
        finally:
            echo.terminate()
            echo.wait(5)
    finally:
        down(directory)
    return relabel, cut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    reason = lab_unavailable()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    relabel, cut = measure(args.rounds)
    print(f"{'measure':<22} {'median s':>9} {'min s':>7} {'max s':>7}  (n={args.rounds})")
    for name, values in (("relabel -> access", relabel), ("delete -> flow cut", cut)):
        print(
            f"{name:<22} {statistics.median(values):>9.3f} {min(values):>7.3f} {max(values):>7.3f}"
        )


if __name__ == "__main__":
    main()
