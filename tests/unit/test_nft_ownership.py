"""The owner+persist claim: the netlink messages it sends and how it reads the kernel's
answers, over a socket pair standing in for the netlink socket; and how the backend
falls back when the kernel cannot own tables. The real kernel: tests/integration."""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from agent.dataplane import nft_ownership as own
from agent.dataplane.baseline import Baseline, Mode
from agent.dataplane.libnftables import JsonDocument, NftError
from agent.dataplane.nftables import NftablesBackend
from bulkhead.v1 import ruleset_pb2 as pb

TABLE = {"family": "inet", "name": "bulkhead"}


def _messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    found, offset = [], 0
    while offset < len(data):
        length, kind, flags, seq, _ = struct.unpack_from("=IHHII", data, offset)
        found.append((kind, flags, seq, data[offset + 16 : offset + length]))
        offset += (length + 3) & ~3
    return found


def _attributes(payload: bytes) -> dict[int, bytes]:
    found, offset = {}, 4  # after struct nfgenmsg
    while offset < len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        found[kind & ~own.NLA_F_NESTED] = payload[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


def _ack(seq: int, code: int) -> bytes:
    body = struct.pack("=i", -code) + struct.pack("=IHHII", 16, 0, 0, seq, 0)
    return struct.pack("=IHHII", 16 + len(body), own.NLMSG_ERROR, 0, seq, 0) + body


class FakeKernel:
    """Answers every acked message of one batch with CODE (an errno, 0 for success)."""

    def __init__(self, code: int = 0, answer: bool = True) -> None:
        self.ours, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sent: list[tuple[int, int, int, bytes]] = []
        self._thread = threading.Thread(target=self._serve, args=(code, answer), daemon=True)
        self._thread.start()

    def _serve(self, code: int, answer: bool) -> None:
        self.sent = _messages(self.kernel.recv(65536))
        if answer:
            acks = [_ack(seq, code) for _, flags, seq, _ in self.sent if flags & own.NLM_F_ACK]
            self.kernel.send(b"".join(acks))

    def close(self) -> None:
        self._thread.join(timeout=5)
        self.ours.close()
        self.kernel.close()


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    fake = FakeKernel()
    yield fake
    fake.close()


def test_claim_sends_one_batch_creating_an_owned_persistent_table(kernel: FakeKernel) -> None:
    own.claim_table(kernel.ours.fileno(), "bulkhead")
    kernel.close()
    kinds = [kind for kind, *_ in kernel.sent]
    newtable = (own.NFNL_SUBSYS_NFTABLES << 8) | own.NFT_MSG_NEWTABLE
    assert kinds == [own.NFNL_MSG_BATCH_BEGIN, newtable, own.NFNL_MSG_BATCH_END]
    _, flags, _, payload = kernel.sent[1]
    assert flags & own.NLM_F_CREATE
    assert flags & own.NLM_F_ACK
    assert payload[0] == own.NFPROTO_INET
    attributes = _attributes(payload)
    assert attributes[own.NFTA_TABLE_NAME] == b"bulkhead\0"
    assert struct.unpack("!I", attributes[own.NFTA_TABLE_FLAGS]) == (0x6,)


def test_replace_deletes_and_recreates_with_dropping_guard_chains(kernel: FakeKernel) -> None:
    own.claim_table(kernel.ours.fileno(), "bulkhead", replace=True)
    kernel.close()
    kinds = [kind & 0xFF for kind, *_ in kernel.sent[1:-1]]
    assert kinds == [own.NFT_MSG_DELTABLE, own.NFT_MSG_NEWTABLE, 3, 3]
    for _, _, _, payload in kernel.sent[3:5]:
        chain = _attributes(payload)
        assert struct.unpack("!I", chain[own.NFTA_CHAIN_POLICY]) == (own.NF_DROP,)
        assert chain[own.NFTA_CHAIN_TYPE] == b"filter\0"


@pytest.mark.parametrize(
    ("code", "says"),
    [(errno.EPERM, "owned by another running process"), (errno.EOPNOTSUPP, "cannot make")],
)
def test_a_refusal_raises_with_the_kernels_errno(code: int, says: str) -> None:
    fake = FakeKernel(code)
    try:
        with pytest.raises(own.OwnershipError, match=says) as raised:
            own.claim_table(fake.ours.fileno(), "bulkhead")
    finally:
        fake.close()
    assert raised.value.errno == code


def test_table_flags_reads_the_kernels_answer() -> None:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def serve() -> None:
        kind, _, seq, _ = _messages(kernel.recv(65536))[0]
        assert kind == (own.NFNL_SUBSYS_NFTABLES << 8) | own.NFT_MSG_GETTABLE
        body = struct.pack("!BBH", 1, 0, 0) + own._u32(own.NFTA_TABLE_FLAGS, 0x4)
        table = struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body
        kernel.send(table + _ack(seq, 0))
        kind, _, seq, _ = _messages(kernel.recv(65536))[0]
        kernel.send(_ack(seq, errno.ENOENT))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with ours, kernel:
        assert own.table_flags(ours.fileno(), "bulkhead") == 0x4
        assert own.table_flags(ours.fileno(), "bulkhead") is None
        thread.join(timeout=5)


def test_silence_is_a_timeout_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(own, "ACK_TIMEOUT_S", 0.2)
    fake = FakeKernel(answer=False)
    try:
        with pytest.raises(own.OwnershipError, match="no answer") as raised:
            own.claim_table(fake.ours.fileno(), "bulkhead")
    finally:
        fake.close()
    assert raised.value.errno == errno.ETIMEDOUT


def test_a_non_netlink_descriptor_is_refused() -> None:
    left, right = socket.socketpair()
    with left, right, pytest.raises(own.OwnershipError, match="not a netfilter netlink socket"):
        own.check_netfilter_socket(left.fileno())


class FakeOwner:
    """A runner that owns (or fails to own) the table; records batches and claims."""

    def __init__(self, claims: list[int | None], present: bool) -> None:
        self.claims = list(claims)  # per claim: None succeeds, an errno refuses
        self.claimed: list[bool] = []
        self.present = present
        self.batches: list[JsonDocument] = []

    def claim_table(self, name: str, *, replace: bool = False) -> None:
        self.claimed.append(replace)
        code = self.claims.pop(0)
        if code is not None:
            raise own.OwnershipError("refused", code)

    def table_flags(self, name: str) -> int | None:
        return 0 if self.present else None

    def json_cmd(self, document: JsonDocument, *, terse: bool = False) -> JsonDocument:
        self.batches.append(document)
        command = document["nftables"][0]
        if "table" in command.get("list", {}):
            return {"nftables": [{"chain": {"family": "inet", "table": "bulkhead", "name": "x"}}]}
        return {}


def _first_commands(document: JsonDocument) -> list[Any]:
    return [next(iter(c)) for c in document["nftables"][1:3]]


def test_an_owned_table_has_its_content_replaced_not_the_table() -> None:
    owner = FakeOwner([None], present=True)
    backend = NftablesBackend(owner, owner=owner)
    backend.apply(pb.Ruleset(), Baseline(Mode.ENFORCE))
    assert owner.claimed == [False]
    assert backend.owns_table
    applied = owner.batches[-1]["nftables"]
    assert applied[1] == {"flush": {"table": {"family": "inet", "name": "bulkhead"}}}
    assert applied[2] == {"delete": {"chain": {"family": "inet", "table": "bulkhead", "name": "x"}}}
    assert not any("table" in c.get("add", {}) for c in applied)


def test_an_unflagged_table_is_converted_in_one_transaction() -> None:
    owner = FakeOwner([errno.EOPNOTSUPP, None], present=True)
    backend = NftablesBackend(owner, owner=owner)
    backend.apply(pb.Ruleset(), Baseline(Mode.ENFORCE))
    assert owner.claimed == [False, True]
    assert backend.owns_table


def test_a_kernel_without_owned_tables_falls_back_to_replacing_the_table() -> None:
    owner = FakeOwner([errno.EOPNOTSUPP], present=False)
    backend = NftablesBackend(owner, owner=owner)
    backend.apply(pb.Ruleset(), Baseline(Mode.ENFORCE))
    assert not backend.owns_table
    assert _first_commands(owner.batches[-1]) == ["add", "delete"]
    backend.apply(pb.Ruleset(), Baseline(Mode.ENFORCE))
    assert owner.claimed == [False], "no second attempt once the kernel said no"


def test_a_table_owned_by_another_process_is_an_error_and_nothing_is_sent() -> None:
    owner = FakeOwner([errno.EPERM], present=True)
    with pytest.raises(own.OwnershipError, match="refused"):
        NftablesBackend(owner, owner=owner).apply(pb.Ruleset(), Baseline(Mode.ENFORCE))
    assert owner.batches == []


def _hosts(*hosts: str) -> pb.Ruleset:
    return pb.Ruleset(
        sets=[pb.AddressSet(name="db", hosts=list(hosts), networks=["198.19.0.0/24"])],
        rules=[
            pb.Rule(
                direction=pb.DIRECTION_INGRESS,
                protocol=pb.PROTOCOL_TCP,
                peer_set="db",
                action=pb.ACTION_ALLOW,
            )
        ],
    )


def _owned() -> tuple[FakeOwner, NftablesBackend]:
    owner = FakeOwner([None] * 10, present=True)
    return owner, NftablesBackend(owner, owner=owner)


def test_a_moved_peer_changes_set_elements_only() -> None:
    owner, backend = _owned()
    backend.apply(_hosts("198.18.0.1", "198.18.0.2"), Baseline(Mode.ENFORCE))
    backend.apply(_hosts("198.18.0.1", "198.18.0.3", "2001:db8::3"), Baseline(Mode.ENFORCE))
    assert owner.batches[-1]["nftables"][1:] == [
        {"delete": {"element": {"family": "inet", "table": "bulkhead", "name": "db_v4",
                                "elem": ["198.18.0.2"]}}},
        {"add": {"element": {"family": "inet", "table": "bulkhead", "name": "db_v4",
                             "elem": ["198.18.0.3"]}}},
        {"add": {"element": {"family": "inet", "table": "bulkhead", "name": "db_v6",
                             "elem": ["2001:db8::3"]}}},
    ]  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        "same policy again (a repair)",
        "a rule changed",
        "the baseline changed",
    ],
)
def test_anything_but_elements_replaces_the_table_content(change: str) -> None:
    owner, backend = _owned()
    backend.apply(_hosts("198.18.0.1"), Baseline(Mode.ENFORCE))
    ruleset, baseline = _hosts("198.18.0.1"), Baseline(Mode.ENFORCE)
    if change == "a rule changed":
        ruleset.rules[0].protocol = pb.PROTOCOL_UDP
    elif change == "the baseline changed":
        baseline = Baseline(Mode.VISIBILITY)
    backend.apply(ruleset, baseline)
    assert owner.batches[-1]["nftables"][1] == {"flush": {"table": TABLE}}


def test_a_refused_element_update_falls_back_to_a_full_replace() -> None:
    owner, backend = _owned()
    backend.apply(_hosts("198.18.0.1"), Baseline(Mode.ENFORCE))
    original = owner.json_cmd

    def refuse_elements(document: JsonDocument, *, terse: bool = False) -> JsonDocument:
        if "element" in str(document["nftables"][1:2]):
            raise NftError("Error: Could not process rule: No such file or directory")
        return original(document, terse=terse)

    owner.json_cmd = refuse_elements  # type: ignore[method-assign]
    backend.apply(_hosts("198.18.0.9"), Baseline(Mode.ENFORCE))
    assert owner.batches[-1]["nftables"][1] == {"flush": {"table": TABLE}}


def test_an_unowned_table_is_always_replaced_whole() -> None:
    runner = FakeOwner([], present=True)
    backend = NftablesBackend(runner)  # no owner: a kernel without owned tables
    backend.apply(_hosts("198.18.0.1"), Baseline(Mode.ENFORCE))
    backend.apply(_hosts("198.18.0.2"), Baseline(Mode.ENFORCE))
    assert [next(iter(c)) for c in runner.batches[-1]["nftables"][1:3]] == ["add", "delete"]
