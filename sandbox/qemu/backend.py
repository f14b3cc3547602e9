"""The direct backend: the launcher runs QEMU itself, inside the confinement walls."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from .. import protocol
from ..backend import Channels
from ..errors import BootStallError, MachineError
from ..process import terminating_signals_deferred
from ..timings import Timeline, monotonic_boottime
from . import argv as qemuargv
from .bootimages import BootImage
from .machine import Machine

if TYPE_CHECKING:
    from ..confinement.walls import Confinement

log = logging.getLogger(__name__)

QEMU_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class BootSpec:
    """What shapes the machine: the resolved boot inputs and the run's hardware."""

    qemu: str
    accel: str
    machine: str
    kernel_image: Path
    pvh: bool  # kernel_image is the extracted ELF
    initrd: Path
    cmdline: str
    memory_mb: int
    cpus: int
    tb_size_mb: int | None
    cpu_model: str | None
    seccomp: bool
    x11: bool
    shares: tuple[qemuargv.Share, ...]  # after the root's


class DirectGuest:
    """One QEMU process running the guest init (implements backend.Guest).

    A context manager: entering starts QEMU and waits for its machine to be
    built (BootStallError if it never gets there); leaving always ends and
    reaps it and closes every channel.
    """

    def __init__(self, boot: BootSpec, rundir: Path, timeline: Timeline, confinement: Confinement | None, verbose: int = 0) -> None:
        self.boot = boot
        self.rundir = rundir
        self.timeline = timeline
        self.confinement = confinement
        self.verbose = verbose
        self._stack = contextlib.ExitStack()
        self._qemu_ends: list[socket.socket] = []
        self.machine: Machine | None = None
        self.images: list[BootImage] = []

    # ---- backend.Guest ---------------------------------------------------

    @property
    def end_fd(self) -> int:
        assert self.machine is not None
        return self.machine.pidfd

    def reap(self) -> int | None:
        assert self.machine is not None
        return self.machine.wait()

    def booted(self) -> None:
        # The initramfs is in guest RAM once the init runs (bootimages.py).
        self.images[1].release()

    def stop(self, soft_timeout: float = 1.0) -> int:
        assert self.machine is not None
        return self.machine.stop(soft_timeout)

    def kill(self) -> None:
        assert self.machine is not None
        self.machine.kill()

    def pids(self) -> tuple[int, ...]:
        assert self.machine is not None
        return tuple(p for p in (self.machine.pid, self.machine.inner_pid) if p is not None)

    def peak_rss_kb(self) -> int | None:
        """QEMU's peak resident set (VmHWM), read while it still runs."""
        pid = self.pids()[-1]
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return None

    def failure(self, message: str) -> MachineError:
        assert self.machine is not None
        return self.machine.failure(message, self.rundir / "console.log")

    # ---- lifecycle -----------------------------------------------------------

    def __enter__(self) -> DirectGuest:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stack.close()

    def _pair(self) -> tuple[socket.socket, socket.socket]:
        """A socketpair: our end, and QEMU's end, which it inherits and we close once it has started."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stack.callback(ours.close)
        self._stack.callback(theirs.close)
        self._qemu_ends.append(theirs)
        return ours, theirs

    def _start(self) -> None:
        boot = self.boot
        numbers = [protocol.PORT_CONTROL, protocol.PORT_STDIN, protocol.PORT_STDOUT, protocol.PORT_STDERR]
        if boot.x11:
            numbers.append(protocol.PORT_X11)
        ports = {n: self._pair() for n in numbers}
        console, monitor = self._pair(), self._pair()
        self.channels = Channels(
            control=ports[protocol.PORT_CONTROL][0],
            stdin=ports[protocol.PORT_STDIN][0],
            stdout=ports[protocol.PORT_STDOUT][0],
            stderr=ports[protocol.PORT_STDERR][0],
            console=console[0],
            x11=ports[protocol.PORT_X11][0] if boot.x11 else None,
        )
        # Kernel and initramfs go to QEMU as open files: a QEMU that runs as
        # another uid, in another mount namespace, needs no path to our cache.
        # A PVH kernel goes as a private copy the launcher can empty
        # (bootimages.py); a bzImage is read into QEMU's own memory, so a
        # copy would gain nothing.
        self.images = [BootImage(boot.kernel_image, private=boot.pvh), BootImage(boot.initrd, private=True)]
        for image in self.images:
            self._stack.callback(image.close)
        export: Callable[[Path], Path] = self.confinement.export_path if self.confinement is not None else (lambda p: p)
        spec = qemuargv.MachineSpec(
            qemu=boot.qemu,
            accel=boot.accel,
            machine=boot.machine,
            kernel=self.images[0].proc_path,
            initrd=self.images[1].proc_path,
            cmdline=boot.cmdline,
            memory_mb=boot.memory_mb,
            cpus=boot.cpus,
            console_fd=console[1].fileno(),
            monitor_fd=monitor[1].fileno(),
            shares=(qemuargv.Share(protocol.ROOT_TAG, export(Path("/"))),)
            + tuple(qemuargv.Share(s.tag, export(s.path), s.readonly) for s in boot.shares),
            ports=tuple(qemuargv.Port(n, protocol.PORT_NAMES[n], ports[n][1].fileno()) for n in numbers),
            tb_size_mb=boot.tb_size_mb,
            cpu_model=boot.cpu_model,
            seccomp=boot.seccomp,
        )
        argv = qemuargv.build_argv(spec)
        if self.verbose:
            log.info("qemu: %s", " ".join(argv))
        machine = Machine(
            argv,
            pass_fds=tuple(s.fileno() for s in self._qemu_ends) + tuple(i.fd for i in self.images),
            cwd=self.rundir,
            env=QEMU_ENV,
            stderr_log=self.rundir / "qemu.log",
            monitor=monitor[0],
            preexec=self.confinement.preexec if self.confinement is not None else None,
        )
        self.timeline.stamp_host("qemu_exec", monotonic_boottime())
        # Until QEMU's own pid is known (under confinement it sits below a
        # reaper), a signal would unwind into killing only the reaper.
        with terminating_signals_deferred():
            self._stack.enter_context(machine)
            self.machine = machine
            if self.confinement is not None:
                self.confinement.started(machine.pid, self.rundir)
                machine.inner_pid = self.confinement.qemu_pid
        for s in self._qemu_ends:
            s.close()

    def wait_built(self, timeout: float, attempt: int) -> None:
        """Wait until QEMU's main loop answers: the machine is built and the kernel in guest RAM."""
        assert self.machine is not None
        if self.machine.wait_running(timeout):
            self.images[0].release()
        elif self.machine.poll() is None:
            raise BootStallError(
                f"guest boot made no progress for {timeout:g} s (attempt {attempt}): QEMU never answered its monitor",
                self.machine.argv,
                self.machine.failure("").log_tail,
            )
