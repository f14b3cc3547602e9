"""`sandbox exec`: more processes in a running sandbox, multiplexed on one virtio-serial port.

The launcher listens on `exec.sock` in the sandbox's entry directory.  A
client (`sandbox exec`) sends its request and its own stdin, stdout and
stderr descriptors (SCM_RIGHTS); the launcher then moves bytes between
those descriptors and the guest, framed on the exec port as X11 is on its
own (type, id, length; guest-init/protocol.h), and answers "X <status>"
when the process has ended and all of its output has been written.
"""

from __future__ import annotations

import array
import json
import logging
import os
import select
import selectors
import socket
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.wire import protocol
from sandbox.core.errors import GuestProtocolError
from sandbox.wire.mux import MuxPort, encode
from sandbox.wire.streams import recv_some, watch
from sandbox.core import unixsock

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
REQUEST_MAX = 1 << 20
# A client's output not yet read: past this the port is not read either
# (the guest waits), so a reader that never reads costs a bounded amount.
PENDING_MAX = 4 << 20
START, STDIN, STDIN_EOF, SIGNAL = protocol.EXEC_START, protocol.EXEC_STDIN, protocol.EXEC_STDIN_EOF, protocol.EXEC_SIGNAL
STDOUT, STDERR, EXIT = protocol.EXEC_STDOUT, protocol.EXEC_STDERR, protocol.EXEC_EXIT


def _writable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLOUT)
    return bool(p.poll(0))


def start_payload(argv: list[str], env: dict[str, str], cwd: str | None, tty: tuple[int, int] | None = None, closed: int = 0) -> bytes:
    """The EXEC_START records (NUL-terminated, one letter each)."""
    def rec(key: str, value: str) -> bytes:
        raw = value.encode("utf-8", "surrogateescape")
        if b"\0" in raw:
            raise ValueError("NUL byte in an exec argument")
        return key.encode() + raw + b"\0"

    out = b"".join(rec("A", a) for a in argv) + b"".join(rec("E", f"{k}={v}") for k, v in env.items())
    out += rec("C", cwd) if cwd else b""
    if tty is not None:
        out += rec("T", "1") + rec("R", str(tty[0])) + rec("W", str(tty[1]))
    if closed:
        out += rec("F", str(closed))  # the client's closed stdio fds: closed for the process too
    return out


@dataclass
class Session:
    client: socket.socket
    fds: list[int]  # the client's stdin, stdout, stderr (ours to close)
    stdin_open: bool = True
    stdin_file: bool = False  # a regular file (not pollable): read as the guest takes it
    status: int | None = None  # the process ended; told to the client once its output is written
    pending: dict[int, bytearray] = field(default_factory=lambda: {1: bytearray(), 2: bytearray()})


