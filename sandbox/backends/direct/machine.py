"""QEMU process lifecycle: spawn with only the fds meant for it, soft stop, hard kill."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from sandbox.core import process
from sandbox.core.errors import MachineError
from sandbox.core.logs import log_tail
from sandbox.backends.direct.monitor import Monitor

log = logging.getLogger(__name__)


class Machine:
    """A running QEMU process.

    Used as a context manager: leaving the block always ends and reaps QEMU,
    so no process outlives the launcher's scope.  A parent-death signal
    covers the launcher being killed outright.
    """

    def __init__(
        self,
        argv: list[str],
        pass_fds: tuple[int, ...],
        cwd: Path,
        env: dict[str, str],
        stderr_log: Path,
        monitor: socket.socket | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.argv = argv
        self.pass_fds = pass_fds
        self.cwd = cwd
        self.env = env
        self.stderr_log = stderr_log
        self.monitor = monitor
        self.qmp: Monitor | None = None
        self.preexec = preexec
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd = -1
        self.returncode: int | None = None
        # The real QEMU when it runs under a PID-namespace reaper (confinement/walls.py).
        self.inner_pid: int | None = None

    def _child_setup(self) -> None:
        # QEMU asks for transparent huge pages for guest RAM and the TCG
        # cache; a short-lived guest touches little of either, and 2 MiB
        # pages made every touch cost 512 times as much resident memory.
        process.disable_transparent_hugepages()
        if self.preexec is not None:
            self.preexec()

    def start(self) -> None:
        try:
            self.proc = process.spawn(
                self.argv, self.stderr_log, self.pass_fds, cwd=self.cwd, env=self.env, preexec=self._child_setup
            )
        except OSError as exc:
            raise MachineError(f"cannot start {self.argv[0]}: {exc.strerror}", self.argv) from exc
        except subprocess.SubprocessError as exc:
            raise MachineError(f"cannot start {self.argv[0]}: {exc}", self.argv) from exc
        self.pidfd = os.pidfd_open(self.proc.pid)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        if self.proc is None:
            return self.returncode
        if self.returncode is None:
            self.returncode = self.proc.poll()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, or None if QEMU still runs after `timeout` seconds."""
        if self.proc is None:
            return self.returncode
        self.returncode = process.wait(self.proc, timeout)
        return self.returncode

    def wait_running(self, timeout: float) -> bool:
        """Wait until QEMU's main loop answers the monitor: machine built, ROMs in guest RAM.

        False if there is no monitor or QEMU did not get there (it exited,
        or took longer than `timeout`).
        """
        qmp = self._qmp()
        return qmp is not None and (qmp.connected or qmp.connect(timeout))

    def _qmp(self) -> Monitor | None:
        """The QMP session, opened on first use (there is one greeting per socket)."""
        if self.qmp is None and self.monitor is not None:
            self.qmp = Monitor(self.monitor)
        return self.qmp

    def monitor_session(self, timeout: float = 5.0) -> Monitor | None:
        """The QMP session, negotiated; None without a monitor or if QEMU does not answer."""
        qmp = self._qmp()
        if qmp is None or not (qmp.connected or qmp.connect(timeout)):
            return None
        return qmp

    def _quit(self) -> None:
        """The polite stop over QMP."""
        qmp = self._qmp()
        assert qmp is not None
        try:
            qmp.execute("quit", 1.0)
        except Exception as exc:  # noqa: BLE001 - any failure falls through to signals
            log.debug("QMP quit failed: %s", exc)

    def stop(self, soft_timeout: float = 1.0) -> int:
        """End QEMU: a soft stop first, then SIGKILL (QEMU itself, then its reaper).  Returns its exit status."""
        if self.proc is None:
            return self.returncode or 0
        # Without a monitor, process.stop's own polite stop: SIGTERM to QEMU and its reaper.
        polite = self._quit if self.monitor is not None else None
        self.returncode = process.stop(self.proc, polite, soft_timeout, self.inner_pid)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL at once: for timeouts and escalation, where the guest's state does not matter."""
        if self.proc is not None:
            self.returncode = process.stop(self.proc, timeout=0, inner_pid=self.inner_pid)

    def failure(self, message: str, console_log: Path | None = None) -> MachineError:
        """A MachineError carrying the command line and the log tails."""
        tail = log_tail(self.stderr_log, 800)
        if console_log is not None:
            tail = (log_tail(console_log) + "\n" + tail).strip()
        return MachineError(message, self.argv, tail)

    def __enter__(self) -> Machine:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.kill()
        finally:
            if self.pidfd >= 0:
                os.close(self.pidfd)
                self.pidfd = -1
            if self.qmp is not None:
                qmp, self.qmp = self.qmp, None
                qmp.close()

