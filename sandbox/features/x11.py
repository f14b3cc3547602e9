"""`--x11`: the guest's X11 clients reach one private nested X server, and nothing else.

The launcher starts Xephyr on the user's display, with a cookie of its own,
and carries each X11 connection of the guest over one virtio-serial port
(frames of type, connection id and length; see guest-init/protocol.h).  The
guest's clients connect with no credentials at all: the launcher puts the
nested server's cookie into each connection's set-up message on the host
side, as ssh's X11 forwarding does, so no cookie (of the real desktop or of
the nested server) ever enters the guest.
"""

from __future__ import annotations

import logging
import os
import secrets
import selectors
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.core import process
from sandbox.wire import protocol
from sandbox.core.errors import GuestProtocolError, SandboxError, ToolMissingError, UsageError
from sandbox.wire.mux import MuxPort
from sandbox.plan.request import X11Request
from sandbox.wire.streams import recv_some, send_some, watch_readable
from sandbox.core import unixsock

log = logging.getLogger(__name__)

OPEN, DATA, CLOSE, READY = protocol.X11_OPEN, protocol.X11_DATA, protocol.X11_CLOSE, protocol.X11_READY
MAX_FRAME = protocol.MUX_MAX_PAYLOAD
MAX_CONNS = 256  # X11 connections one guest may hold open to its nested server
OUT_MAX = 4 << 20  # bytes for the nested server not yet taken: past this the port is not read
GUEST_DISPLAY = 0
COOKIE_NAME = b"MIT-MAGIC-COOKIE-1"
FAMILY_LOCAL = 256


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def xauth_entry(display: int, cookie: bytes, hostname: bytes) -> bytes:
    """One Xauthority record (FamilyLocal) granting `cookie` for `display`."""

    def counted(b: bytes) -> bytes:
        return struct.pack(">H", len(b)) + b

    return struct.pack(">H", FAMILY_LOCAL) + b"".join(
        counted(x) for x in (hostname, str(display).encode(), COOKIE_NAME, cookie)
    )


def setup_length(head: bytes) -> int | None:
    """Length of an X11 connection set-up message, once its 12-byte head is in."""
    if len(head) < 12:
        return None
    order = "<" if head[0:1] == b"l" else ">"
    n, d = struct.unpack_from(order + "HH", head, 6)
    return int(12 + n + _pad(n) + d + _pad(d))


def rewrite_setup(message: bytes, cookie: bytes) -> bytes:
    """The client's set-up message with its credentials replaced by ours."""
    order = "<" if message[0:1] == b"l" else ">"
    major, minor = struct.unpack_from(order + "HH", message, 2)
    head = message[0:2] + struct.pack(order + "HHHHH", major, minor, len(COOKIE_NAME), len(cookie), 0)
    return head + COOKIE_NAME + b"\0" * _pad(len(COOKIE_NAME)) + cookie + b"\0" * _pad(len(cookie))


@dataclass
class _Conn:
    sock: socket.socket
    setup: bytearray = field(default_factory=bytearray)  # the client's set-up message, as it arrives
    authorized: bool = False  # set-up message rewritten and sent
    out: bytearray = field(default_factory=bytearray)  # to the nested server


