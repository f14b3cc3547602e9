"""Messages between `sandbox run` and the pool: one JSON line each, descriptors beside it (SCM_RIGHTS), both bounded."""

from __future__ import annotations

import array
import json
import os
import socket
import struct
TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (~3 ms of the pooled client's start)

from sandbox.core.errors import SandboxError

if TYPE_CHECKING:
    from typing import Any

MAX_MESSAGE = 64 * 1024  # what the pool and a run say to each other
MAX_LAUNCH = 64 * 1024 * 1024  # a command line handed to the pool's launcher: argv and environment, as large as execve takes
MAX_FDS = 16


class WireError(SandboxError):
    """The other end sent what is not a message of ours (or nothing)."""


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = (), limit: int = MAX_MESSAGE) -> None:
    """One message, with `fds` beside its first byte."""
    data = json.dumps(message).encode() + b"\n"
    if len(data) > limit:
        raise WireError(f"message of {len(data)} bytes")
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        data = data[sent:]
    if data:
        sock.sendall(data)


def receive(sock: socket.socket, limit: int = MAX_MESSAGE) -> tuple[dict[str, Any], list[int]]:
    """One message and the descriptors that came with it (the caller's to close).

    It reads no further than the message's end only when the other side
    sends nothing more before an answer: each side here waits for one.
    """
    fds = array.array("i")
    chunks: list[bytes] = []
    size = 0
    while not chunks or not chunks[-1].endswith(b"\n"):
        chunk, ancdata, _flags, _addr = sock.recvmsg(min(limit, 1 << 20), socket.CMSG_LEN(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise WireError("the other end closed the connection")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            for fd in fds:
                os.close(fd)
            raise WireError(f"a message longer than {limit} bytes")
    data = b"".join(chunks)
    try:
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        for fd in fds:
            os.close(fd)
        raise WireError(f"not a message: {exc}") from None
    return message, list(fds)


def _peer(sock: socket.socket) -> tuple[int, int, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return int(pid), int(uid), int(gid)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a UNIX socket (SO_PEERCRED: the kernel's word, not the peer's)."""
    return _peer(sock)[1]


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    return _peer(sock)[0]
