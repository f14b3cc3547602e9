"""One QEMU process, run by the launcher inside the confinement walls, running the guest init (a backend.Guest)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from sandbox.wire import protocol
from sandbox.backends.base import PORTS, BootSpec, Channels, RunContext, Share
from sandbox.core.errors import BootStallError, MachineError
from sandbox.core.process import peak_rss_kb, terminating_signals_deferred
from sandbox.plan.timings import Timeline, monotonic_boottime
from sandbox.backends.direct import argv as qemuargv
from sandbox.backends.direct.bootimages import BootImage
from sandbox.backends.direct.machine import Machine
from sandbox.backends.direct import template
from sandbox.backends.direct.template import Builder
from sandbox.core import unixsock

if TYPE_CHECKING:
    from sandbox.confinement.walls import Confinement

log = logging.getLogger(__name__)

QEMU_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


ZERO_HEADROOM_MB = 256  # QEMU's own memory beside guest RAM, with room to spare


@dataclass(frozen=True)
class WarmStart:
    """A restore: the template's RAM (filled in once QEMU runs) and its device state."""

    ram: template.RestoreRam
    state_fd: int


def machine_spec(
    boot: BootSpec,
    kernel: Path,
    initrd: Path,
    console_fd: int,
    monitor_fd: int,
    port_fds: dict[int, int],
    export: Callable[[Path], Path] = lambda p: p,
    ram: qemuargv.GuestRam | None = None,
    incoming: bool = False,
    extra_monitor_fd: int | None = None,
) -> qemuargv.MachineSpec:
    """The QEMU machine for `boot`, with the given descriptors and paths."""
    return qemuargv.MachineSpec(
        qemu=boot.qemu,
        accel=boot.accel,
        machine=boot.machine,
        kernel=kernel,
        initrd=initrd,
        cmdline=boot.cmdline,
        memory_mb=boot.memory_mb,
        cpus=boot.cpus,
        console_fd=console_fd,
        monitor_fd=monitor_fd,
        shares=(Share(protocol.ROOT_TAG, export(Path("/"))),)
        + tuple(Share(s.tag, export(s.path), s.readonly) for s in boot.shares),
        ports=tuple(qemuargv.Port(n, protocol.PORT_NAMES[n], port_fds[n]) for n in sorted(port_fds)),
        tb_size_mb=boot.tb_size_mb,
        cpu_model=boot.cpu_model,
        seccomp=boot.seccomp,
        ram=ram,
        incoming=incoming,
        keyboard=boot.keyboard,
        extra_monitor_fd=extra_monitor_fd,
        net=boot.net,
    )


def template_argv(boot: BootSpec) -> list[str]:
    """QEMU's argv for `boot` with everything that differs between runs made constant.

    What is left is what shapes the guest a template holds: a change in it
    means another template.  Share paths, their modes and seccomp are
    host-side only; descriptors and paths are placeholders.
    """
    canonical = replace(
        boot,
        seccomp=False,
        x11=False,
        shares=tuple(Share(s.tag, Path("/"), True) for s in boot.shares),
        kernel_image=Path("kernel"),
        initrd=Path("initrd"),
        # The guest sets its own MAC (the restored device has the template's).
        net=replace(boot.net, fd=0, mac="52:54:00:00:00:00") if boot.net is not None else None,
    )
    spec = machine_spec(
        canonical,
        kernel=Path("kernel"),
        initrd=Path("initrd"),
        console_fd=0,
        monitor_fd=0,
        port_fds={n: 0 for n in PORTS},
        ram=qemuargv.GuestRam("ram", shared=False),
        incoming=True,
        extra_monitor_fd=0,
    )
    return qemuargv.build_argv(spec)