class X11Session:
    """One nested X server and the connections the guest opens to it."""

    def __init__(self, mode: str, size: str, program: str) -> None:
        self.mode = mode
        self.size = size
        self.program = program  # the host-side display program: Xephyr, or xpra's client
        self.display = GUEST_DISPLAY  # as the guest sees it
        self.host_display: int | None = None
        self.cookie = secrets.token_bytes(16)
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None
        self.port = MuxPort("x11", (OPEN, DATA, CLOSE, READY), self._from_guest, self._congestion)
        self.sel: selectors.BaseSelector | None = None
        self.conns: dict[int, _Conn] = {}
        self.pidfd = -1
        self.on_display_gone: Callable[[], None] | None = None

    @classmethod
    def create(cls, request: X11Request) -> X11Session:
        """Check what --x11 needs, with one-line errors naming what to install."""
        if not os.environ.get("DISPLAY"):
            raise UsageError("--x11 needs a desktop, and DISPLAY is not set (a virtual one: apt-get install xvfb)")
        size = f"{request.size[0]}x{request.size[1]}"
        if request.mode == "xpra":
            xpra = shutil.which("xpra")
            if xpra is None:
                raise ToolMissingError("--x11=xpra needs xpra; apt-get install xpra")
            return XpraSession(size, xpra)
        xephyr = shutil.which("Xephyr")
        if xephyr is None:
            raise ToolMissingError("--x11 needs Xephyr; apt-get install xserver-xephyr")
        return cls(request.mode, size, xephyr)

    def __enter__(self) -> X11Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the nested server ----------------------------------------------

    def start(self, title: str) -> None:
        """Start Xephyr on the user's display and wait until it accepts clients."""
        self.dir = Path(tempfile.mkdtemp(prefix="sandbox-x11-"))
        auth = self.dir / "xauth"
        r, w = os.pipe()
        # Display numbers are chosen by Xephyr itself (-displayfd): no race
        # with other servers.  -nolisten tcp: a local socket only.
        # -noreset: an X server resets when its last client leaves, and
        # closes what connects meanwhile; our readiness probe was such a last
        # client, and the app's first connection failed ("Can't open
        # display") in about one run in seven.
        argv = [self.program, "-displayfd", str(w), "-auth", str(auth), "-nolisten", "tcp", "-noreset",
                "-screen", self.size, "-title", title, "-no-host-grab", "-resizeable"]  # fmt: skip
        placeholder = xauth_entry(0, self.cookie, socket.gethostname().encode())
        auth.write_bytes(placeholder)
        auth.chmod(0o600)
        log_path = self.dir / "xephyr.log"
        self.proc = process.spawn(argv, log_path, pass_fds=(w,))
        os.close(w)
        number = b""
        deadline = time.monotonic() + 15
        try:
            while not number.endswith(b"\n") and time.monotonic() < deadline:
                ready = selectors.DefaultSelector()
                ready.register(r, selectors.EVENT_READ)
                if ready.select(max(0.0, deadline - time.monotonic())):
                    chunk = os.read(r, 16)
                    if not chunk:
                        break
                    number += chunk
                ready.close()
        finally:
            os.close(r)
        if not number.strip().isdigit():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            self.close()
            raise SandboxError(f"--x11: Xephyr could not start on {os.environ.get('DISPLAY')}: {tail[0]}")
        self.host_display = int(number)
        # The cookie is the server's only accepted credential, for its real number.
        auth.write_bytes(xauth_entry(self.host_display, self.cookie, socket.gethostname().encode()))
        # A real set-up with the cookie before the guest boots: if Xephyr
        # does not let clients in, say so here, not as the app's "Can't
        # open display" inside the guest.
        while not self._accepts_clients():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise SandboxError(f"--x11: Xephyr on {os.environ.get('DISPLAY')} does not accept clients")
            time.sleep(0.02)
        self.pidfd = os.pidfd_open(self.proc.pid)
        log.info("nested X server :%d on %s", self.host_display, os.environ.get("DISPLAY"))

    def _accepts_clients(self) -> bool:
        """One X11 connection set-up with the cookie: does the nested server let a client in?"""
        hello = b"l\0" + struct.pack("<HHHHH", 11, 0, 0, 0, 0)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2)
            try:
                unixsock.connect(probe, self.socket_path)
                probe.sendall(rewrite_setup(hello, self.cookie))
                return probe.recv(1) == b"\x01"  # 1: success; 0: refused; 2: authenticate
            except OSError:
                return False

    def xtest_target(self) -> tuple[int | None, str]:
        """(display number, authority file) of the nested server, for send-key's XTEST (xephyr mode only)."""
        if self.mode != "xephyr" or self.host_display is None or self.dir is None:
            return None, ""
        return self.host_display, str(self.dir / "xauth")

    @property
    def socket_path(self) -> str:
        return f"/tmp/.X11-unix/X{self.host_display}"

    def close(self) -> None:
        """Close every connection and the nested server."""
        for conn in list(self.conns.values()):
            conn.sock.close()
        self.conns.clear()
        self.port.close()
        if self.proc is not None:
            process.stop(self.proc, timeout=5)
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # ---- relaying, driven by the launcher's event loop --------------------

    def attach(self, sel: selectors.BaseSelector, port: socket.socket) -> None:
        self.sel = sel
        self.port.attach(sel, port)
        if self.pidfd >= 0:
            sel.register(self.pidfd, selectors.EVENT_READ, ("x11-server", 0))

    def on_event(self, key: selectors.SelectorKey, mask: int) -> None:
        kind, conn_id = key.data
        if kind == "x11-port":
            self.port.on_event(mask)
        elif kind == "x11-conn":
            conn = self.conns.get(conn_id)
            if conn is None:
                return
            if mask & selectors.EVENT_WRITE:
                self._flush_conn(conn_id, conn)
            if mask & selectors.EVENT_READ and conn_id in self.conns:
                self._from_server(conn_id, conn)
        elif kind == "x11-server":
            assert self.sel is not None
            self.sel.unregister(self.pidfd)
            log.info("the nested X server is gone")
            for cid in list(self.conns):
                self._drop(cid, tell_guest=True)
            if self.on_display_gone is not None:
                self.on_display_gone()

    def _congestion(self, congested: bool) -> None:
        """The guest is not taking the server's bytes as fast as they come: stop reading the server meanwhile."""
        assert self.sel is not None
        for cid, conn in self.conns.items():
            watch_readable(self.sel, conn.sock, ("x11-conn", cid), not congested, bool(conn.out))

    def _from_guest(self, kind: bytes, cid: int, payload: bytes) -> None:
        if kind == READY:
            self._on_ready()
        elif kind == OPEN:
            if cid in self.conns:
                raise GuestProtocolError(f"the guest opened X11 connection {cid} twice")
            if len(self.conns) >= MAX_CONNS:
                self.port.send(CLOSE, cid)  # as a full server would refuse it
            else:
                self._open(cid)
        elif kind == DATA and cid in self.conns:
            self._to_server(cid, self.conns[cid], payload)
        elif kind == CLOSE and cid in self.conns:
            self._drop(cid, tell_guest=False)

    def guest_argv(self, argv: tuple[str, ...]) -> tuple[str, ...]:
        """The command as the guest runs it."""
        return argv

    def _on_ready(self) -> None:
        """The guest side is ready for the host to connect (xpra only)."""

    def _open(self, cid: int) -> None:
        assert self.sel is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            unixsock.connect(sock, self.socket_path)
        except OSError as exc:
            log.warning("cannot reach the nested X server: %s", exc)
            sock.close()
            self.port.send(CLOSE, cid)
            return
        sock.setblocking(False)
        self.conns[cid] = _Conn(sock)
        watch_readable(self.sel, sock, ("x11-conn", cid), not self.port.congested, False)

    def _to_server(self, cid: int, conn: _Conn, payload: bytes) -> None:
        if not conn.authorized:
            conn.setup += payload
            need = setup_length(bytes(conn.setup))
            if need is None or len(conn.setup) < need:
                return
            payload = rewrite_setup(bytes(conn.setup[:need]), self.cookie) + bytes(conn.setup[need:])
            conn.authorized = True
            conn.setup.clear()
        conn.out += payload
        self._flush_conn(cid, conn)

    def _flush_conn(self, cid: int, conn: _Conn) -> None:
        assert self.sel is not None
        if not send_some(conn.sock, conn.out):
            self._drop(cid, tell_guest=True)
            return
        watch_readable(self.sel, conn.sock, ("x11-conn", cid), not self.port.congested, bool(conn.out))
        self.port.hold(cid, len(conn.out) > OUT_MAX)

    def _from_server(self, cid: int, conn: _Conn) -> None:
        data = recv_some(conn.sock, MAX_FRAME)
        if data is None:
            return
        if not data:
            self._drop(cid, tell_guest=True)
            return
        self.port.send(DATA, cid, data)

    def _drop(self, cid: int, tell_guest: bool) -> None:
        conn = self.conns.pop(cid, None)
        if conn is None:
            return
        self.port.hold(cid, False)
        assert self.sel is not None
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        if tell_guest:
            self.port.send(CLOSE, cid)


