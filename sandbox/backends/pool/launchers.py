"""Launchers the pool keeps ready (sandbox/cli/worker.py): `sandbox run`s that have imported themselves already.

Each is a `python -m sandbox.cli.worker` child of the pool, on one end of a
socket pair.  It says "ready" once imported; handed a user's connection
(launch), it runs that user's command line and exits.  The pool keeps
one ready, starting the next after each hand-over, and reaps them.
Started at SCHED_BATCH, so that importing does not take the CPU from a
run; a launcher takes normal priority back when it adopts a run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from sandbox.backends.pool import wire
from sandbox.core import runtime

log = logging.getLogger(__name__)

RESPAWN_AFTER = 5.0  # s before starting another after one died unready (a broken install, say)


@dataclass
class Launcher:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    ready: bool = False
    started: float = field(default_factory=time.monotonic)


class Launchers:
    """The ready launcher (at most one), the ones starting, and the ones running a run until reaped."""

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path
        self.starting: list[Launcher] = []
        self.ready: list[Launcher] = []
        self.running: list[subprocess.Popen[bytes]] = []
        self.next_start = 0.0
        self.handed = 0
        self.users: dict[int, int] = {}  # a running launcher's pid -> the pid of the process the user started

    def wanted(self) -> bool:
        return not self.starting and not self.ready and time.monotonic() >= self.next_start

    def start(self) -> Launcher | None:
        """A new launcher (its socket to watch); None if it could not be started."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.set_inheritable(False)
        argv = [sys.executable, "-m", "sandbox.cli.worker", str(theirs.fileno())]
        try:
            with open(self.log_path, "ab") as log_file:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, pass_fds=(theirs.fileno(),),
                                        close_fds=True, cwd="/")  # fmt: skip
        except OSError as exc:
            log.warning("pool: cannot start a launcher: %s", exc)
            ours.close()
            self.next_start = time.monotonic() + RESPAWN_AFTER
            return None
        finally:
            theirs.close()
        with contextlib.suppress(OSError):
            os.sched_setscheduler(proc.pid, os.SCHED_BATCH, os.sched_param(0))
        launcher = Launcher(proc, ours)
        self.starting.append(launcher)
        return launcher

    def heard(self, launcher: Launcher) -> bool:
        """Its socket is readable: True when it is now ready; False when it died (forget its socket)."""
        try:
            message, fds = wire.receive(launcher.sock)
            for fd in fds:
                os.close(fd)
        except (OSError, wire.WireError):
            message = {}
        if launcher in self.starting:
            self.starting.remove(launcher)
        if message.get("op") == "ready":
            launcher.ready = True
            self.ready.append(launcher)
            return True
        log.warning("pool: a launcher ended before it was ready (see %s)", self.log_path)
        self._end(launcher)
        self.next_start = time.monotonic() + RESPAWN_AFTER
        return False

    def hand(self, launcher: Launcher, conn: socket.socket) -> bool:
        """Give the user's connection to a ready launcher (the caller no longer watches its socket); False if it is gone."""
        self.ready.remove(launcher)
        try:
            wire.send(launcher.sock, {"op": "run"}, [conn.fileno()])
        except OSError:
            self._end(launcher)
            return False
        launcher.sock.close()
        self.running.append(launcher.proc)
        self.users[launcher.proc.pid] = wire.peer_pid(conn)
        self.handed += 1
        return True

    def lost(self, launcher: Launcher) -> None:
        """A ready launcher's socket closed: it died waiting."""
        if launcher in self.ready:
            self.ready.remove(launcher)
        log.warning("pool: a ready launcher ended (see %s)", self.log_path)
        self._end(launcher)
        self.next_start = time.monotonic() + RESPAWN_AFTER

    def reap(self) -> None:
        """Collect the launchers that ended their runs; a killed one's runtime dir goes at once (its run's guest is the pool's to end)."""
        ended = [p for p in self.running if p.poll() is not None]
        self.running = [p for p in self.running if p.returncode is None]
        if any(p.returncode != 0 for p in ended):
            runtime.reclaim_stale(runtime.runtime_base())
        self.users = {pid: user for pid, user in self.users.items() if any(p.pid == pid for p in self.running)}

    def _end(self, launcher: Launcher) -> None:
        launcher.sock.close()
        if launcher.proc.poll() is None:
            launcher.proc.kill()
        launcher.proc.wait()

    def close(self) -> None:
        """End the launchers not running a run (those that are end with their runs)."""
        for launcher in self.starting + self.ready:
            self._end(launcher)
        self.starting, self.ready = [], []
        self.reap()
