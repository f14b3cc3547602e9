"""The launcher's event loop: stdio and control messages between the user and the guest."""

from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import signal
import socket
import termios
import time
import tty as ttymod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

from . import protocol
from .errors import TimeoutExpired
from .machine import Machine
from .process import FORWARDED
from .streams import recv_some, send_some, watch_writable
from .timings import Timeline, monotonic_boottime

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
ESCALATE_AFTER = 5.0  # s after a forwarded signal before the VM is killed
SHUTDOWN_GRACE = 3.0  # s for the guest to power off after our ack


MAX_WAIT = 3600.0  # s: poll() takes an int of ms; a far deadline is waited for in steps


@dataclass(frozen=True)
class RelayOutcome:
    status: int | None
    stalled: bool = False
    qemu_peak_rss_kb: int | None = None
    exec_failed: protocol.ExecFailed | None = None
    looked_up: str | None = None  # the first host name the command asked for
    oom_kills: int = 0  # processes the guest's OOM killer killed
    fatal: str | None = None  # the guest init could not set up the sandbox


class Relay:
    """Moves bytes until QEMU exits, and decides how the run ended."""

    def __init__(
        self,
        ports: dict[int, socket.socket],
        console: socket.socket,
        console_log: Path,
        machine: Machine,
        timeline: Timeline,
        spec_message: bytes,
        tty: int,
        verbose: int,
        boot_timeout: float,
        timeout: float | None,
        x11: Any = None,
        on_init: Callable[[], None] | None = None,
    ) -> None:
        self.ports = ports
        self.ctl = ports[protocol.PORT_CONTROL]
        self.console = console
        self.console_log_path = console_log
        self.machine = machine
        self.timeline = timeline
        self.ctl_out = bytearray(spec_message)
        self.tty = tty
        self.verbose = verbose
        self.boot_timeout = boot_timeout
        self.x11 = x11
        self.on_init = on_init  # called once, when the guest's init reports in
        self.sel = selectors.PollSelector()
        now = time.monotonic()
        self.progress_deadline: float | None = now + boot_timeout
        self.timeout_deadline = now + timeout if timeout else None
        self.escalate_deadline: float | None = None
        self.shutdown_deadline: float | None = None
        self.signals: list[int] = []
        self.killed_by: int | None = None
        self.pending_signal: int | None = None
        self.timed_out = False
        self.stalled = False
        self.ctl_in = b""
        self.finished: protocol.Finished | None = None
        self.exec_failed: protocol.ExecFailed | None = None
        self.looked_up: str | None = None
        self.oom_kills = 0
        self.fatal: str | None = None
        self.acked = False
        self.received = {protocol.PORT_STDOUT: 0, protocol.PORT_STDERR: 0}
        self.broken = {protocol.PORT_STDOUT: False, protocol.PORT_STDERR: False}
        self.stdin_buf = b""
        self.stdin_open = True
        self.stdin_registered = False
        self.started = False
        self.qemu_done = False
        self.console_log: BinaryIO | None = None
        self.qemu_peak_rss_kb: int | None = None

    # ---- set-up and tear-down ------------------------------------------

    def run(self) -> RelayOutcome:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (*FORWARDED, signal.SIGWINCH)}
        saved_tty = None
        if self.tty & protocol.TTY_STDIN:
            saved_tty = termios.tcgetattr(0)
            ttymod.setraw(0)
        self.console_log = self.console_log_path.open("wb")
        try:
            self._register(wake_r)
            self._loop(wake_r)
        finally:
            if saved_tty is not None:
                termios.tcsetattr(0, termios.TCSADRAIN, saved_tty)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            wake_r.close()
            wake_w.close()
            self.console_log.close()
            self.sel.close()
        if self.timed_out:
            raise TimeoutExpired("the command timed out; the VM was killed")
        if self.killed_by is not None:
            return RelayOutcome(128 + self.killed_by)
        if self.stalled:
            return RelayOutcome(None, stalled=True)
        return RelayOutcome(
            self.finished.status if self.finished else None,
            qemu_peak_rss_kb=self.qemu_peak_rss_kb,
            exec_failed=self.exec_failed,
            looked_up=self.looked_up,
            oom_kills=self.oom_kills,
            fatal=self.fatal,
        )

    def _on_signal(self, signo: int, _frame: FrameType | None) -> None:
        self.signals.append(signo)

    def _register(self, wake: socket.socket) -> None:
        for sock in self.ports.values():
            sock.setblocking(False)
        self.console.setblocking(False)
        self.sel.register(wake, selectors.EVENT_READ, "wake")
        self.sel.register(self.ctl, selectors.EVENT_READ | selectors.EVENT_WRITE, "ctl")
        self.sel.register(self.ports[protocol.PORT_STDOUT], selectors.EVENT_READ, protocol.PORT_STDOUT)
        self.sel.register(self.ports[protocol.PORT_STDERR], selectors.EVENT_READ, protocol.PORT_STDERR)
        self.sel.register(self.console, selectors.EVENT_READ, "console")
        self.sel.register(self.machine.pidfd, selectors.EVENT_READ, "qemu")
        if self.x11 is not None:
            self.x11.attach(self.sel, self.ports[protocol.PORT_X11])
            # The user closed the nested window: the app has lost its
            # display; tell it as a terminal's hang-up would.
            self.x11.on_display_gone = lambda: self.signals.append(signal.SIGHUP)

    # ---- the loop --------------------------------------------------------

    def _next_timeout(self) -> float | None:
        deadlines = [
            d
            for d in (self.progress_deadline, self.timeout_deadline, self.escalate_deadline, self.shutdown_deadline)
            if d is not None
        ]
        if not deadlines:
            return None
        return min(MAX_WAIT, max(0.0, min(deadlines) - time.monotonic()))

    def _loop(self, wake: socket.socket) -> None:
        while not self.qemu_done:
            for key, mask in self.sel.select(self._next_timeout()):
                self._dispatch(key, mask, wake)
            self._handle_signals()
            self._check_deadlines()
        self.timeline.stamp_host("qemu_reaped", monotonic_boottime())
        self._drain()

    def _dispatch(self, key: selectors.SelectorKey, mask: int, wake: socket.socket) -> None:
        tag = key.data
        if tag == "wake":
            try:
                wake.recv(4096)
            except BlockingIOError:
                pass
        elif tag == "ctl":
            if mask & selectors.EVENT_WRITE:
                self._flush_ctl()
            if mask & selectors.EVENT_READ:
                self._read_ctl()
        elif tag in (protocol.PORT_STDOUT, protocol.PORT_STDERR):
            self._read_output(tag)
        elif tag == "console":
            self._read_console()
        elif tag == "stdin":
            self._read_stdin()
        elif tag == "stdin-sock":
            self._flush_stdin()
        elif tag == "qemu":
            self.machine.wait()
            self.qemu_done = True
        elif self.x11 is not None:
            self.x11.on_event(key, mask)

    # ---- control channel -------------------------------------------------

    def _send_ctl(self, data: bytes) -> None:
        self.ctl_out += data
        self._flush_ctl()

    def _flush_ctl(self) -> None:
        send_some(self.ctl, self.ctl_out)
        watch_writable(self.sel, self.ctl, "ctl", bool(self.ctl_out))

    def _read_ctl(self) -> None:
        data = self._take(self.ctl)
        if data is None:
            return
        now = monotonic_boottime()
        self.ctl_in += data
        *lines, self.ctl_in = self.ctl_in.split(b"\n")
        for line in lines:
            parsed = protocol.parse_line(line)
            if parsed is None:
                log.debug("bad control line %r", line)
                continue
            sent, msg = parsed
            self.timeline.observe(sent, now)
            self._on_message(msg)

    def _on_message(self, msg: protocol.GuestMessage) -> None:
        if isinstance(msg, protocol.Stamp):
            self.timeline.stamp_guest(msg.phase, msg.guest_ns)
            if self.on_init is not None:
                self.on_init()
                self.on_init = None
            if not self.started:
                self.progress_deadline = time.monotonic() + self.boot_timeout
            if msg.phase == "command_exec":
                self.started = True
                self.progress_deadline = None
                self._enable_stdin()
        elif isinstance(msg, protocol.ExecFailed):
            self.exec_failed = msg
        elif isinstance(msg, protocol.LookedUp):
            self.looked_up = msg.name
        elif isinstance(msg, protocol.OomKilled):
            self.oom_kills += msg.count
        elif isinstance(msg, protocol.Fatal):
            self.fatal = msg.message
            self.progress_deadline = None
        elif isinstance(msg, protocol.Finished):
            self.finished = msg
            self.progress_deadline = None
            self.qemu_peak_rss_kb = _peak_rss_kb(self.machine.inner_pid or self.machine.pid)
            self._maybe_ack()
        elif isinstance(msg, protocol.LogLine):
            log.warning("guest: %s", msg.message)

    def _maybe_ack(self) -> None:
        """Ack once every byte the guest wrote has arrived, so powering off loses none."""
        f = self.finished
        if f is None or self.acked:
            return
        if self.received[protocol.PORT_STDOUT] >= f.out_bytes and self.received[protocol.PORT_STDERR] >= f.err_bytes:
            self.acked = True
            self._send_ctl(protocol.ACK)
            self.shutdown_deadline = time.monotonic() + SHUTDOWN_GRACE

    # ---- output ------------------------------------------------------------

    def _take(self, sock: socket.socket) -> bytes | None:
        """What the socket has now; None if nothing, or at EOF (then it is unregistered)."""
        data = recv_some(sock, CHUNK)
        if data == b"":
            self.sel.unregister(sock)
            return None
        return data

    def _read_output(self, port: int) -> None:
        data = self._take(self.ports[port])
        if data is None:
            return
        self.received[port] += len(data)
        if not self.broken[port]:
            fd = 1 if port == protocol.PORT_STDOUT else 2
            try:
                _write_all(fd, data)
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.EBADF):
                    raise
                # The reader is gone: the command should see EPIPE, as it
                # would writing to a closed pipe directly.
                self.broken[port] = True
                self._send_ctl(protocol.broken_pipe_message(fd))
        self._maybe_ack()

    def _write_stderr(self, data: bytes) -> None:
        try:
            _write_all(2, data)
        except OSError:
            pass

    def _read_console(self) -> None:
        data = self._take(self.console)
        if data is None:
            return
        assert self.console_log is not None
        self.console_log.write(data)
        if self.verbose:
            self._write_stderr(data.replace(b"\n", b"\r\n") if self.tty & protocol.TTY_STDIN else data)

    # ---- input -------------------------------------------------------------

    def _enable_stdin(self) -> None:
        """Start reading our stdin only once the command runs.

        Until then a stalled boot can be retried without losing input.
        """
        try:
            os.fstat(0)
        except OSError:
            self._close_stdin()
            return
        self.sel.register(0, selectors.EVENT_READ, "stdin")
        self.stdin_registered = True

    def _read_stdin(self) -> None:
        try:
            data = os.read(0, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_stdin()
            return
        self.stdin_buf = data
        self._flush_stdin()

    def _flush_stdin(self) -> None:
        sock = self.ports[protocol.PORT_STDIN]
        try:
            sent = sock.send(self.stdin_buf)
        except BlockingIOError:
            sent = 0
        except OSError:
            # The guest end is gone (QEMU closed it): input is no longer wanted.
            self.stdin_buf = b""
            self._close_stdin()
            return
        self.stdin_buf = self.stdin_buf[sent:]
        # While a chunk is pending, wait for the socket rather than reading more.
        if self.stdin_buf:
            if self.stdin_registered:
                self.sel.unregister(0)
                self.stdin_registered = False
            if not self._registered(sock):
                self.sel.register(sock, selectors.EVENT_WRITE, "stdin-sock")
        else:
            if self._registered(sock):
                self.sel.unregister(sock)
            if not self.stdin_registered and self.stdin_open:
                self.sel.register(0, selectors.EVENT_READ, "stdin")
                self.stdin_registered = True

    def _registered(self, fileobj: Any) -> bool:
        try:
            self.sel.get_key(fileobj)
            return True
        except KeyError:
            return False

    def _close_stdin(self) -> None:
        """EOF: the guest reads EOF once QEMU sees ours and drops the port's connection.

        shutdown(), not close(): a closed peer is a hang-up to QEMU, which
        then disconnects at once and drops what is still in the socket.
        """
        self.stdin_open = False
        if self.stdin_registered:
            self.sel.unregister(0)
            self.stdin_registered = False
        sock = self.ports[protocol.PORT_STDIN]
        if self._registered(sock):
            self.sel.unregister(sock)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # ---- signals and deadlines ---------------------------------------------

    def _handle_signals(self) -> None:
        while self.signals:
            signo = self.signals.pop(0)
            if signo == signal.SIGWINCH:
                if self.tty:
                    try:
                        size = os.get_terminal_size(0 if self.tty & protocol.TTY_STDIN else 1)
                    except OSError:
                        continue  # the terminal is gone
                    self._send_ctl(protocol.winsize_message(size.lines, size.columns))
                continue
            if self.escalate_deadline is not None or not self.started or self.finished is not None:
                # A second signal, or nothing to forward it to: end the VM now.
                self._kill(signo)
                return
            self._send_ctl(protocol.signal_message(signo))
            self.escalate_deadline = time.monotonic() + ESCALATE_AFTER
            self.pending_signal = signo

    def _kill(self, signo: int | None) -> None:
        if signo is not None and self.killed_by is None and self.finished is None:
            self.killed_by = signo
        self.machine.kill()
        self.qemu_done = True

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        if self.progress_deadline is not None and now >= self.progress_deadline:
            self.stalled = True
            self._kill(None)
        elif self.timeout_deadline is not None and now >= self.timeout_deadline and self.finished is None:
            self.timed_out = True
            self._kill(None)
        elif self.escalate_deadline is not None and now >= self.escalate_deadline and self.finished is None:
            log.warning("the guest did not end after the signal; killing the VM")
            self._kill(self.pending_signal)
        elif self.shutdown_deadline is not None and now >= self.shutdown_deadline:
            log.debug("guest did not power off in %.1f s; stopping QEMU", SHUTDOWN_GRACE)
            self.machine.stop(soft_timeout=0.5)
            self.qemu_done = True

    def _drain(self) -> None:
        """After QEMU is gone: take what is still buffered in our socket ends.

        QEMU's ends are closed, so every read ends in data or EOF, never a wait.
        """
        readers: dict[object, Callable[[], None]] = {
            "ctl": self._read_ctl,
            "console": self._read_console,
            protocol.PORT_STDOUT: lambda: self._read_output(protocol.PORT_STDOUT),
            protocol.PORT_STDERR: lambda: self._read_output(protocol.PORT_STDERR),
        }
        for key in list(self.sel.get_map().values()):
            reader = readers.get(key.data)
            while reader is not None and self._registered(key.fileobj):
                if not select.select([key.fileobj], [], [], 0)[0]:
                    break  # nothing more, and no EOF: someone else holds the other end
                reader()


def _peak_rss_kb(pid: int) -> int | None:
    """QEMU's peak resident set (VmHWM), read while it still runs."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            # Someone made our stdout non-blocking (it is shared): wait for room.
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll(1000)
            continue
        view = view[n:]

