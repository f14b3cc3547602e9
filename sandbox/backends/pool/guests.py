"""One pooled guest: restored from the template, confined as a run is, prepped, waiting; then handed to one run.

Everything a run's guest has, made before the run: its runtime dir, its
walls (its own MCS label, uid, namespaces, seccomp, cgroup), QEMU
restored from the template (sharing its pages with the pool's other
guests), the host's root mounted in the guest and the common paths
exercised (protocol.PREPARE).  While it is made, QEMU runs at the lowest
scheduling priority, so that filling the pool does not slow a run; it
gets its normal priority back when handed over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from dataclasses import dataclass

from sandbox.backends.base import BootSpec, RunContext, RunHooks
from sandbox.backends.direct.backend import DirectBackend, restore_inputs
from sandbox.backends.direct.guest import DirectGuest
from sandbox.backends.pool import freshness
from sandbox.confinement import walls
from sandbox.core import runtime
from sandbox.core.errors import SandboxError
from sandbox.plan.timings import Timeline
from sandbox.wire import protocol

log = logging.getLogger(__name__)

PREP_TIMEOUT = 60.0  # s for a restored guest to be prepped (TCG on a busy host)
SCHED_IDLE, SCHED_BATCH, SCHED_OTHER = 5, 3, 0


class NoTemplate(SandboxError):
    """There is no warm-start template to restore pool guests from (yet)."""


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def set_priority(pid: int, background: bool, nice: int | None = None) -> None:
    """Every thread of `pid` in the background class (filling), or back to normal (handed over), at the run's launcher's nice value.

    Root uses SCHED_IDLE; a normal user, who may not leave SCHED_IDLE
    again (RLIMIT_NICE), SCHED_BATCH.  A niced run's QEMU is niced as its
    launcher is (as a QEMU it starts itself would be).
    """
    idle = SCHED_IDLE if os.geteuid() == 0 else SCHED_BATCH
    for tid in _threads(pid):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, idle if background else SCHED_OTHER, os.sched_param(0))
            if nice is not None:
                os.setpriority(os.PRIO_PROCESS, tid, nice)


@dataclass(frozen=True)
class HandOff:
    """What a run gets: the launcher's ends of the guest's channels, QEMU's pidfd, and what to tell `list`."""

    fds: list[int]  # control, stdin, stdout, stderr, console, exec, then QEMU's pidfd
    info: dict[str, object]