class DirectGuest:
    """One QEMU process running the guest init (implements backend.Guest).

    A context manager: entering starts QEMU and waits for its machine to be
    built (BootStallError if it never gets there); leaving always ends and
    reaps it and closes every channel.
    """

    def __init__(self, boot: BootSpec, ctx: RunContext, warm: WarmStart | None = None, builder: Builder | None = None) -> None:
        self.boot = boot
        self.monitor_socket = ctx.hooks.monitor_socket
        self.warm = warm
        self.builder = builder
        self._zeroed = False
        self._filling: threading.Thread | None = None
        self._fill_error: str | None = None
        self.rundir = ctx.rundir
        self.timeline = ctx.timeline
        self.confinement = ctx.confinement
        self.verbose = ctx.verbose
        self._stack = contextlib.ExitStack()
        self._qemu_ends: list[socket.socket] = []
        self.machine: Machine | None = None
        self.images: list[BootImage] = []

    # ---- backend.Guest ---------------------------------------------------

    half_close = True

    @property
    def end_fd(self) -> int:
        assert self.machine is not None
        return self.machine.pidfd

    def explain(self, fatal: str) -> str:
        return ""

    def reap(self) -> int | None:
        assert self.machine is not None
        return self.machine.wait()

    def booted(self) -> None:
        # The initramfs is in guest RAM once the init runs (bootimages.py).
        self.images[1].release()

    @property
    def holds_spec(self) -> bool:
        return self.builder is not None

    def ready(self) -> bytes | None:
        if self.builder is None or self.machine is None:
            return None
        if not self._zeroed:
            self._zeroed = True
            # Zeroing makes QEMU touch all of guest RAM once; under a host
            # limit that would not hold it, keep the stale pages instead.
            limit = self.confinement.limits.memory_mb if self.confinement is not None else None
            if limit is None or limit >= self.boot.memory_mb + ZERO_HEADROOM_MB:
                return protocol.ZERO_FREE_MEMORY
        qmp = self.machine.monitor_session()
        if qmp is None:
            return None
        try:
            self.builder.take(qmp)
        except Exception as exc:  # noqa: BLE001 - the run goes on cold whatever went wrong
            log.warning("could not save a template for warm start: %s", exc)
        # The guest's clock stood still while it was paused.
        self.timeline.rebase()
        self.timeline.stamp_host("template_saved", monotonic_boottime())
        return None

    def stop(self, soft_timeout: float = 1.0) -> int:
        assert self.machine is not None
        return self.machine.stop(soft_timeout)

    def kill(self) -> None:
        assert self.machine is not None
        self.machine.kill()

    def host_identity(self) -> tuple[str, str]:
        # No name of its own: the sandbox's name is the registry's.
        return "", (self.confinement.process_label or "") if self.confinement is not None else ""

    def finish(self) -> None:
        # QEMU holds nothing to save (no disk image; shares' writes are
        # synced), and the guest's own power-off, emulated under TCG,
        # took ~45 ms more before QEMU exited.
        self.kill()

    def pids(self) -> tuple[int, ...]:
        assert self.machine is not None
        return tuple(p for p in (self.machine.pid, self.machine.inner_pid) if p is not None)

    def peak_rss_kb(self) -> int | None:
        """QEMU's peak resident set, read while it still runs."""
        return peak_rss_kb(self.pids()[-1])

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
        try:
            self._stack.close()
        finally:
            if self._filling is not None:
                self._filling.join()  # it writes into a descriptor the caller closes next

    def _pair(self) -> tuple[socket.socket, socket.socket]:
        """A socketpair: our end, and QEMU's end, which it inherits and we close once it has started."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stack.callback(ours.close)
        self._stack.callback(theirs.close)
        self._qemu_ends.append(theirs)
        return ours, theirs

    def _start(self) -> None:
        boot = self.boot
        ports = {n: self._pair() for n in PORTS}
        console, monitor = self._pair(), self._pair()
        self.channels = Channels.of_ports({n: pair[0] for n, pair in ports.items()}, console[0], boot.x11)
        # Kernel and initramfs go to QEMU as open files: a QEMU that runs as
        # another uid, in another mount namespace, needs no path to our cache.
        # For a cold boot a PVH kernel goes as a private copy the launcher can
        # empty (bootimages.py); a bzImage is read into QEMU's own memory, so
        # a copy would gain nothing.  A restore never writes them into guest
        # RAM (QEMU skips that while a migration comes in), so the cached
        # files themselves go, their pages shared by every sandbox.
        cold = self.warm is None
        self.images = [BootImage(boot.kernel_image, private=boot.pvh and cold), BootImage(boot.initrd, private=cold)]
        for image in self.images:
            self._stack.callback(image.close)
        extra_fds: list[int] = []
        ram: qemuargv.GuestRam | None = None
        if self.warm is not None:
            ram = qemuargv.GuestRam(f"/proc/self/fd/{self.warm.ram.fd}", shared=False)
            extra_fds += [self.warm.ram.fd, self.warm.state_fd]
        elif self.builder is not None:
            ram = qemuargv.GuestRam(f"/proc/self/fd/{self.builder.ram_fd}", shared=True)
            extra_fds.append(self.builder.ram_fd)
        extra_monitor: int | None = None
        if self.monitor_socket is not None:
            # Bound and listening here, handed over as a descriptor: QEMU
            # needs no path, and only this user can reach the socket file.
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._stack.callback(listener.close)
            with contextlib.suppress(FileNotFoundError):
                self.monitor_socket.unlink()
            unixsock.bind(listener, self.monitor_socket)
            listener.listen(4)
            self._qemu_ends.append(listener)
            extra_monitor = listener.fileno()
        export: Callable[[Path], Path] = self.confinement.export_path if self.confinement is not None else (lambda p: p)
        spec = machine_spec(
            boot,
            kernel=self.images[0].proc_path,
            initrd=self.images[1].proc_path,
            console_fd=console[1].fileno(),
            monitor_fd=monitor[1].fileno(),
            port_fds={n: ports[n][1].fileno() for n in PORTS},
            export=export,
            ram=ram,
            incoming=self.warm is not None,
            extra_monitor_fd=extra_monitor,
        )
        argv = qemuargv.build_argv(spec)
        if self.verbose:
            log.info("qemu: %s", " ".join(argv))
        machine = Machine(
            argv,
            pass_fds=tuple(s.fileno() for s in self._qemu_ends)
            + tuple(i.fd for i in self.images)
            + tuple(extra_fds)
            + ((boot.net.fd,) if boot.net is not None else ()),
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
        if self.warm is not None:
            # The RAM data goes in while QEMU initialises and the monitor
            # connects (the copy runs outside the GIL); the guest runs only
            # after migrate-incoming, which waits for it.
            self._filling = threading.Thread(target=self._fill, name="sandbox-fill", daemon=True)
            self._filling.start()

    def _fill(self) -> None:
        assert self.warm is not None
        try:
            self.warm.ram.fill()
        except OSError as exc:
            self._fill_error = exc.strerror or str(exc)

    def _restore(self, timeout: float, attempt: int) -> None:
        """Feed QEMU the template's device state; it runs the guest once that is loaded."""
        assert self.machine is not None and self.warm is not None
        qmp = self.machine.monitor_session(timeout)
        if qmp is None:
            raise self.failure(f"QEMU never answered its monitor (restore, attempt {attempt})")
        qmp.execute("migrate-set-capabilities", timeout, template.IGNORE_SHARED)
        if self.boot.net is not None:
            # After a restore QEMU announces the NIC (RARP) with the MAC it
            # restored: the template's, shared by every clone.  None of that
            # onto a LAN: the guest sets its own MAC and speaks for itself.
            qmp.execute("migrate-set-parameters", timeout, {"announce-rounds": 0})
        assert self._filling is not None
        self._filling.join()
        if self._fill_error is not None:
            raise template.TemplateError(f"cannot read the template's RAM: {self._fill_error}")
        qmp.execute("migrate-incoming", timeout, {"uri": f"fd:{self.warm.state_fd}"})

    def wait_built(self, timeout: float, attempt: int) -> None:
        """Wait until QEMU's main loop answers: the machine is built and the kernel in guest RAM.

        A restore has no copy to drop and goes on at once: the relay's
        progress deadline covers a restore that never resumes.
        """
        assert self.machine is not None
        if self.warm is not None:
            self._restore(timeout, attempt)
            return
        if self.machine.wait_running(timeout):
            self.images[0].release()
        elif self.machine.poll() is None:
            raise BootStallError(
                f"guest boot made no progress for {timeout:g} s (attempt {attempt}): QEMU never answered its monitor",
                self.machine.argv,
                self.machine.failure("").log_tail,
            )
