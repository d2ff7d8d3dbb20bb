"""The enrollment port's front: a small TCP relay that counts connections before gRPC
sees them.

grpcio has no accept hook, so gRPC itself cannot refuse a connection for its source. The
front accepts on the enrollment address, in the controller's event loop, and:
* closes at once a connection beyond the cap per source (an IPv4 address or an IPv6 /64)
  or beyond the cap in total, so one host cannot take the process's descriptors;
* closes a connection that sends nothing within the handshake timeout;
* relays the rest byte for byte to the enrollment gRPC server on a unix socket in a
  private directory. TLS runs end to end between the caller and gRPC: the front sees only
  ciphertext. Its end of each relayed socket is named after the caller (sources.py), which
  is how the servicer learns whom to throttle.

Enrollment is a few calls per host, so the hop costs nothing that matters: a GetCA on a
fresh connection takes about 2.0 ms direct and 2.6 ms through the front, 1,000
enrollments over one channel 1.0-1.1 s direct and 1.1-1.3 s relayed
(bench/enrollment_front_bench.py, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from dataclasses import dataclass, field

from controller.server.sources import RelayNames, source_key

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
# Connections waiting for the front to accept them: the kernel holds these, not us, and
# beyond-cap ones are closed as fast as they come.
_BACKLOG = 1024
DEFAULT_PER_SOURCE = 16
# Three descriptors each (the caller's, the relayed socket, gRPC's end of it).
DEFAULT_TOTAL = 256


@dataclass(frozen=True, slots=True)
class FrontLimits:
    per_source: int = DEFAULT_PER_SOURCE
    total: int = DEFAULT_TOTAL
    first_byte_timeout_s: float = 10.0


@dataclass
class FrontStats:
    """Plain counters, read by the metrics collector at scrape time."""

    open: int = 0
    relayed: int = 0
    # reason ("per_source", "total", "silent", "backend") -> connections closed unrelayed
    refused: Counter[str] = field(default_factory=Counter)


class EnrollmentFront:
    def __init__(self, backend_path: str, limits: FrontLimits) -> None:
        self._backend_path = backend_path
        self._limits = limits
        self._names = RelayNames()
        self._open_by_source: Counter[str] = Counter()
        self._clients: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.stats = FrontStats()

    async def start(self, host: str, port: int) -> None:
        """Listen on HOST:PORT (OSError if it cannot). "::" is every address of both
        families, as gRPC reads it (asyncio would take IPv6 alone)."""
        self._server = await asyncio.start_server(
            self._serve, None if host == "::" else host, port, backlog=_BACKLOG
        )

    @property
    def port(self) -> int:
        """The port listened on (the one chosen when started with port 0)."""
        if self._server is None:
            raise RuntimeError("the enrollment front is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and end every connection. Their tasks end on their own once the
        sockets are gone: a cancelled one would make asyncio 3.11 log a traceback."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._clients):
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _refusal(self, source: str) -> str | None:
        if self.stats.open >= self._limits.total:
            return "total"
        if self._open_by_source[source] >= self._limits.per_source:
            return "per_source"
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = str(writer.get_extra_info("peername")[0])
        source = source_key(address)
        refusal = self._refusal(source)
        if refusal is not None:
            # A reset, not a FIN: nothing of this connection lingers on our side.
            writer.transport.abort()
            self.stats.refused[refusal] += 1
            return
        self.stats.open += 1
        self._open_by_source[source] += 1
        self._clients.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._relay(address, reader, writer)
        except OSError as exc:  # a reset from either side ends the connection, nothing more
            log.debug("enrollment connection from %s ended: %s", address, exc)
        finally:
            writer.transport.abort()
            self._clients.discard(writer)
            self._tasks.discard(task)
            self.stats.open -= 1
            self._open_by_source[source] -= 1
            if self._open_by_source[source] <= 0:
                del self._open_by_source[source]

    async def _relay(
        self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The caller speaks first (a TLS ClientHello): no backend connection for silence.
        try:
            first = await asyncio.wait_for(reader.read(_CHUNK), self._limits.first_byte_timeout_s)
        except TimeoutError:
            self.stats.refused["silent"] += 1
            return
        if not first:
            return
        backend = await self._connect_backend(address)
        if backend is None:
            self.stats.refused["backend"] += 1
            return
        backend_reader, backend_writer = backend
        self.stats.relayed += 1
        try:
            backend_writer.write(first)
            copies = {
                asyncio.create_task(_copy(reader, backend_writer)),
                asyncio.create_task(_copy(backend_reader, writer)),
            }
            # Either side closing ends both: gRPC never half-closes a connection.
            _, pending = await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            backend_writer.transport.abort()

    async def _connect_backend(
        self, address: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self._names.next(address))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, self._backend_path)
            return await asyncio.open_unix_connection(sock=sock, limit=_CHUNK)
        except OSError as exc:
            sock.close()
            log.warning("enrollment front: cannot reach the enrollment server: %s", exc)
            return None


async def _copy(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
    """Bytes from SOURCE to TARGET until end of file, as fast as TARGET takes them."""
    try:
        while data := await source.read(_CHUNK):
            target.write(data)
            await target.drain()
    except OSError:
        return
