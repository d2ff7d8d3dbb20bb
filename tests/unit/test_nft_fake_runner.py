"""NftablesBackend against a recording fake runner: one batch per call, nothing on bad input."""

from __future__ import annotations

from typing import Any

import pytest

from agent.dataplane.backend import Backend, RulesetError
from agent.dataplane.baseline import Baseline, Mode
from agent.dataplane.libnftables import JsonDocument, NftError
from agent.dataplane.nftables import NftablesBackend, render
from bulkhead.v1 import ruleset_pb2 as pb

BASELINE = Baseline(Mode.ENFORCE)
TABLE = {"family": "inet", "name": "bulkhead"}


class RecordingRunner:
    """Records every batch; answers with `reply` or raises `error`."""

    def __init__(self, reply: JsonDocument | None = None, error: NftError | None = None) -> None:
        self.batches: list[JsonDocument] = []
        self.reply = reply or {}
        self.error = error

    def json_cmd(self, document: JsonDocument) -> JsonDocument:
        self.batches.append(document)
        if self.error is not None:
            raise self.error
        return self.reply


def listing(*tables: dict[str, Any]) -> JsonDocument:
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *({"table": t} for t in tables)]}


def test_backend_satisfies_the_protocol() -> None:
    backend: Backend = NftablesBackend(RecordingRunner())
    assert backend.is_present() is False


def test_apply_sends_the_rendered_document_as_one_batch() -> None:
    runner = RecordingRunner()
    ruleset = pb.Ruleset(sets=[pb.AddressSet(name="web", hosts=["198.18.0.1"])])
    NftablesBackend(runner).apply(ruleset, BASELINE)
    assert runner.batches == [render(ruleset, BASELINE)]


def test_apply_of_a_bad_ruleset_sends_nothing() -> None:
    runner = RecordingRunner()
    bad = pb.Ruleset(rules=[pb.Rule(peer_set="missing")])
    with pytest.raises(RulesetError, match=r"rules\[0\]"):
        NftablesBackend(runner).apply(bad, BASELINE)
    assert runner.batches == []


def test_nft_errors_reach_the_caller() -> None:
    runner = RecordingRunner(error=NftError("Error: Could not process rule"))
    with pytest.raises(NftError, match="Could not process rule"):
        NftablesBackend(runner).apply(pb.Ruleset(), BASELINE)


def test_remove_deletes_only_our_table() -> None:
    runner = RecordingRunner(reply=listing(TABLE))
    NftablesBackend(runner).remove()
    assert runner.batches[-1] == {"nftables": [{"delete": {"table": TABLE}}]}


def test_remove_of_an_absent_table_changes_nothing() -> None:
    runner = RecordingRunner(reply=listing({"family": "inet", "name": "other"}))
    NftablesBackend(runner).remove()
    assert all("delete" not in str(batch) for batch in runner.batches)


def test_remove_while_the_agent_owns_the_table_says_to_stop_it() -> None:
    class OwnedElsewhere(RecordingRunner):
        def json_cmd(self, document: JsonDocument) -> JsonDocument:
            if "delete" in str(document):
                raise NftError("Error: Could not process rule: Operation not permitted")
            return listing(TABLE)

    with pytest.raises(NftError, match="owned by a running bulkhead-agent; stop the agent"):
        NftablesBackend(OwnedElsewhere()).remove()


@pytest.mark.parametrize(
    ("tables", "present"),
    [
        ([], False),
        ([{"family": "ip", "name": "bulkhead"}, {"family": "inet", "name": "other"}], False),
        ([{"family": "inet", "name": "other"}, {"family": "inet", "name": "bulkhead"}], True),
    ],
)
def test_is_present_looks_for_inet_bulkhead(tables: list[dict[str, Any]], present: bool) -> None:
    runner = RecordingRunner(reply=listing(*tables))
    assert NftablesBackend(runner).is_present() is present
    assert runner.batches == [{"nftables": [{"list": {"tables": None}}]}]
