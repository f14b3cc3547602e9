"""The launcher's event loop: stdio and control messages between the user and the guest."""

from __future__ import annotations

import contextlib
import enum
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
from typing import Any, BinaryIO, Protocol

from sandbox.wire import protocol
from sandbox.core.errors import GuestProtocolError
from sandbox.backends.base import Guest
from sandbox.core.signals import FORWARDED, RELAYING, not_ignored
from sandbox.wire.streams import recv_some, send_some, watch_writable
from sandbox.plan.timings import Timeline, monotonic_boottime

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
ESCALATE_AFTER = 5.0  # s after a forwarded signal before the VM is killed
SHUTDOWN_GRACE = 3.0  # s for the guest to power off after our ack
DRAIN_TIMEOUT = 5.0  # s without output after the status, for output the guest said it wrote
BOOT_TOTAL_FACTOR = 4  # a boot may make progress, stamp by stamp, for this many boot timeouts in all
GUEST_LOG_LINES = 20  # the guest's log lines shown; past this, the rest are not
CONSOLE_LOG_MAX = 8 << 20  # bytes of console kept on disk: a guest cannot fill the disk through it
MAX_WAIT = 3600.0  # s: poll() takes an int of ms; a far deadline is waited for in steps


class State(enum.Enum):
    """Where a run is; each state has its own deadlines (see Relay)."""

    BOOTING = "booting"  # until the command runs: no progress for boot_timeout -> stall
    RUNNING = "running"  # stdin flows, signals are forwarded; --timeout applies
    SIGNALLED = "signalled"  # a signal was forwarded: ESCALATE_AFTER, then the VM is killed
    FINISHED = "finished"  # the status arrived; acked once every byte has: SHUTDOWN_GRACE to power off
    ENDED = "ended"  # the machine is gone


class End(enum.Enum):
    """How a run ended."""

    EXIT = "exit"  # the command's status arrived (its own, or 128+N for its signal)
    SIGNAL = "signal"  # the VM was killed after a signal to the launcher: 128+N
    TIMEOUT = "timeout"  # --timeout ran out
    STALL = "stall"  # the boot made no progress
    DIED = "died"  # the machine ended without a status (panic, crash, set-up failure)


@dataclass(frozen=True)
class Outcome:
    """How the run ended, and what the guest said on the way."""

    end: End
    status: int | None = None
    qemu_peak_rss_kb: int | None = None
    exec_failed: protocol.ExecFailed | None = None
    looked_up: str | None = None  # the first host name the command asked for
    oom_kills: int = 0  # processes the guest's OOM killer killed
    fatal: str | None = None  # the guest init could not set up the sandbox
    started: bool = False  # the command was started (before that, a run can be retried)
    machine_status: int | None = None  # how the machine's process ended (negative: by that signal)


class Deadlines:
    """Named points in time.monotonic(); the loop sleeps until the nearest."""

    def __init__(self) -> None:
        self._at: dict[str, float] = {}

    def set(self, name: str, seconds_from_now: float) -> None:
        self._at[name] = time.monotonic() + seconds_from_now

    def set_at(self, name: str, when: float | None) -> None:
        if when is None:
            self._at.pop(name, None)
        else:
            self._at[name] = when

    def clear(self, name: str) -> None:
        self._at.pop(name, None)

    def expired(self, name: str) -> bool:
        return name in self._at and time.monotonic() >= self._at[name]

    def wait(self) -> float | None:
        """Seconds to the nearest deadline (at most MAX_WAIT), or None for none."""
        if not self._at:
            return None
        return min(MAX_WAIT, max(0.0, min(self._at.values()) - time.monotonic()))


class PortBridge(Protocol):
    """A multiplexed port driven by the relay's loop (X11: sandbox/features/x11.py; exec: sandbox/features/execs.py)."""

    def attach(self, sel: selectors.BaseSelector, port: socket.socket) -> None: ...

    def on_event(self, key: selectors.SelectorKey, mask: int) -> None: ...


class DisplayBridge(PortBridge, Protocol):
    """The X11 side of a run (sandbox/features/x11.py)."""

    on_display_gone: Callable[[], None] | None


@dataclass(frozen=True)
class Stdio:
    """The user's side of the command's streams (0, 1, 2 for `sandbox run`)."""

    stdin: int = 0
    stdout: int = 1
    stderr: int = 2


