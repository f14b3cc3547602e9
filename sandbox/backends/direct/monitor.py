"""QEMU's monitor (QMP) over a connected socket: synchronous, every step bounded.

QMP is a line of JSON each way: a greeting, `qmp_capabilities`, then one
reply per command, with asynchronous events in between.  The launcher
needs a handful of commands, one at a time (a restore's three, a quit, a
key press).  qemu.qmp, the library this used before, is asyncio-only, and
importing asyncio with it cost 100 ms of a 1.0 s warm `sandbox run`
(measured, benchmarks/README.md); this client is the standard library's
socket and json.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Mapping
from typing import Any

from sandbox.core.errors import SandboxError

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # no reply we ask for is near this; a peer that sends more is not QEMU


class MonitorError(SandboxError):
    """QEMU answered a command with an error, or its monitor broke off."""


class Monitor:
    """One QMP session on `sock` (connected; closing it stays the caller's job)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.connected = False
        self._buf = b""
        self._next_id = 0
        self._broken = False

    def _line(self, deadline: float) -> dict[str, Any]:
        """The next JSON object QEMU sent; TimeoutError, or MonitorError on EOF or garbage."""
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("QEMU's monitor did not answer in time")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)  # TimeoutError when it stays silent
            if not chunk:
                self._broken = True
                raise MonitorError("QEMU's monitor closed")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                self._broken = True
                raise MonitorError("QEMU's monitor sent an overlong line")
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            obj = json.loads(line)
        except ValueError:
            self._broken = True
            raise MonitorError(f"QEMU's monitor sent something other than JSON: {line[:80]!r}") from None
        if not isinstance(obj, dict):
            self._broken = True
            raise MonitorError(f"QEMU's monitor sent something other than an object: {line[:80]!r}")
        return obj

    def _send(self, command: str, arguments: Mapping[str, object] | None, fd: int | None = None) -> int:
        self._next_id += 1
        msg: dict[str, object] = {"execute": command, "id": self._next_id}
        if arguments is not None:
            msg["arguments"] = dict(arguments)
        data = json.dumps(msg).encode() + b"\n"
        self.sock.settimeout(None)
        if fd is None:
            self.sock.sendall(data)
        else:
            # The descriptor rides on the command's first byte (SCM_RIGHTS), as `getfd` expects.
            sent = socket.send_fds(self.sock, [data], [fd])
            self.sock.sendall(data[sent:])
        return self._next_id

    def _reply(self, ident: int, command: str, deadline: float) -> Any:
        while True:
            obj = self._line(deadline)
            if "event" in obj:
                log.debug("QMP event: %s", obj.get("event"))
                continue
            if obj.get("id") != ident:
                continue  # a late reply to a command given up on
            if "error" in obj:
                err = obj["error"] if isinstance(obj["error"], dict) else {}
                raise MonitorError(f"QMP {command}: {err.get('desc', obj['error'])}")
            return obj.get("return")

    def connect(self, timeout: float) -> bool:
        """Greeting and capabilities negotiation; False if QEMU did not answer in time or went away."""
        deadline = time.monotonic() + timeout
        try:
            greeting = self._line(deadline)
            if "QMP" not in greeting:
                raise MonitorError("no QMP greeting")
            self._reply(self._send("qmp_capabilities", None), "qmp_capabilities", deadline)
        except (MonitorError, OSError) as exc:  # OSError: TimeoutError too
            log.debug("QMP negotiation failed: %s", exc)
            return False
        self.connected = True
        return True

    def execute(self, command: str, timeout: float, arguments: Mapping[str, object] | None = None) -> Any:
        """Run a QMP command and return its result; MonitorError on an error reply, TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        if not self.connected and not self.connect(timeout):
            raise MonitorError("QEMU's monitor does not answer")
        if self._broken:
            raise MonitorError("QEMU's monitor is out of step (an earlier reply was cut off)")
        return self._reply(self._send(command, arguments), command, deadline)

    def send_fd(self, fd: int, name: str, timeout: float) -> None:
        """Hand QEMU a descriptor (SCM_RIGHTS), known to it from now on as `name`."""
        deadline = time.monotonic() + timeout
        if not self.connected and not self.connect(timeout):
            raise MonitorError("QEMU's monitor does not answer")
        self._reply(self._send("getfd", {"fdname": name}, fd=fd), "getfd", deadline)

    def close(self) -> None:
        """Forget the session; the socket is the caller's to close (QEMU sees EOF then)."""
        self.connected = False
