"""A tiny server for lab hosts: `python -m lab.listener --host db --port 5432 [--udp]`.

Listens on 0.0.0.0 and :: for each port (TCP, and UDP with --udp) and answers every
connection or datagram with one line naming itself, e.g. `db:5432/tcp`, so a probe can
tell which host answered. `start_listener` launches it inside a lab host's namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import socket
import sys
import time
from functools import partial
from pathlib import Path
from typing import cast

from lab.errors import DaemonError
from lab.iproute import ip_binary
from lab.procs import log_tail, start_detached
from lab.state import HostRecord, ProcessRecord, Role

_READY = b"ready\n"
_READY_TIMEOUT = 10.0
_WRITE_TIMEOUT = 2.0


def banner(host: str, port: int, proto: str) -> str:
    return f"{host}:{port}/{proto}\n"


def _bound_socket(
    family: socket.AddressFamily, kind: socket.SocketKind, port: int
) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # Separate v4 and v6 sockets, so each reports its own bind error.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    return sock


class _UdpAnswer(asyncio.DatagramProtocol):
    def __init__(self, line: bytes) -> None:
        self._line = line
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector transport is not a DatagramTransport subclass, only alike.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self._transport is not None:
            self._transport.sendto(self._line, addr)


async def _serve(host: str, ports: list[int], udp: bool, ready_fd: int | None) -> None:
    loop = asyncio.get_running_loop()
    for port in ports:
        line = banner(host, port, "tcp").encode()

        async def answer(
            _reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes = line
        ) -> None:
            with contextlib.suppress(OSError, TimeoutError):
                writer.write(line)
                await asyncio.wait_for(writer.drain(), _WRITE_TIMEOUT)
            writer.close()

        for family in (socket.AF_INET, socket.AF_INET6):
            sock = _bound_socket(family, socket.SOCK_STREAM, port)
            await asyncio.start_server(answer, sock=sock)
            if udp:
                usock = _bound_socket(family, socket.SOCK_DGRAM, port)
                udp_line = banner(host, port, "udp").encode()
                await loop.create_datagram_endpoint(partial(_UdpAnswer, udp_line), sock=usock)
    print(f"listening on {', '.join(map(str, ports))}{' (tcp+udp)' if udp else ''}", flush=True)
    if ready_fd is not None:
        os.write(ready_fd, _READY)
        os.close(ready_fd)
    await asyncio.Event().wait()  # until SIGTERM


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab.listener")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--udp", action="store_true")
    parser.add_argument("--ready-fd", type=int)
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.host, args.port, args.udp, args.ready_fd))
    except OSError as exc:
        message = f"error: cannot listen: {exc.strerror or exc}"
        print(message, file=sys.stderr, flush=True)
        if args.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(args.ready_fd, message.encode() + b"\n")
        return 1
    return 0


def start_listener(
    host: HostRecord, ports: list[int], *, udp: bool, python: str, log: Path
) -> ProcessRecord:
    """Start a listener in HOST's namespace and wait until its sockets are bound."""
    argv = [
        ip_binary(), "netns", "exec", host.netns, python, "-m", "lab.listener", "--host", host.name,
        *[arg for port in ports for arg in ("--port", str(port))], *(["--udp"] if udp else []),
    ]  # fmt: skip
    read_end, write_end = os.pipe()
    try:
        started = start_detached([*argv, "--ready-fd", str(write_end)], log, pass_fds=(write_end,))
        os.close(write_end)
        write_end = -1
        answer = _read_ready(read_end)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if answer != _READY:
        reason = answer.decode(errors="replace").strip() or log_tail(log, 5)
        raise DaemonError(f"listener on {host.name} ports {ports} did not start: {reason}")
    return ProcessRecord(
        role=Role.LISTENER,
        host=host.name,
        pid=started.pid,
        start_ticks=started.start_ticks,
        argv=argv,
        log=str(log),
        ports=ports,
        udp=udp,
    )


def _read_ready(fd: int) -> bytes:
    """Everything the listener writes to its ready pipe until it closes it (bounded)."""
    deadline = time.monotonic() + _READY_TIMEOUT
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            break
        chunk = os.read(fd, 512)
        if not chunk:
            break
        data += chunk
    return data


if __name__ == "__main__":
    sys.exit(main())
