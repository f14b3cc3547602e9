"""A sandbox run by libvirtd (implements backend.Guest).

The domain is created paused and auto-destroying (it dies with this
connection, so a killed launcher leaves none), its channels are opened as
libvirt streams, each bridged to a socketpair whose other end the relay
uses exactly as it uses the direct backend's, and only then resumed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from xml.etree import ElementTree
from typing import TYPE_CHECKING, Any

from sandbox.wire import protocol
from sandbox.backends.base import Channels
from sandbox.core.errors import MachineError
from sandbox.plan.timings import Timeline, monotonic_boottime
from sandbox.backends.libvirt.connection import LibvirtError, message
from sandbox.backends.libvirt.domain import DomainSpec, domain_xml

if TYPE_CHECKING:
    import libvirt

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


def _lv() -> Any:
    import libvirt

    return libvirt


class StreamBridge:
    """Bytes both ways between a libvirt stream and a local socket, driven by libvirt's event loop.

    Each side's backlog stops reading from the other until it drains, so a
    slow reader holds back its writer, as a socket would.
    """

    def __init__(self, stream: libvirt.virStream, sock: socket.socket, name: str) -> None:
        lv = _lv()
        self.lv = lv
        self.stream, self.sock, self.name = stream, sock, name
        sock.setblocking(False)
        self.to_sock = bytearray()  # from the guest, for the local side
        self.to_stream = bytearray()  # from the local side, for the guest
        self.stream_eof = self.sock_eof = False
        self.closed = False
        self.lock = threading.Lock()
        self.watch = lv.virEventAddHandle(sock.fileno(), lv.VIR_EVENT_HANDLE_READABLE, self._on_sock, None)
        stream.eventAddCallback(lv.VIR_STREAM_EVENT_READABLE | lv.VIR_STREAM_EVENT_ERROR | lv.VIR_STREAM_EVENT_HANGUP, self._on_stream, None)

    def _update(self) -> None:
        lv = self.lv
        if self.closed:
            return
        sev = 0
        if not self.stream_eof and not self.to_sock:
            sev |= lv.VIR_STREAM_EVENT_READABLE
        if self.to_stream:
            sev |= lv.VIR_STREAM_EVENT_WRITABLE
        with contextlib.suppress(lv.libvirtError):
            self.stream.eventUpdateCallback(sev | lv.VIR_STREAM_EVENT_ERROR | lv.VIR_STREAM_EVENT_HANGUP)
        hev = 0
        if not self.sock_eof and not self.to_stream:
            hev |= lv.VIR_EVENT_HANDLE_READABLE
        if self.to_sock:
            hev |= lv.VIR_EVENT_HANDLE_WRITABLE
        lv.virEventUpdateHandle(self.watch, hev)

    def _on_stream(self, _stream: Any, events: int, _opaque: Any) -> None:
        lv = self.lv
        with self.lock:
            if self.closed:
                return
            if events & lv.VIR_STREAM_EVENT_READABLE and not self.to_sock:
                try:
                    data = self.stream.recv(CHUNK)
                except lv.libvirtError:
                    data = b""
                if data == -2:
                    pass
                elif not data:
                    self.stream_eof = True
                    with contextlib.suppress(OSError):
                        self.sock.shutdown(socket.SHUT_WR)
                else:
                    self.to_sock += data
                    self._flush_sock()
            if events & lv.VIR_STREAM_EVENT_WRITABLE and self.to_stream:
                self._flush_stream()
            if events & (lv.VIR_STREAM_EVENT_ERROR | lv.VIR_STREAM_EVENT_HANGUP) and not self.to_sock:
                self.stream_eof = True
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
            self._update()

    def _on_sock(self, _watch: int, _fd: int, events: int, _opaque: Any) -> None:
        lv = self.lv
        with self.lock:
            if self.closed:
                return
            if events & lv.VIR_EVENT_HANDLE_WRITABLE and self.to_sock:
                self._flush_sock()
            if events & (lv.VIR_EVENT_HANDLE_READABLE | lv.VIR_EVENT_HANDLE_HANGUP) and not self.to_stream and not self.sock_eof:
                try:
                    data = self.sock.recv(CHUNK)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data is not None:
                    if not data:
                        self.sock_eof = True
                        # stdin's EOF.  Not passed on as the stream's end: libvirtd
                        # would close QEMU's socket, a hang-up that drops what is
                        # still queued; the relay tells the guest on the control
                        # port instead ("I <bytes>").
                    else:
                        self.to_stream += data
                        self._flush_stream()
            self._update()

    def _flush_sock(self) -> None:
        try:
            n = self.sock.send(self.to_sock)
        except BlockingIOError:
            return
        except OSError:
            self.to_sock.clear()
            return
        del self.to_sock[:n]

    def _flush_stream(self) -> None:
        lv = self.lv
        try:
            n = self.stream.send(bytes(self.to_stream))
        except lv.libvirtError:
            self.to_stream.clear()
            return
        if n > 0:
            del self.to_stream[:n]

    def close(self) -> None:
        lv = self.lv
        with self.lock:
            if self.closed:
                return
            self.closed = True
            lv.virEventRemoveHandle(self.watch)
            with contextlib.suppress(lv.libvirtError):
                self.stream.eventRemoveCallback()
            with contextlib.suppress(lv.libvirtError):
                self.stream.abort()


class LibvirtGuest:
    """One transient domain running the guest init (implements backend.Guest)."""

    def __init__(
        self,
        conn: libvirt.virConnect,
        spec: DomainSpec,
        rundir: Path,
        timeline: Timeline,
        verbose: int = 0,
        command: dict[str, Any] | None = None,
        remote: bool = False,
    ) -> None:
        self.conn = conn
        self.remote = remote
        self.command = command or {}
        self._started = time.time()
        self.spec = spec
        self.rundir = rundir
        self.timeline = timeline
        self.verbose = verbose
        self.xml = domain_xml(spec)
        self.dom: libvirt.virDomain | None = None
        self.bridges: list[StreamBridge] = []
        self._socks: list[socket.socket] = []
        self._end_r, self._end_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._ended = threading.Event()
        self._reason: int | None = None
        self._callback: int | None = None

    # ---- backend.Guest -----------------------------------------------------

    # A stream's end closes QEMU's socket, a hang-up that drops what is still
    # queued: stdin's EOF goes on the control port ("I <bytes>") instead.
    half_close = False

    @property
    def end_fd(self) -> int:
        return self._end_r

    def reap(self) -> int | None:
        if not self._ended.is_set():
            return None
        lv = _lv()
        # The init powers off: a shutdown.  Anything else (destroyed, crashed) is QEMU's failure.
        return 0 if self._reason in (lv.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN, None) else 1

    def booted(self) -> None:
        pass

    @property
    def holds_spec(self) -> bool:
        return False

    def ready(self) -> bytes | None:
        return None

    def wait_built(self, timeout: float, attempt: int) -> None:
        pass  # created and resumed on entry; the relay's progress deadline covers the boot

    def stop(self, soft_timeout: float = 1.0) -> int:
        """As the direct backend's: a polite stop (libvirt's graceful destroy: SIGTERM to QEMU), then the forced one."""
        lv = _lv()
        if self.dom is not None and not self._ended.is_set():
            with contextlib.suppress(lv.libvirtError):
                # Graceful: libvirt asks QEMU to quit, and gives up (an error) rather than kill it.
                self.dom.destroyFlags(lv.VIR_DOMAIN_DESTROY_GRACEFUL)
        if not self._ended.wait(soft_timeout):
            self.kill()
            self._ended.wait(10)
        status = self.reap()
        return status if status is not None else 1

    def kill(self) -> None:
        lv = _lv()
        if self.dom is not None and not self._ended.is_set():
            with contextlib.suppress(lv.libvirtError):
                self.dom.destroy()

    def host_identity(self) -> tuple[str, str]:
        if self.dom is None:
            return "", ""
        try:
            name = self.dom.name()
            # The live XML has the labels libvirt's security drivers gave it
            # (dynamic sVirt under SELinux, the DAC uid:gid).
            labels = [f"{sl.get('model')} {text}" for sl in ElementTree.fromstring(self.dom.XMLDesc(0)).findall("seclabel")
                      if (text := (sl.findtext("label") or "").strip())]  # fmt: skip
        except (_lv().libvirtError, ElementTree.ParseError) as exc:
            log.debug("domain identity: %s", exc)
            return "", ""
        return f"libvirt domain {name}", ", ".join(labels)

    def finish(self) -> None:
        pass  # the domain powers off by itself; libvirtd cleans up after a destroy no faster

    def pids(self) -> tuple[int, ...]:
        return ()  # QEMU is libvirtd's, perhaps on another host

    def peak_rss_kb(self) -> int | None:
        lv = _lv()
        if self.dom is None:
            return None
        try:
            return int(self.dom.memoryStats().get("rss", 0)) or None
        except lv.libvirtError:
            return None

    def failure(self, msg: str) -> MachineError:
        try:
            tail = (self.rundir / "console.log").read_text(errors="replace")[-4000:]
        except OSError:
            tail = ""
        return MachineError(msg, [f"libvirt domain {self.spec.name} on {self.conn.getURI()}"], tail)

    # ---- lifecycle -----------------------------------------------------------

    def __enter__(self) -> LibvirtGuest:
        try:
            self._start()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._close()

    def _pair(self) -> tuple[socket.socket, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socks += [ours, theirs]
        return ours, theirs

    def _event(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        lv = _lv()
        if dom.UUIDString() != self.spec.uuid or event != lv.VIR_DOMAIN_EVENT_STOPPED:
            return
        self._reason = detail
        self._ended.set()
        with contextlib.suppress(OSError):
            os.write(self._end_w, b"x")

    def _start(self) -> None:
        lv = _lv()
        if self.verbose:
            log.info("libvirt domain:\n%s", self.xml)
        self._callback = self.conn.domainEventRegisterAny(None, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None)
        self.timeline.stamp_host("qemu_exec", monotonic_boottime())
        try:
            self.dom = self.conn.createXML(self.xml, lv.VIR_DOMAIN_START_PAUSED | lv.VIR_DOMAIN_START_AUTODESTROY)
        except lv.libvirtError as exc:
            raise LibvirtError(f"libvirt refused the domain: {message(exc)}") from None
        log.info("libvirt domain %s (uuid %s) on %s", self.spec.name, self.spec.uuid, self.conn.getURI())
        self._audit("start", command=self.command)
        self._started = time.time()
        ports = {nr: self._pair() for nr in self.spec.ports}
        console = self._pair()
        try:
            for nr, (_ours, theirs) in ports.items():
                stream = self.conn.newStream(lv.VIR_STREAM_NONBLOCK)
                self.dom.openChannel(protocol.PORT_NAMES[nr], stream, 0)
                self.bridges.append(StreamBridge(stream, theirs, protocol.PORT_NAMES[nr]))
            stream = self.conn.newStream(lv.VIR_STREAM_NONBLOCK)
            self.dom.openConsole(None, stream, 0)
            self.bridges.append(StreamBridge(stream, console[1], "console"))
        except lv.libvirtError as exc:
            raise LibvirtError(f"cannot open the domain's channels: {message(exc)}") from None
        self.channels = Channels.of_ports({n: pair[0] for n, pair in ports.items()}, console[0], x11=False)
        try:
            self.dom.resume()
        except lv.libvirtError as exc:
            raise LibvirtError(f"cannot start the domain: {message(exc)}") from None

    def _audit(self, event: str, **fields: object) -> None:
        from sandbox.confinement import audit

        try:
            audit.record(event, backend="libvirt", uri=self.conn.getURI(), domain=self.spec.name, domain_uuid=self.spec.uuid, **fields)
        except OSError as exc:
            log.warning("cannot write the audit log: %s", exc.strerror)

    def explain(self, fatal: str) -> str:
        """A hint for a set-up failure that is libvirt's doing."""
        if "Permission denied" not in fatal:
            return ""
        if self.remote:
            return (" (libvirt runs QEMU as its own user on that host, libvirt-qemu on Debian, which cannot read"
                    " that directory there: start somewhere it can read, with --workdir)")  # fmt: skip
        if self.spec.dac_label is None:
            return " (libvirt runs QEMU as its own user, libvirt-qemu on Debian, which cannot read that directory)"
        return f" (libvirt runs QEMU as uid {self.spec.dac_label[0]}, which cannot read that directory)"

    def _close(self) -> None:
        lv = _lv()
        if self.dom is not None:
            self._audit("stop", exit_status=self.reap(), duration_s=round(time.time() - self._started, 3))
        self.kill()
        for b in self.bridges:
            b.close()
        if self._callback is not None:
            with contextlib.suppress(lv.libvirtError):
                self.conn.domainEventDeregisterAny(self._callback)
        for s in self._socks:
            s.close()
        for fd in (self._end_r, self._end_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.dom is not None and not self._ended.is_set():
            # AUTODESTROY ends it with the connection in any case.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    if not self.dom.isActive():
                        break
                except lv.libvirtError:
                    break
                time.sleep(0.02)