class Relay:
    """Moves bytes until the machine ends, and decides how the run ended."""

    def __init__(
        self,
        guest: Guest,
        console_log: Path,
        timeline: Timeline,
        spec_message: bytes,
        tty: int,
        verbose: int,
        boot_timeout: float,
        timeout_at: float | None,
        x11: DisplayBridge | None = None,
        stdio: Stdio = Stdio(),
        execs: PortBridge | None = None,
        stop_grace: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.guest = guest
        # `sandbox stop -t S` asks for S seconds, and powers off itself after
        # them: the launcher waits longer, in case that client is gone.
        self.stop_grace = stop_grace
        self.ch = guest.channels
        self.console_log_path = console_log
        self.timeline = timeline
        # A guest being snapshotted gets its spec only after the snapshot.
        self.spec_message = spec_message
        self.spec_sent = not guest.holds_spec
        self.resized = False  # the terminal changed size before the spec went
        self.ctl_out = bytearray() if guest.holds_spec else bytearray(spec_message)
        self.tty = tty
        self.verbose = verbose
        self.boot_timeout = boot_timeout
        self.x11 = x11
        self.execs = execs
        self.io = stdio
        self.sel = selectors.PollSelector()
        self.state = State.BOOTING
        self.deadlines = Deadlines()
        self.deadlines.set("progress", boot_timeout)
        # Progress alone is no bound: a guest could stamp forever and never start the command.
        self.deadlines.set("boot_total", boot_timeout * BOOT_TOTAL_FACTOR)
        self.guest_log_lines = 0
        # --timeout counts from the launcher's start, across boot retries.
        self.deadlines.set_at("timeout", timeout_at)
        self.end: End | None = None
        self.signals: list[int] = []
        self.killed_by: int | None = None
        self.pending_signal: int | None = None
        self.booted = False
        self.started = False
        self.machine_status: int | None = None
        self.ctl_in = b""
        self.finished: protocol.Finished | None = None
        self.exec_failed: protocol.ExecFailed | None = None
        self.looked_up: str | None = None
        self.oom_kills = 0
        self.fatal: str | None = None
        self.acked = False
        self.received = {"stdout": 0, "stderr": 0}
        self.broken = {"stdout": False, "stderr": False}
        self.stdin_buf = b""
        self.stdin_sent = 0  # bytes of stdin handed to the guest's port
        self.stdin_read = 0  # bytes read from our stdin
        self.stdin_open = True
        self.stdin_registered = False
        self.console_log: BinaryIO | None = None
        self.console_logged = 0
        self.qemu_peak_rss_kb: int | None = None

    # ---- set-up and tear-down ------------------------------------------

    def run(self) -> Outcome:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (*not_ignored(FORWARDED), signal.SIGWINCH)}
        RELAYING.set()
        saved_tty = None
        if self.tty & protocol.TTY_STDIN:
            saved_tty = termios.tcgetattr(self.io.stdin)
            ttymod.setraw(self.io.stdin)
        self.console_log = self.console_log_path.open("wb")
        try:
            self._register(wake_r)
            self._loop(wake_r)
        finally:
            if saved_tty is not None:
                termios.tcsetattr(self.io.stdin, termios.TCSADRAIN, saved_tty)
            RELAYING.clear()
            self._give_back_stdin()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            wake_r.close()
            wake_w.close()
            self.console_log.close()
            self.sel.close()
        return self.outcome()

    def outcome(self) -> Outcome:
        if self.end is None:
            self.end = End.EXIT if self.finished is not None else End.DIED
        status = self.finished.status if self.finished is not None else None
        if self.end is End.SIGNAL:
            assert self.killed_by is not None
            status = 128 + self.killed_by
        elif self.end in (End.TIMEOUT, End.STALL, End.DIED):
            status = None
        return Outcome(
            self.end,
            status,
            qemu_peak_rss_kb=self.qemu_peak_rss_kb,
            exec_failed=self.exec_failed,
            looked_up=self.looked_up,
            oom_kills=self.oom_kills,
            fatal=self.fatal,
            started=self.started,
            machine_status=self.machine_status,
        )

    def _on_signal(self, signo: int, _frame: FrameType | None) -> None:
        self.signals.append(signo)

    def _register(self, wake: socket.socket) -> None:
        for sock in self.ch.all():
            sock.setblocking(False)
        self.sel.register(wake, selectors.EVENT_READ, "wake")
        self.sel.register(self.ch.control, selectors.EVENT_READ | selectors.EVENT_WRITE, "ctl")
        self.sel.register(self.ch.stdout, selectors.EVENT_READ, "stdout")
        self.sel.register(self.ch.stderr, selectors.EVENT_READ, "stderr")
        self.sel.register(self.ch.console, selectors.EVENT_READ, "console")
        self.sel.register(self.guest.end_fd, selectors.EVENT_READ, "end")
        if self.x11 is not None and self.ch.x11 is not None:
            self.x11.attach(self.sel, self.ch.x11)
            # The user closed the nested window: the app has lost its
            # display; tell it as a terminal's hang-up would.
            self.x11.on_display_gone = lambda: self.signals.append(signal.SIGHUP)

    # ---- the loop --------------------------------------------------------

    def _loop(self, wake: socket.socket) -> None:
        while self.state is not State.ENDED:
            for key, mask in self.sel.select(self.deadlines.wait()):
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
        elif tag in ("stdout", "stderr"):
            self._read_output(tag)
        elif tag == "console":
            self._read_console()
        elif tag == "stdin":
            self._read_stdin()
        elif tag == "stdin-sock":
            self._flush_stdin()
        elif tag == "end":
            self.machine_status = self.guest.reap()
            self.state = State.ENDED
        elif self.execs is not None and isinstance(tag, tuple) and str(tag[0]).startswith("exec-"):
            self.execs.on_event(key, mask)
        elif self.x11 is not None:
            self.x11.on_event(key, mask)

    # ---- control channel -------------------------------------------------

    def _send_ctl(self, data: bytes) -> None:
        self.ctl_out += data
        self._flush_ctl()

    def _flush_ctl(self) -> None:
        send_some(self.ch.control, self.ctl_out)
        watch_writable(self.sel, self.ch.control, "ctl", bool(self.ctl_out))

    def _read_ctl(self) -> None:
        data = self._take(self.ch.control)
        if data is None:
            return
        now = monotonic_boottime()
        self.ctl_in += data
        *lines, self.ctl_in = self.ctl_in.split(b"\n")
        if len(self.ctl_in) > protocol.MAX_LINE:
            raise GuestProtocolError(f"the guest sent a control line of more than {protocol.MAX_LINE} bytes")
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
            if not self.booted:
                self.booted = True
                self.guest.booted()
            if self.state is State.BOOTING:
                self.deadlines.set("progress", self.boot_timeout)
            if msg.phase == "ready" and self.guest.holds_spec and not self.spec_sent:
                request = self.guest.ready()
                self.deadlines.set("progress", self.boot_timeout)
                if request is None:
                    self.spec_sent = True
                self._send_ctl(request if request is not None else self.spec_message)
                if request is None and self.resized:
                    self._send_winsize()
            elif msg.phase == "spec_read":
                self._send_ctl(protocol.clock_message(time.time_ns()))
            elif msg.phase == "poweroff" and self.acked:
                self.guest.finish()
            if msg.phase == "command_exec" and self.state is State.BOOTING:
                self.started = True
                self.state = State.RUNNING
                self.deadlines.clear("progress")
                self.deadlines.clear("boot_total")
                self._enable_stdin()
                # `sandbox exec` requests wait in the socket's backlog until
                # now: nothing of them may reach the guest before its
                # command runs (a template is taken before the spec).
                if self.execs is not None and self.ch.exec is not None:
                    self.execs.attach(self.sel, self.ch.exec)
        elif isinstance(msg, protocol.ExecFailed):
            self.exec_failed = msg
        elif isinstance(msg, protocol.LookedUp):
            self.looked_up = msg.name
        elif isinstance(msg, protocol.OomKilled):
            self.oom_kills += msg.count
        elif isinstance(msg, protocol.Fatal):
            self.fatal = msg.message
            self.deadlines.clear("progress")
            self.deadlines.clear("boot_total")
        elif isinstance(msg, protocol.Finished):
            self.finished = msg
            self.state = State.FINISHED
            for name in ("progress", "boot_total", "timeout", "escalate"):
                self.deadlines.clear(name)
            self.deadlines.set("drain", DRAIN_TIMEOUT)
            self.qemu_peak_rss_kb = self.guest.peak_rss_kb()
            self._maybe_ack()
        elif isinstance(msg, protocol.LogLine):
            self.guest_log_lines += 1
            if self.guest_log_lines <= GUEST_LOG_LINES:
                log.warning("guest: %s", msg.message)
            elif self.guest_log_lines == GUEST_LOG_LINES + 1:
                log.warning("guest: (more messages, not shown)")

    def _maybe_ack(self) -> None:
        """Ack once every byte the guest wrote has arrived, so powering off loses none."""
        f = self.finished
        if f is None or self.acked:
            return
        if self.received["stdout"] >= f.out_bytes and self.received["stderr"] >= f.err_bytes:
            self.acked = True
            self.deadlines.clear("drain")
            self._send_ctl(protocol.ACK)
            self.deadlines.set("shutdown", SHUTDOWN_GRACE)

    # ---- output ------------------------------------------------------------

    def _take(self, sock: socket.socket) -> bytes | None:
        """What the socket has now; None if nothing, or at EOF (then it is unregistered)."""
        data = recv_some(sock, CHUNK)
        if data == b"":
            self.sel.unregister(sock)
            return None
        return data

    def _read_output(self, stream: str) -> None:
        """stdout or stderr from the guest, to ours."""
        data = self._take(self.ch.stdout if stream == "stdout" else self.ch.stderr)
        if data is None:
            return
        self.received[stream] += len(data)
        if self.finished is not None and not self.acked:
            self.deadlines.set("drain", DRAIN_TIMEOUT)  # still coming
        if not self.broken[stream]:
            fd = self.io.stdout if stream == "stdout" else self.io.stderr
            try:
                _write_all(fd, data)
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.EBADF):
                    raise
                # The reader is gone: the command should see EPIPE, as it
                # would writing to a closed pipe directly.
                self.broken[stream] = True
                self._send_ctl(protocol.broken_pipe_message(1 if stream == "stdout" else 2))
        self._maybe_ack()

    def _write_stderr(self, data: bytes) -> None:
        try:
            _write_all(self.io.stderr, data)
        except OSError:
            pass

    def _read_console(self) -> None:
        data = self._take(self.ch.console)
        if data is None:
            return
        assert self.console_log is not None
        room = CONSOLE_LOG_MAX - self.console_logged
        if room > 0:
            self.console_log.write(data[:room])
            if len(data) >= room:
                self.console_log.write(b"\n[sandbox: console log truncated here]\n")
        self.console_logged += len(data)
        if self.verbose:
            self._write_stderr(data.replace(b"\n", b"\r\n") if self.tty & protocol.TTY_STDIN else data)

    # ---- input -------------------------------------------------------------

    def _give_back_stdin(self) -> None:
        """Set a file on stdin back to where the command stopped reading it.

        Run directly, a command that reads one line of a file leaves the
        rest to whoever reads next (the shell's `while read` loop); we read
        ahead of it.  The guest counts what the command took (it may lie:
        it can only move the offset back within what we read).
        """
        taken = self.finished.stdin_taken if self.finished is not None else -1
        if not self.tty & protocol.TTY_STDIN_FILE or taken < 0 or taken >= self.stdin_read:
            return
        with contextlib.suppress(OSError):
            os.lseek(self.io.stdin, taken - self.stdin_read, os.SEEK_CUR)

    def _enable_stdin(self) -> None:
        """Start reading our stdin only once the command runs.

        Until then a stalled boot can be retried without losing input.
        """
        try:
            os.fstat(self.io.stdin)
        except OSError:
            self._close_stdin()
            return
        self.sel.register(self.io.stdin, selectors.EVENT_READ, "stdin")
        self.stdin_registered = True

    def _read_stdin(self) -> None:
        try:
            data = os.read(self.io.stdin, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_stdin()
            return
        self.stdin_read += len(data)
        self.stdin_buf = data
        self._flush_stdin()

    def _flush_stdin(self) -> None:
        sock = self.ch.stdin
        try:
            sent = sock.send(self.stdin_buf)
        except BlockingIOError:
            sent = 0
        except OSError:
            # The guest end is gone (QEMU closed it): input is no longer wanted.
            self.stdin_buf = b""
            self._close_stdin()
            return
        self.stdin_sent += sent
        self.stdin_buf = self.stdin_buf[sent:]
        # While a chunk is pending, wait for the socket rather than reading more.
        if self.stdin_buf:
            if self.stdin_registered:
                self.sel.unregister(self.io.stdin)
                self.stdin_registered = False
            if not self._registered(sock):
                self.sel.register(sock, selectors.EVENT_WRITE, "stdin-sock")
        else:
            if self._registered(sock):
                self.sel.unregister(sock)
            if not self.stdin_registered and self.stdin_open:
                self.sel.register(self.io.stdin, selectors.EVENT_READ, "stdin")
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
            self.sel.unregister(self.io.stdin)
            self.stdin_registered = False
        sock = self.ch.stdin
        if self._registered(sock):
            self.sel.unregister(sock)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        # A backend whose ports cannot be half-closed (libvirt's streams)
        # says it on the control port instead.  Stdin is read only once the
        # command runs, so the spec has gone before this.
        if not self.guest.half_close:
            self._send_ctl(protocol.stdin_end_message(self.stdin_sent))

    # ---- signals and deadlines ---------------------------------------------

    def _handle_signals(self) -> None:
        while self.signals:
            signo = self.signals.pop(0)
            if signo == signal.SIGWINCH:
                if self.tty and not self.spec_sent:
                    # Not into a guest about to be snapshotted (the template
                    # holds no run data): told right after the spec instead.
                    self.resized = True
                elif self.tty:
                    self._send_winsize()
                continue
            if self.state is not State.RUNNING:
                # A second signal, or nothing to forward it to: end the VM now.
                self._kill(End.SIGNAL, signo)
                return
            self._send_ctl(protocol.signal_message(signo))
            self.state = State.SIGNALLED
            grace = self.stop_grace()
            self.deadlines.set("escalate", ESCALATE_AFTER if grace is None else grace + ESCALATE_AFTER)
            self.pending_signal = signo

    def _send_winsize(self) -> None:
        try:
            size = os.get_terminal_size(self.io.stdin if self.tty & protocol.TTY_STDIN else self.io.stdout)
        except OSError:
            return  # the terminal is gone
        self._send_ctl(protocol.winsize_message(size.lines, size.columns))

    def _kill(self, end: End, signo: int | None = None) -> None:
        if self.state is State.FINISHED:
            end = End.EXIT  # the status is in: a late signal changes nothing
        if end is End.SIGNAL:
            assert signo is not None
            self.killed_by = signo
        self.end = end
        self.guest.kill()
        self.state = State.ENDED

    def _check_deadlines(self) -> None:
        if self.state is State.ENDED:
            return
        if self.deadlines.expired("progress"):
            self._kill(End.STALL)
        elif self.deadlines.expired("boot_total"):
            self.fatal = f"the guest never started the command in {self.boot_timeout * BOOT_TOTAL_FACTOR:g} s of booting"
            self._kill(End.DIED)
        elif self.deadlines.expired("timeout"):
            self._kill(End.TIMEOUT)
        elif self.deadlines.expired("escalate"):
            log.warning("the guest did not end after the signal; killing the VM")
            self._kill(End.SIGNAL, self.pending_signal)
        elif self.deadlines.expired("drain"):
            f = self.finished
            assert f is not None
            raise GuestProtocolError(
                f"the guest reported {f.out_bytes} and {f.err_bytes} bytes of output, and sent "
                f"{self.received['stdout']} and {self.received['stderr']} (nothing more for {DRAIN_TIMEOUT:g} s)"
            )
        elif self.deadlines.expired("shutdown"):
            log.debug("guest did not power off in %.1f s; stopping QEMU", SHUTDOWN_GRACE)
            self.guest.stop(soft_timeout=0.5)
            self.state = State.ENDED

    def _drain(self) -> None:
        """After QEMU is gone: take what is still buffered in our socket ends.

        QEMU's ends are closed, so every read ends in data or EOF, never a wait.
        """
        readers: dict[object, Callable[[], None]] = {
            "ctl": self._read_ctl,
            "console": self._read_console,
            "stdout": lambda: self._read_output("stdout"),
            "stderr": lambda: self._read_output("stderr"),
        }
        for key in list(self.sel.get_map().values()):
            reader = readers.get(key.data)
            while reader is not None and self._registered(key.fileobj):
                if not select.select([key.fileobj], [], [], 0)[0]:
                    break  # nothing more, and no EOF: someone else holds the other end
                reader()


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

