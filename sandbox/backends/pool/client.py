"""`sandbox run`'s side of the pool: a Backend that takes a ready guest from the user's pool, else restores as before.

On entry it asks the pool (sandbox/backends/pool/daemon.py) for a guest made for
this request's machine and walls (key.py).  Given one, the run relays it
as any other guest: its channels and QEMU's pidfd came over the pool's
socket, and the pool's connection stays open for the run's length (when
it closes, however this process ends, the pool ends that guest).  Not
given one (no pool, another user's, a busy or a cold one, a request the
pool cannot serve), the run is the direct backend's, restored per run,
and a pool is started for the next runs when the settings ask for one.
Nothing of the direct backend is imported on the pooled path: that is
what makes the start quick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox.backends.base import Attempt, BootOnce, BootSpec, Channels, Prepared, RunContext, RunResult
from sandbox.backends.pool import key as keys
from sandbox.backends.pool import paths, wire
from sandbox.confinement.audit import summarize_argv
from sandbox.core.errors import MachineError, SandboxError
from sandbox.core.logs import log_tail
from sandbox.core.process import peak_rss_kb
from sandbox.plan.request import RunRequest
from sandbox.plan.timings import monotonic_boottime
from sandbox.core import unixsock

if TYPE_CHECKING:
    from sandbox.backends.base import Backend
    from sandbox.image.host import QemuInfo

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # s for the pool to answer (it answers at once; a stuck one is no pool)


@dataclass
class Claim:
    """A pooled guest handed to this run: the pool's connection, the guest's descriptors, what the pool said of it."""

    conn: socket.socket
    fds: list[int]  # control, stdin, stdout, stderr, console, exec, QEMU's pidfd
    info: dict[str, Any]

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []
        self.conn.close()


def claim(request: RunRequest) -> tuple[Claim | None, str]:
    """A guest from this user's pool, or None and why not."""
    why = keys.unpoolable(request)
    if why is not None:
        return None, f"the pool does not serve {why}"
    if not paths.usable():
        return None, "no runtime directory of this user's to find a pool in"
    path = paths.socket_path()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn.settimeout(CONNECT_TIMEOUT)
    try:
        unixsock.connect(conn, path)
        if wire.peer_uid(conn) != os.geteuid():
            raise SandboxError(f"{path} is another user's")  # never used, whatever it says
        wire.send(conn, {"op": "run", "key": keys.key(request), "command": summarize_argv(request.command.argv),
                         "nice": os.getpriority(os.PRIO_PROCESS, 0)})  # fmt: skip
        answer, fds = wire.receive(conn)
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        _forget_dead_pool()
        return None, NO_POOL
    except (OSError, SandboxError) as exc:
        conn.close()
        return None, f"the pool did not answer ({exc})"
    if not answer.get("ok") or len(fds) != 7:
        for fd in fds:
            os.close(fd)
        conn.close()
        return None, str(answer.get("why", "the pool sent no guest"))
    conn.settimeout(None)
    return Claim(conn, fds, answer), ""


NO_POOL = "no pool runs"


def _forget_dead_pool() -> None:
    """A killed pool's socket: removed if no pool holds the lock (the next pool would replace it anyway)."""
    import fcntl

    try:
        fd = os.open(paths.lock_path(), os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.socket_path())
    except OSError:
        pass  # a pool holds it: starting, say
    finally:
        os.close(fd)