class ExecBridge:
    """The launcher's end of `sandbox exec`, driven by the relay's loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        unixsock.bind(self.listener, path)
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.sel: selectors.BaseSelector | None = None
        self.port = MuxPort("exec", (STDOUT, STDERR, EXIT), self._from_guest, self._congestion)
        self.sessions: dict[int, Session] = {}
        self.next_id = 1

    def __enter__(self) -> ExecBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def attach(self, sel: selectors.BaseSelector, port: socket.socket) -> None:
        self.sel = sel
        sel.register(self.listener, selectors.EVENT_READ, ("exec-listen", 0))
        self.port.attach(sel, port)

    def close(self) -> None:
        self.port.close()
        for sid in list(self.sessions):
            self._end(sid, None)
        self.listener.close()
        try:
            self.path.unlink()
        except OSError:
            pass

    def on_event(self, key: selectors.SelectorKey, mask: int) -> None:
        kind, sid = key.data
        if kind == "exec-listen":
            self._accept()
        elif kind == "exec-port":
            self.port.on_event(mask)
        elif kind == "exec-stdin" and sid in self.sessions:
            self._stdin(sid)
        elif kind == "exec-client" and sid in self.sessions:
            self._client(sid)
        elif kind in ("exec-out1", "exec-out2") and sid in self.sessions:
            self._write_out(sid, int(kind[-1]))

    # ---- clients ---------------------------------------------------------

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        try:
            client.settimeout(5)
            fds = array.array("i")
            data, ancdata, _flags, _addr = client.recvmsg(REQUEST_MAX, socket.CMSG_LEN(3 * fds.itemsize))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            while data and not data.endswith(b"\n"):
                more = client.recv(REQUEST_MAX)
                if not more:
                    break
                data += more
            request = json.loads(data)
            if len(fds) != 3:
                raise ValueError("a request needs stdin, stdout and stderr")
            tty = request.get("tty")
            payload = start_payload(list(request["argv"]), dict(request.get("env", {})), request.get("cwd"),
                                    (int(tty[0]), int(tty[1])) if tty else None, int(request.get("closed", 0)))  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("exec: bad request: %s", exc)
            for fd in locals().get("fds", []):
                os.close(fd)
            client.close()
            return
        client.setblocking(False)
        sid = self.next_id
        self.next_id += 1
        session = Session(client, list(fds))
        log.debug("exec: session %d: %s, fds %s", sid, request["argv"], list(fds))
        assert self.sel is not None
        self.sel.register(client, selectors.EVENT_READ, ("exec-client", sid))
        try:
            self.sel.register(fds[0], selectors.EVENT_READ, ("exec-stdin", sid))
        except (ValueError, PermissionError, OSError):  # a regular file on stdin: read as the port drains
            session.stdin_file = True
        else:
            if self.port.congested:
                self.sel.unregister(fds[0])
        self.sessions[sid] = session
        self.port.send(START, sid, payload)  # before any of its stdin
        if session.stdin_file:
            self._feed_files()

    def _client(self, sid: int) -> None:
        s = self.sessions[sid]
        data = recv_some(s.client, 4096)
        if data is None:
            return
        if not data:  # the client is gone: so is its process
            self.port.send(SIGNAL, sid, b"9")
            self._end(sid, None)
            return
        for line in data.decode(errors="replace").splitlines():
            if line.startswith("K ") and line[2:].isdigit():
                self.port.send(SIGNAL, sid, line[2:].encode())

    def _stdin(self, sid: int) -> None:
        if not self._stdin_chunk(sid):
            assert self.sel is not None
            self.sel.unregister(self.sessions[sid].fds[0])

    def _stdin_chunk(self, sid: int) -> bool:
        """One chunk of a client's stdin to the guest; False (and EOF told) once it has ended."""
        s = self.sessions[sid]
        try:
            data = os.read(s.fds[0], CHUNK)
        except OSError:
            data = b""
        if data:
            self.port.send(STDIN, sid, data)
            return True
        log.debug("exec: session %d: stdin EOF", sid)
        s.stdin_open = False
        self.port.send(STDIN_EOF, sid)
        return False

    def _feed_files(self) -> None:
        """Regular files on stdin, a chunk at a time while the guest keeps up (never all at once)."""
        for sid, s in list(self.sessions.items()):
            while s.stdin_file and s.stdin_open and not self.port.congested and self._stdin_chunk(sid):
                pass

    def _write_out(self, sid: int, n: int) -> None:
        """Output for the client's stdout (1) or stderr (2), one pipe buffer's worth once it is writable.

        A reader that does not keep up must not stall the relay (the
        sandbox's own command and the other execs): writes wait for the
        selector to say the descriptor takes PIPE_BUF bytes without blocking.
        """
        s = self.sessions[sid]
        buf = s.pending[n]
        assert self.sel is not None
        if buf and _writable(s.fds[n]):
            try:
                del buf[: os.write(s.fds[n], buf[: select.PIPE_BUF])]
            except BlockingIOError:
                pass
            except OSError:  # the reader is gone: drop what it would have read
                buf.clear()
        key = ("exec-out1" if n == 1 else "exec-out2", sid)
        try:
            self.sel.get_key(s.fds[n])
            registered = True
        except (KeyError, ValueError):
            registered = False
        if buf and not registered:
            try:
                self.sel.register(s.fds[n], selectors.EVENT_WRITE, key)
            except (ValueError, PermissionError, OSError):  # a regular file: it always takes the bytes
                os.write(s.fds[n], buf)
                buf.clear()
        elif not buf and registered:
            self.sel.unregister(s.fds[n])
        self.port.hold(sid, len(s.pending[1]) + len(s.pending[2]) > PENDING_MAX)
        if s.status is not None and not s.pending[1] and not s.pending[2]:
            self._end(sid, s.status)

    def _end(self, sid: int, status: int | None) -> None:
        s = self.sessions.pop(sid, None)
        if s is None:
            return
        self.port.hold(sid, False)
        assert self.sel is not None
        watched: list[socket.socket | int] = [s.client, s.fds[1], s.fds[2]]
        if s.stdin_open:
            watched.append(s.fds[0])
        for what in watched:
            try:
                self.sel.unregister(what)
            except (KeyError, ValueError):
                pass
        if status is not None:
            try:
                s.client.setblocking(True)
                s.client.sendall(b"X %d\n" % status)
            except OSError:
                pass
        s.client.close()
        for fd in s.fds:
            os.close(fd)

    # ---- the guest's port --------------------------------------------------

    def _congestion(self, congested: bool) -> None:
        """The guest is not taking stdin as fast as clients send it: pause their stdin until it does."""
        assert self.sel is not None
        if not congested:
            self._feed_files()
        for sid, s in self.sessions.items():
            if s.stdin_open and not s.stdin_file:
                watch(self.sel, s.fds[0], ("exec-stdin", sid), not congested, False)

    def _from_guest(self, kind: bytes, sid: int, payload: bytes) -> None:
        s = self.sessions.get(sid)
        log.debug("exec: frame %r for %d, %d bytes%s", kind, sid, len(payload), "" if s else " (no session)")
        if s is None:
            return
        if kind in (STDOUT, STDERR):
            n = 1 if kind == STDOUT else 2
            s.pending[n] += payload
            self._write_out(sid, n)
        elif kind == EXIT:
            if not payload.isdigit() or int(payload) > 255:
                raise GuestProtocolError(f"the guest sent an exec status {payload[:20]!r}")
            s.status = int(payload)
            if not s.pending[1] and not s.pending[2]:
                self._end(sid, s.status)
            # else: once _write_out has written the rest
