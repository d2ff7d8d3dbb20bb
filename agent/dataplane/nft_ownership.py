"""Owning our nftables table: the kernel's `owner` and `persist` table flags (Linux 6.9+).

An owned table can be changed only through the netlink socket that owns it, so a root
user's `nft flush table`, an inserted accept rule or an emptied set is refused by the
kernel instead of being repaired after the fact. `persist` keeps the table (and so the
enforcement) when the owner dies; the table is then an orphan, and a restarted agent
takes it back. nft 1.0.6 can write `owner` but not `persist`, and the flags must be set
when the table is created, so we send that one NEWTABLE message ourselves, on
libnftables' own socket: the owner is a socket, and every later batch of ours must come
through the same one.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections.abc import Iterable

from agent.dataplane.backend import DataplaneError

NETLINK_NETFILTER = 12
NFPROTO_INET = 1
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWTABLE = 0
NFT_MSG_GETTABLE = 1
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWCHAIN = 3
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NFTA_TABLE_NAME, NFTA_TABLE_FLAGS = 1, 2
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY = 1, 3, 4, 5
NFTA_CHAIN_TYPE = 7
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT = 1, 3
NF_DROP = 0
NFT_TABLE_F_OWNER = 0x2
NFT_TABLE_F_PERSIST = 0x4
OWNED_FLAGS = NFT_TABLE_F_OWNER | NFT_TABLE_F_PERSIST
ACK_TIMEOUT_S = 5.0
# Base chains that drop everything while a table is replaced by an owned one (migration):
# the content batch that follows deletes them. Fail closed for those milliseconds.
GUARD_CHAINS = (
    ("ownership_guard_in", NF_INET_LOCAL_IN),
    ("ownership_guard_out", NF_INET_LOCAL_OUT),
)


class OwnershipError(DataplaneError):
    """The kernel refused to give us the table; `errno` says why."""

    def __init__(self, message: str, error: int) -> None:
        super().__init__(message)
        self.errno = error


def check_netfilter_socket(fd: int) -> None:
    """Raise OwnershipError unless FD is a netlink netfilter socket."""
    try:
        probe = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        raise OwnershipError(f"fd {fd} is not a socket: {exc}", errno.EBADF) from exc
    with probe:
        if probe.family != socket.AF_NETLINK or probe.proto != NETLINK_NETFILTER:
            raise OwnershipError(f"fd {fd} is not a netfilter netlink socket", errno.EBADF)


def claim_table(fd: int, name: str, *, replace: bool = False) -> None:
    """Create table inet NAME owned by FD's socket and persistent, or take back the orphan.

    A table we already own is left as it is. With REPLACE, an existing table without the
    flags is deleted and created again in the same transaction, with guard chains that
    drop every packet until the caller's next batch fills the table.
    """
    messages = []
    if replace:
        messages.append((NFT_MSG_DELTABLE, 0, _table_attributes(name, None)))
    messages.append((NFT_MSG_NEWTABLE, NLM_F_CREATE, _table_attributes(name, OWNED_FLAGS)))
    if replace:
        for chain, hook in GUARD_CHAINS:
            messages.append((NFT_MSG_NEWCHAIN, NLM_F_CREATE, _guard_chain(name, chain, hook)))
    _transact(fd, messages)


def table_flags(fd: int, name: str) -> int | None:
    """The flags of table inet NAME, or None if there is none.

    Asked over netlink rather than through libnftables: nft 1.0.6 prints a table whose
    only flag is `persist` (an orphan) as broken JSON."""
    seq = int(time.monotonic_ns() & 0x3FFFFFFF)
    msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE
    request = _message(
        msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, NFPROTO_INET, _table_attributes(name, None)
    )
    try:
        os.write(fd, request)
    except OSError as exc:
        raise OwnershipError(f"cannot send to netlink: {exc}", exc.errno or errno.EIO) from exc
    flags: int | None = None
    try:
        for payload in _await_acks(fd, {seq}):
            value = _find_attribute(payload[4:], NFTA_TABLE_FLAGS)
            flags = struct.unpack("!I", value)[0] if value is not None else 0
    except OwnershipError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return flags


def _find_attribute(attributes: bytes, wanted: int) -> bytes | None:
    offset = 0
    while offset + 4 <= len(attributes):
        length, kind = struct.unpack_from("=HH", attributes, offset)
        if length < 4:
            return None
        if kind & ~NLA_F_NESTED == wanted:
            return attributes[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return None


def _transact(fd: int, messages: Iterable[tuple[int, int, bytes]]) -> None:
    seq = int(time.monotonic_ns() & 0x3FFFFFFF)
    begin = _message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, socket.AF_UNSPEC, b"", batch=True)
    parts = [begin]
    expected: list[int] = []
    for offset, (kind, flags, payload) in enumerate(messages, start=1):
        msg_type = (NFNL_SUBSYS_NFTABLES << 8) | kind
        all_flags = NLM_F_REQUEST | NLM_F_ACK | flags
        parts.append(_message(msg_type, all_flags, seq + offset, NFPROTO_INET, payload))
        expected.append(seq + offset)
    end_seq = seq + len(expected) + 1
    end = _message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end_seq, socket.AF_UNSPEC, b"", batch=True)
    parts.append(end)
    try:
        os.write(fd, b"".join(parts))
    except OSError as exc:
        raise OwnershipError(f"cannot send to netlink: {exc}", exc.errno or errno.EIO) from exc
    _await_acks(fd, set(expected))


def _await_acks(fd: int, pending: set[int]) -> list[bytes]:
    """Read one ack per message; raise on the first error the kernel reports. Returns the
    payloads of the other (answer) messages that came with them."""
    answers: list[bytes] = []
    first_error = 0
    deadline = time.monotonic() + ACK_TIMEOUT_S
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise OwnershipError("no answer from netlink while claiming the table", errno.ETIMEDOUT)
        data = os.read(fd, 65536)
        for msg_type, seq, payload in _split(data):
            if msg_type != NLMSG_ERROR:
                answers.append(payload)
                continue
            if len(payload) < 4:
                continue
            (code,) = struct.unpack_from("=i", payload)
            pending.discard(seq)
            if code and not first_error:
                first_error = -code
    if first_error:
        raise OwnershipError(_explain(first_error), first_error)
    return answers


def _explain(error: int) -> str:
    reason = os.strerror(error)
    if error == errno.EPERM:
        return f"table inet is owned by another running process ({reason})"
    if error == errno.EOPNOTSUPP:
        return f"the kernel cannot make this table owned and persistent ({reason})"
    return f"the kernel refused to claim the table ({reason})"


def _split(data: bytes) -> Iterable[tuple[int, int, bytes]]:
    offset = 0
    while offset + 16 <= len(data):
        length, msg_type, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16 or offset + length > len(data):
            return
        yield msg_type, seq, data[offset + 16 : offset + length]
        offset += (length + 3) & ~3


def _message(
    msg_type: int, flags: int, seq: int, family: int, attributes: bytes, *, batch: bool = False
) -> bytes:
    res_id = NFNL_SUBSYS_NFTABLES if batch else 0
    body = struct.pack("!BBH", family, 0, res_id) + attributes
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


def _attribute(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _string(kind: int, text: str) -> bytes:
    return _attribute(kind, text.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attribute(kind, struct.pack("!I", value))


def _table_attributes(name: str, flags: int | None) -> bytes:
    attributes = _string(NFTA_TABLE_NAME, name)
    if flags is not None:
        attributes += _u32(NFTA_TABLE_FLAGS, flags)
    return attributes


def _guard_chain(table: str, chain: str, hook: int) -> bytes:
    # Priority -1000: before every other filter chain, so nothing is let in past it.
    hook_spec = _u32(NFTA_HOOK_HOOKNUM, hook) + _u32(NFTA_HOOK_PRIORITY, -1000 & 0xFFFFFFFF)
    return (
        _string(NFTA_CHAIN_TABLE, table)
        + _string(NFTA_CHAIN_NAME, chain)
        + _attribute(NFTA_CHAIN_HOOK | NLA_F_NESTED, hook_spec)
        + _u32(NFTA_CHAIN_POLICY, NF_DROP)
        + _string(NFTA_CHAIN_TYPE, "filter")
    )