class ReadyGuest:
    """A guest for one run: made by `prepare` (blocking), handed over once, ended by `close`."""

    def __init__(self, backend: DirectBackend, boot: BootSpec, confinement: walls.ConfinementSpec | None, watch: tuple[str, ...] = (),
                 images: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.backend, self.boot, self.spec, self.watch = backend, boot, confinement, watch
        self.images = images  # current images of host trees, mounted ahead (a run naming one moves it into place)
        self.fingerprint: freshness.Fingerprint = ()
        self.mounts = b""  # the host's mount table when its QEMU's namespace was made (freshness.mount_table)
        self.stack = contextlib.ExitStack()
        self.guest: DirectGuest | None = None
        self.confinement: walls.Confinement | None = None
        self.qemu_pid: int | None = None
        self.label = ""
        self.made = 0.0
        self.watched = False  # the pool's loop watches its end (sandbox/backends/pool/daemon.py)

    def prepare(self) -> None:
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise

    def _prepare(self) -> None:
        # Before QEMU's namespace copies the table: a mount in between then shows as a change.
        self.mounts = freshness.mount_table()
        rundir = self.stack.enter_context(runtime.runtime_dir())
        confinement = None
        if self.spec is not None:
            confinement = self.stack.enter_context(walls.Confinement(self.spec, ("(pool guest, waiting)",), rundir, []))
            self.label = confinement.process_label or ""
            self.confinement = confinement
        ctx = RunContext(rundir, Timeline(), confinement, 0, RunHooks())
        store = self.backend.store(self.boot)
        if store is None or store.load(self.boot.memory_mb << 20) is None:
            raise NoTemplate("no warm-start template to restore pool guests from")
        warm = self.stack.enter_context(restore_inputs(store, self.boot.memory_mb))
        if warm is None:
            raise NoTemplate("the warm-start template could not be used")
        guest = self.stack.enter_context(DirectGuest(self.boot, ctx, warm=warm))
        self.guest = guest
        if freshness.mount_table() != self.mounts:
            self.mounts = b""  # a mount or unmount while its namespace was made: which view it got is unknown
        self.qemu_pid = guest.pids()[-1]
        set_priority(self.qemu_pid, background=True)
        guest.wait_built(PREP_TIMEOUT, 1)
        set_priority(self.qemu_pid, background=True)  # the threads QEMU made meanwhile too
        # Before it reads anything: a change after this is seen at hand-off, even one it read.
        self.fingerprint = freshness.settled_fingerprint(self.watch)
        if self.images:
            guest.channels.control.sendall(protocol.premount_message(list(self.images)))
        guest.channels.control.sendall(protocol.PREPARE)
        self._wait_prepped(guest)
        self.made = time.monotonic()

    def _wait_prepped(self, guest: DirectGuest) -> None:
        """Until the guest stamps "prepped" (the console is read and dropped meanwhile)."""
        ch = guest.channels
        deadline = time.monotonic() + PREP_TIMEOUT
        pending = b""
        watched = [ch.control.fileno(), ch.console.fileno(), guest.end_fd]
        while time.monotonic() < deadline:
            ready, _, _ = select.select(watched, [], [], max(0.0, deadline - time.monotonic()))
            if guest.end_fd in ready:
                raise SandboxError("a pool guest ended while it was prepared")
            if ch.console.fileno() in ready and not ch.console.recv(65536):
                raise SandboxError("a pool guest's console closed")
            if ch.control.fileno() in ready:
                data = ch.control.recv(4096)
                if not data:
                    raise SandboxError("a pool guest's control port closed")
                pending += data
                *lines, pending = pending.split(b"\n")
                if len(pending) > protocol.MAX_LINE:
                    raise SandboxError("a pool guest sent a control line that never ends")
                for line in lines:
                    parsed = protocol.parse_line(line)
                    if parsed is not None and isinstance(parsed[1], protocol.Stamp) and parsed[1].phase == "prepped":
                        if pending:
                            raise SandboxError("a pool guest said more than it should before its run")
                        return
                    if parsed is not None and isinstance(parsed[1], protocol.Fatal):
                        raise SandboxError(f"a pool guest failed: {parsed[1].message}")
        raise SandboxError(f"a pool guest was not ready in {PREP_TIMEOUT:g} s")

    @property
    def end_fd(self) -> int:
        assert self.guest is not None
        return self.guest.end_fd

    def hand_off(self, command: object, client_pid: int, nice: object = None) -> HandOff:
        """The run's ends of the channels and QEMU's pidfd (the caller sends and then closes them).

        `command` is the run's (as audit.summarize_argv gives it): the
        audit trail says which command this guest served, and for whom.
        """
        guest = self.guest
        assert guest is not None and self.qemu_pid is not None
        if self.confinement is not None:
            self.confinement.served(command if isinstance(command, dict) else {"argv": ["?"]}, client_pid)
        set_priority(self.qemu_pid, background=False, nice=nice if isinstance(nice, int) and not isinstance(nice, bool) else None)
        ch = guest.channels
        exec_port = ch.exec
        assert exec_port is not None
        socks = [ch.control, ch.stdin, ch.stdout, ch.stderr, ch.console, exec_port]
        fds = [os.dup(s.fileno()) for s in socks] + [os.pidfd_open(self.qemu_pid)]
        # The pool keeps no end of the run's channels: the run's copies are the only ones.
        for s in socks:
            s.close()
        b = self.boot
        info: dict[str, object] = {"qemu_pid": self.qemu_pid, "label": self.label, "argv": guest.failure("").argv, "accel": b.accel, "kernel": str(b.kernel_image),
                                   "memory_mb": b.memory_mb, "cpus": b.cpus, "machine": b.machine, "waited_s": round(time.monotonic() - self.made, 3)}  # fmt: skip
        return HandOff(fds, info)

    def ended(self, status: int | None) -> None:
        """The run's exit status, for the audit trail's stop record."""
        if self.confinement is not None:
            self.confinement.ended(status)

    def close(self) -> None:
        """End QEMU (if it still runs) and take down its walls and runtime dir."""
        self.stack.close()