# The guest side of --x11=xpra, run as the user in place of the command: an
# xpra server on its own Xvfb, then the command on that display.  The host
# attaches once the server is ready (the FIFO tells the init, which tells
# the launcher): under TCG the server takes ~40 s to start, longer than an
# xpra client waits for its hello.  The command's status is the sandbox's.
XPRA_DIR = "/tmp/.sandbox-xpra"  # guest-init/protocol.h
XPRA_WRAPPER = f"""d={XPRA_DIR}
display=$1 size=$2
shift 2
# No system config: Debian's starts "/etc/X11/Xsession true", a stray window.
XPRA_SYSTEM_CONF_DIRS="$d/no-system-config" xpra start ":$display" --daemon=no --bind="$d/socket" --socket-dirs="$d" \\
  --clipboard=no --mdns=no --pulseaudio=no --notifications=no --dbus-proxy=no \\
  --dbus-control=no --dbus-launch= --webcam=no --printing=no --file-transfer=no \\
  --speaker=off --microphone=off --systemd-run=no --html=off --start-new-commands=no \\
  --xvfb="Xvfb +extension Composite -screen 0 ${{size}}x24+32 -nolisten tcp -noreset -auth \\$XAUTHORITY" \\
  >"$d/server.log" 2>&1 </dev/null &
xpra=$!
until grep -q "xpra is ready" "$d/server.log" 2>/dev/null; do
  if ! kill -0 "$xpra" 2>/dev/null; then
    echo "sandbox: the xpra server in the guest did not start:" >&2
    tail -n 5 "$d/server.log" >&2
    exit 125
  fi
  sleep 0.2
done
echo ready >"$d/ready"
DISPLAY=":$display" "$@"
status=$?
kill "$xpra" 2>/dev/null
exit $status
"""
XPRA_DISPLAY = 100


