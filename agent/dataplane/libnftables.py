"""A thin ctypes binding to libnftables.so.1, driven through its JSON API.

Debian's python3-nftables is invisible to a virtualenv's interpreter, so we load the
shared library ourselves. Only the handful of calls a JSON batch needs are bound.
"""

from __future__ import annotations

import ctypes
import errno
import json
import threading
from typing import Any, Protocol

from agent.dataplane import nft_ownership
from agent.dataplane.backend import DataplaneError

LIBRARY_NAME = "libnftables.so.1"
# From <nftables/libnftables.h>.
_NFT_CTX_DEFAULT = 0
_NFT_CTX_OUTPUT_JSON = 1 << 4
_NFT_CTX_OUTPUT_TERSE = 1 << 11  # listings without set elements

JsonDocument = dict[str, Any]


class NftError(DataplaneError):
    """libnftables refused a command; the message is nft's own error text."""


class NftRunner(Protocol):
    """Runs one libnftables JSON document as one batch and returns its JSON output."""

    def json_cmd(self, document: JsonDocument) -> JsonDocument:
        """Run the document; raise NftError with nft's message if it fails."""
        ...


def _load(name: str) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise NftError(f"cannot load {name} (install the libnftables1 package): {exc}") from exc
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_free.restype = None
    lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_output_set_flags.restype = None
    for name_ in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(lib, name_).argtypes = [ctypes.c_void_p]
        getattr(lib, name_).restype = ctypes.c_int
    for name_ in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        # c_void_p rather than c_char_p: we copy the bytes with string_at ourselves.
        getattr(lib, name_).argtypes = [ctypes.c_void_p]
        getattr(lib, name_).restype = ctypes.c_void_p
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


def _read_buffer(pointer: int | None) -> str:
    if not pointer:
        return ""
    return ctypes.string_at(pointer).decode("utf-8", errors="replace")


class LibNftables:
    """One libnftables context, reused across calls and guarded by a lock.

    A context is not thread-safe and keeps a cache between runs, so every call holds
    the lock from running the command until both buffers have been drained.
    """

    def __init__(self, library: str = LIBRARY_NAME) -> None:
        self._lib = _load(library)
        self._lock = threading.Lock()
        ctx = self._lib.nft_ctx_new(_NFT_CTX_DEFAULT)
        if not ctx:
            raise NftError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        # JSON output also makes libnftables parse its input as JSON.
        flags = self._lib.nft_ctx_output_get_flags(ctx)
        self._lib.nft_ctx_output_set_flags(ctx, flags | _NFT_CTX_OUTPUT_JSON)
        if self._lib.nft_ctx_buffer_output(ctx) or self._lib.nft_ctx_buffer_error(ctx):
            self.close()
            raise NftError("cannot buffer libnftables output")

    def json_cmd(self, document: JsonDocument, *, terse: bool = False) -> JsonDocument:
        """Run one JSON document as one batch; return nft's JSON output ({} if none).

        TERSE leaves set elements out of listings (and out of the kernel round trip)."""
        payload = json.dumps(document).encode("utf-8")
        with self._lock:
            ctx = self._live_context()
            flags = self._lib.nft_ctx_output_get_flags(ctx)
            if terse:
                self._lib.nft_ctx_output_set_flags(ctx, flags | _NFT_CTX_OUTPUT_TERSE)
            try:
                rc = self._lib.nft_run_cmd_from_buffer(ctx, payload)
            finally:
                if terse:
                    self._lib.nft_ctx_output_set_flags(ctx, flags)
            # Reading a buffer also resets it, so both are read on every run.
            output = _read_buffer(self._lib.nft_ctx_get_output_buffer(ctx))
            error = _read_buffer(self._lib.nft_ctx_get_error_buffer(ctx))
        if rc != 0:
            raise NftError(error.strip() or f"libnftables failed with status {rc}")
        if not output.strip():
            return {}
        parsed: JsonDocument = json.loads(output)
        return parsed

    def claim_table(self, name: str, *, replace: bool = False) -> None:
        """Make table inet NAME owned by this context's socket and persistent.

        See nft_ownership: the owner is the socket libnftables sends our batches on."""
        with self._lock:
            nft_ownership.claim_table(self._netlink_fd(), name, replace=replace)

    def table_flags(self, name: str) -> int | None:
        """The flags of table inet NAME, or None when it does not exist."""
        with self._lock:
            return nft_ownership.table_flags(self._netlink_fd(), name)

    def _netlink_fd(self) -> int:
        # struct nft_ctx starts with `struct mnl_socket *nf_sock`, and struct mnl_socket
        # with `int fd` (libnftables 1.0.x, libmnl 1.0.x). Checked before use: a layout
        # change makes this refuse rather than write to a stranger's descriptor.
        ctx = self._live_context()
        sock = ctypes.c_void_p.from_address(ctx).value
        if not sock:
            raise nft_ownership.OwnershipError("libnftables has no netlink socket", errno.EBADF)
        fd = ctypes.c_int.from_address(sock).value
        nft_ownership.check_netfilter_socket(fd)
        return fd

    def _live_context(self) -> int:
        if self._ctx is None:
            raise NftError("libnftables context is closed")
        return self._ctx

    def close(self) -> None:
        """Free the context; later calls raise NftError."""
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> LibNftables:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
