"""bulkhead-sim: command-line checks (no controller is contacted) and the bench's policy
and collector pause."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from controller.policy import Policy, parse_documents
from controller.sim.benchmark import collector_paused, ring_policy, round_names
from controller.sim.errors import SimError
from controller.sim.main import enrollment_address, host_port, main
from controller.sim.spec import parse_label_pattern


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_run_refuses_a_bad_label_pattern_before_doing_anything(tmp_path: Path) -> None:
    code, output = _run(
        "run", "--controller", "127.0.0.1:1", "--credentials", str(tmp_path),
        "--agents", "3", "--labels-from", "app=a{5..1}",
    )  # fmt: skip
    assert code == 2
    assert "--labels-from 'app=a{5..1}': range {5..1} runs backwards" in output


def test_run_refuses_a_controller_that_is_not_host_port(tmp_path: Path) -> None:
    code, output = _run(
        "run", "--controller", "localhost", "--credentials", str(tmp_path), "--agents", "3"
    )  # fmt: skip
    assert code == 2
    assert "--controller 'localhost': expected HOST:PORT" in output


def test_run_refuses_more_agents_than_addresses(tmp_path: Path) -> None:
    code, output = _run(
        "run", "--controller", "127.0.0.1:1", "--credentials", str(tmp_path),
        "--agents", "200000",
    )  # fmt: skip
    assert code == 2
    assert "--agents: 200000 must be between 1 and 131070" in output


def test_run_refuses_a_backoff_that_starts_above_its_maximum(tmp_path: Path) -> None:
    code, output = _run(
        "run", "--controller", "127.0.0.1:1", "--credentials", str(tmp_path), "--agents", "1",
        "--backoff-initial", "5", "--backoff-max", "1",
    )  # fmt: skip
    assert code == 2
    assert "--backoff-initial" in output


def test_enroll_without_tokens_says_how_to_get_them(tmp_path: Path) -> None:
    # Nothing is cached and no token is given: refused before dialling anything.
    code, output = _run(
        "enroll", "--controller", "127.0.0.1:1", "--credentials", str(tmp_path), "--agents", "2"
    )  # fmt: skip
    assert code == 1
    assert "2 agent(s) have no credentials" in output
    assert "--token or --operator-credentials" in output


@pytest.mark.parametrize("value", ["127.0.0.1", "127.0.0.1:", ":80", "host:0", "h:70000", "h:x"])
def test_host_port_refuses(value: str) -> None:
    with pytest.raises(SimError, match="--controller"):
        host_port(value, "--controller")


def test_host_port_accepts_ipv6_in_brackets() -> None:
    assert host_port("[2001:db8::1]:50151", "--controller") == "[2001:db8::1]:50151"


def test_the_enrollment_port_is_the_next_one() -> None:
    assert enrollment_address("127.0.0.1:50151") == "127.0.0.1:50152"
    assert enrollment_address("[2001:db8::1]:9") == "[2001:db8::1]:10"


def test_the_ring_policy_puts_every_group_on_both_sides_and_validates() -> None:
    pattern = parse_label_pattern("app=app{0..2}")
    documents = ring_policy(pattern, 8081)
    (policy,) = parse_documents(documents)
    assert isinstance(policy, Policy)
    rules = json.loads(documents[0])["spec"]["rules"]
    assert [(r["from"]["app"], r["to"]["app"]) for r in rules] == [
        ("app0", "app1"), ("app1", "app2"), ("app2", "app0"),
    ]  # fmt: skip
    assert {port for r in rules for port in r["ports"]} == {"tcp/8081"}


def test_rounds_create_the_policy_then_change_its_port() -> None:
    assert round_names(3) == [
        ("policy created (tcp/8080)", 8080),
        ("port changed to tcp/8081", 8081),
        ("port changed to tcp/8082", 8082),
    ]


def test_the_collector_is_paused_while_a_round_is_timed_and_restored_after() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a round failed")
    assert gc.isenabled(), "restored when the round fails"
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled(), "left off when it was off"
    finally:
        gc.enable()