class PooledGuest:
    """A guest the pool made, relayed here (implements backend.Guest)."""

    half_close = True
    holds_spec = False

    def __init__(self, claimed: Claim, console_log: Path, verbose: int = 0) -> None:
        self.console_log = console_log
        control, stdin, stdout, stderr, console, exec_port, self.pidfd = claimed.fds
        socks = [socket.socket(fileno=fd) for fd in (control, stdin, stdout, stderr, console, exec_port)]
        self.channels = Channels(socks[0], socks[1], socks[2], socks[3], socks[4], exec=socks[5])
        claimed.fds = []  # ours now
        self.qemu_pid = int(claimed.info["qemu_pid"])
        self.label = str(claimed.info.get("label", ""))
        argv = claimed.info.get("argv")
        self.argv = [str(a) for a in argv] if isinstance(argv, list) else []
        if verbose:
            log.info("qemu: %s", " ".join(self.argv))
            log.info("pooled guest: QEMU %d, made %.1f s ago by the pool", self.qemu_pid, float(claimed.info.get("waited_s", 0)))

    def __enter__(self) -> PooledGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.channels.close()
        with contextlib.suppress(OSError):
            os.close(self.pidfd)

    @property
    def end_fd(self) -> int:
        return self.pidfd

    def _ended(self) -> bool:
        return bool(select.select([self.pidfd], [], [], 0)[0])

    def reap(self) -> int | None:
        return 0 if self._ended() else None  # not our child: the pool reaps it

    def booted(self) -> None:
        pass

    def ready(self) -> bytes | None:
        return None

    def stop(self, soft_timeout: float = 1.0) -> int:
        if not select.select([self.pidfd], [], [], soft_timeout)[0]:
            self.kill()
            select.select([self.pidfd], [], [], 10)
        return 0

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def finish(self) -> None:
        self.kill()

    def host_identity(self) -> tuple[str, str]:
        return "", self.label

    def pids(self) -> tuple[int, ...]:
        return (self.qemu_pid,)

    def peak_rss_kb(self) -> int | None:
        return peak_rss_kb(self.qemu_pid)

    def wait_built(self, timeout: float, attempt: int) -> None:
        pass  # built, restored and prepped before we asked

    def explain(self, fatal: str) -> str:
        return ""

    def failure(self, message: str) -> MachineError:
        return MachineError(message, self.argv, log_tail(self.console_log))


class PoolBackend:
    """A pooled guest when the pool has one for this request, else the direct backend (implements backend.Backend)."""

    name = "pool"
    local_files = True

    def __init__(self, request: RunRequest) -> None:
        self.request = request
        self.claimed, why = claim(request)
        self.claimed_at = monotonic_boottime()
        self.fallback: Backend | None = None
        if self.claimed is None:
            log.info("no pooled guest: %s", why)
            if why == NO_POOL and request.pool > 0:
                from sandbox.backends.pool import control

                control.start_in_background(request, request.pool, request.pool_idle)
            from sandbox.backends.direct.backend import DirectBackend

            self.fallback = DirectBackend(request)

    @property
    def confined_here(self) -> bool:
        return self.fallback.confined_here if self.fallback is not None else False  # the pool put up the walls

    def __enter__(self) -> PoolBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.claimed is not None:
            self.claimed.close()  # the pool ends the guest now
        if self.fallback is not None:
            self.fallback.__exit__(*exc)

    def prepare(self, request: RunRequest) -> Prepared:
        if self.fallback is not None:
            return self.fallback.prepare(request)
        assert self.claimed is not None
        info = self.claimed.info
        if (request.machine.accel or "auto") == "auto":
            from sandbox.image import host

            # What a restored run says of its accelerator, said by a pooled one too (once per user, and with -v).
            _accel, warning = host.choose_accel("auto")
            if warning and host.show_accel_notice(request.verbose):
                log.warning("%s", warning)
        qemu: QemuInfo = _qemu_info(str(info.get("machine", "")) == "microvm")
        accel = str(info.get("accel", "tcg"))
        return Prepared(accel, qemu, str(info.get("machine", "")), Path(str(info.get("kernel", ""))), True, Path(""), "", None)

    def run(self, boot: BootSpec, ctx: RunContext, once: BootOnce) -> RunResult:
        if self.fallback is not None:
            return self.fallback.run(boot, ctx, once)
        claimed = self.claimed
        assert claimed is not None
        ctx.timeline.stamp_host("handed_off", self.claimed_at)
        result = once(lambda: PooledGuest(claimed, ctx.rundir / "console.log", ctx.verbose), Attempt(1, "pooled", what="the pooled guest"))
        with contextlib.suppress(OSError, SandboxError):
            wire.send(claimed.conn, {"op": "ended", "status": result.status})  # for the pool's audit record
        return result

    def ready(self, request: RunRequest, boot: BootSpec) -> str | None:
        if self.fallback is not None:
            return self.fallback.ready(request, boot)
        return "a pooled guest is ready"

    def vouched_images(self, trees: list[str], images_dir: str) -> tuple[dict[str, str], list[str]]:
        from sandbox.backends.pool import control

        return control.images(trees, images_dir)  # the pool's watcher, even for a run it does not serve


def _qemu_info(microvm: bool) -> QemuInfo:
    from sandbox.image.host import QemuInfo

    return QemuInfo("(the pool's)", "", microvm, True)