class XpraSession(X11Session):
    """--x11=xpra: an xpra server in the guest, the xpra client on the user's display.

    Windows appear as ordinary windows on the desktop.  The host's client
    dials a socket of the launcher's; each of its connections is carried to
    the guest's server over the X11 port (opened by the host here, where
    Xephyr mode has the guest open them).  No clipboard either way.
    """

    def __init__(self, size: str, xpra: str) -> None:
        super().__init__("xpra", size, xpra)
        self.display = XPRA_DISPLAY
        self.title = "sandbox"
        self.listener: socket.socket | None = None
        self.next_id = 1

    def guest_argv(self, argv: tuple[str, ...]) -> tuple[str, ...]:
        return ("/bin/sh", "-c", XPRA_WRAPPER, "sandbox-xpra", str(self.display), self.size, *argv)

    def start(self, title: str) -> None:
        """Listen for the xpra client; it is started once the guest's server is ready."""
        self.title = title
        self.dir = Path(tempfile.mkdtemp(prefix="sandbox-xpra-"))
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unixsock.bind(self.listener, self.dir / "socket")
        self.listener.listen(4)
        self.listener.setblocking(False)

    def attach(self, sel: selectors.BaseSelector, port: socket.socket) -> None:
        super().attach(sel, port)
        assert self.listener is not None
        sel.register(self.listener, selectors.EVENT_READ, ("xpra-listen", 0))

    def _on_ready(self) -> None:
        if self.proc is not None or self.dir is None:
            return
        log_path = self.dir / "client.log"
        argv = [self.program, "attach", f"socket:{self.dir / 'socket'}", "--clipboard=no", "--notifications=no",
                "--tray=no", "--system-tray=no", "--speaker=off", "--microphone=off", "--webcam=no",
                "--opengl=no", "--file-transfer=no", "--printing=no", f"--title=@title@ ({self.title})"]  # fmt: skip
        self.proc = process.spawn(argv, log_path)
        self.pidfd = os.pidfd_open(self.proc.pid)
        assert self.sel is not None
        self.sel.register(self.pidfd, selectors.EVENT_READ, ("x11-server", 0))
        log.info("xpra client started on %s", os.environ.get("DISPLAY"))

    def on_event(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data[0] == "xpra-listen":
            self._accept()
        else:
            super().on_event(key, mask)

    def _accept(self) -> None:
        assert self.listener is not None and self.sel is not None
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        cid = self.next_id
        self.next_id += 1
        sock.setblocking(False)
        self.conns[cid] = _Conn(sock, authorized=True)
        watch_readable(self.sel, sock, ("x11-conn", cid), not self.port.congested, False)
        self.port.send(OPEN, cid)

    def _open(self, cid: int) -> None:
        self.port.send(CLOSE, cid)  # the guest opens nothing in this mode

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        super().close()
