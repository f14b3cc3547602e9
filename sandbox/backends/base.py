"""The seam between a run and whatever runs its guest: the Backend and Guest interfaces, and the types they share.

A backend prepares the boot inputs for a request (`prepare`), then runs
the guest as many times as its own policy says (`run`: warm start and
its fallbacks for the direct backend, one domain for libvirt), calling the
runner's `once` for each attempt with a factory of `Guest`s.  The relay
(sandbox/run/relay.py) and the runner see only these interfaces.

Backends are registered in BACKENDS below (a module path each, imported
only when chosen): adding one is a module and a line there.
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sandbox.wire import protocol
from sandbox.core.errors import MachineError, SandboxError
from sandbox.plan.timings import Timeline

if TYPE_CHECKING:
    from sandbox.confinement.walls import Confinement
    from sandbox.image.host import QemuInfo
    from sandbox.plan.mounts import Plan
    from sandbox.plan.request import RunRequest

# The CPU a TCG guest gets, from either backend: x86-64-v2 (what
# distributions build for, and then some) on the plain qemu64 model.
# "max" boots ~120 ms slower (benchmarks/README.md): the guest then sets up
# 5-level paging, XSAVE state for AVX-512 and more, all of which TCG
# emulates at a cost.  ARAT (the APIC timer keeps running in deep idle)
# lets the guest stop its tick when idle: without it the kernel wants a
# broadcast timer (an HPET or PIT, which microvm does not have) for
# one-shot mode, stays on a 250 Hz periodic tick, and each idle guest costs
# ~5% of a core under TCG (a waiting pool guest most of all).
TCG_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16,+arat"


@dataclass(frozen=True)
class Share:
    """A host directory exported to the guest over virtio-9p, under a mount tag."""

    tag: str
    path: Path
    readonly: bool = True


@dataclass(frozen=True)
class NetDevice:
    """A virtio-net NIC whose backend QEMU gets as an open descriptor (it opens nothing itself)."""

    kind: str  # "tap" (a tap's queue) or "stream" (a connected socket: passt)
    fd: int
    mac: str


@dataclass(frozen=True)
class Prepared:
    """The boot inputs a backend resolved for a request (the same for every attempt)."""

    accel: str
    qemu: QemuInfo
    machine: str
    kernel_image: Path
    pvh: bool  # kernel_image is the extracted ELF
    initrd: Path
    cmdline: str
    tsc_khz: int | None


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
    shares: tuple[Share, ...]  # after the root's
    keyboard: bool = False
    net: NetDevice | None = None


# The same ports for every run, X11's included (unused without --x11), so
# that one template serves all runs.
PORTS = (protocol.PORT_CONTROL, protocol.PORT_STDIN, protocol.PORT_STDOUT, protocol.PORT_STDERR, protocol.PORT_X11, protocol.PORT_EXEC)


@dataclass(frozen=True)
class Started:
    """A machine runs the guest (for `sandbox list` and `info`)."""

    qemu_pid: int | None  # None: QEMU is libvirtd's, perhaps on another host
    accel: str
    kernel: str
    memory_mb: int
    cpus: int
    start: str  # warm or cold
    label: str
    shares: tuple[str, ...]
    x11_display: int | None = None  # the nested X server (Xephyr) on the host
    x11_auth: str = ""
    network: str = "none"
    machine: str = ""  # the backend's name for it, where it has one (a libvirt domain)


@dataclass
class RunResult:
    """How a run ended."""

    status: int
    timeline: Timeline = field(default_factory=Timeline)
    qemu_peak_rss_kb: int | None = None


@dataclass(frozen=True)
class Attempt:
    """One boot of a run, as its backend sees it."""

    number: int
    start: str  # for --timings and `info`: "warm", "cold", "cold, building the template", "cold, libvirt"
    progress_timeout: float | None = None  # at most this long without progress (a restore is quick or broken)
    fallback: bool = False  # a failure before the command starts is the backend's to retry another way
    what: str = "the guest"  # for messages: "the restored guest", ...


@dataclass(frozen=True)
class RunHooks:
    """How the run's registry entry follows it (all optional)."""

    on_started: Callable[[Started], None] | None = None  # told each time a machine runs the guest
    monitor_socket: Path | None = None  # a QMP socket for other commands (send-key), bound here
    exec_socket: Path | None = None  # where `sandbox exec` reaches this run (sandbox/features/execs.py)
    stop_grace: Callable[[], float | None] = lambda: None  # what `sandbox stop -t` gives the command, once asked
    launcher_pid: int | None = None  # the process the user started, when it is not this one (a pooled launch)


@dataclass(frozen=True)
class RunContext:
    """The live parts of one run that a backend's guests use."""

    rundir: Path
    timeline: Timeline
    confinement: Confinement | None
    verbose: int
    hooks: RunHooks
    overlays: tuple[str, ...] = ()  # the host directories the guest shows copy-on-write


GuestFactory = Callable[[], AbstractContextManager["Guest"]]
# The runner's side of an attempt: run the guest a factory makes, relaying
# the command; raises WarmStartFailed (an attempt with `fallback` that failed
# before the command started) or BootStallError.
BootOnce = Callable[[GuestFactory, Attempt], RunResult]


class WarmStartFailed(SandboxError):
    """An attempt that may fall back (a restore, a template build) failed before the command started."""

    def __init__(self, message: str, template_broken: bool, stalled: bool = False) -> None:
        super().__init__(message)
        self.template_broken = template_broken
        self.stalled = stalled  # no progress (perhaps a busy host), rather than a guest that failed


class Backend(Protocol):
    """Runs guests for runs; a context manager (a connection, say, lives as long as the run)."""

    name: str
    # Whether the launcher's own walls (sandbox/confinement) go around the
    # guest; a backend whose guests run elsewhere has walls of its own.
    confined_here: bool
    # Whether the guest sees this host's files (not a remote libvirt host's).
    local_files: bool

    def prepare(self, request: RunRequest) -> Prepared:
        """Resolve and place the boot inputs (kernel, initramfs, accelerator, machine)."""
        ...

    def run(self, boot: BootSpec, ctx: RunContext, once: BootOnce) -> RunResult:
        """Run the guest, through `once`, as often as this backend's policy says."""
        ...

    def ready(self, request: RunRequest, boot: BootSpec) -> str | None:
        """For `sandbox prepare`: what the request's first run would make, if it is there (a line); None when a run must make it."""
        ...

    def vouched_images(self, trees: list[str], images_dir: str) -> tuple[dict[str, str], list[str]]:
        """What a watcher of this backend's knows of host trees' images (image/hostfiles.py): ({tree: current image}, trees it decided)."""
        ...

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: object) -> None: ...

def boot_spec(request: RunRequest, prep: Prepared, plan: Plan, net: NetDevice | None = None, seccomp: bool = False) -> BootSpec:
    """The machine for this run (the same for every attempt)."""
    m = request.machine
    return BootSpec(
        qemu=prep.qemu.path,
        accel=prep.accel,
        machine=prep.machine,
        kernel_image=prep.kernel_image,
        pvh=prep.pvh,
        initrd=prep.initrd,
        cmdline=prep.cmdline,
        memory_mb=m.memory_mb,
        cpus=m.cpus,
        tb_size_mb=m.tb_size_mb if prep.accel == "tcg" else None,
        cpu_model=m.cpu_model,
        seccomp=seccomp and prep.qemu.seccomp,
        x11=request.x11 is not None,
        shares=tuple(Share(tag, share.host, readonly=not share.writable) for tag, share in plan.shares),
        keyboard=m.keyboard,
        net=net,
    )


@dataclass(frozen=True)
class Registered:
    """A backend in the registry: which requests it takes, and where its class is."""

    name: str
    takes: Callable[[RunRequest], bool]
    factory: str  # "module:callable", taking the request and returning a Backend


BACKENDS: list[Registered] = [
    Registered("libvirt", lambda r: r.connect is not None, "sandbox.backends.libvirt.backend:LibvirtBackend"),
    # A ready guest from the user's pool when it has one for this request, else the direct backend's own.
    Registered("pool", lambda r: r.pool > 0, "sandbox.backends.pool.client:PoolBackend"),
    Registered("direct", lambda r: True, "sandbox.backends.direct.backend:DirectBackend"),
]


def choose(request: RunRequest) -> Registered:
    """The first registered backend that takes the request."""
    return next(b for b in BACKENDS if b.takes(request))


@contextmanager
def open_backend(request: RunRequest) -> Iterator[Backend]:
    """The chosen backend, open for the run (closed after it)."""
    module, _, attr = choose(request).factory.partition(":")
    factory: Callable[[RunRequest], Backend] = getattr(importlib.import_module(module), attr)
    with factory(request) as backend:
        yield backend


@dataclass
class Channels:
    """The launcher's ends of the host/guest channels (see guest-init/protocol.h)."""

    control: socket.socket
    stdin: socket.socket
    stdout: socket.socket
    stderr: socket.socket
    console: socket.socket  # the guest's serial console (log only)
    x11: socket.socket | None = None
    exec: socket.socket | None = None  # `sandbox exec` processes (sandbox/features/execs.py)

    @classmethod
    def of_ports(cls, ports: dict[int, socket.socket], console: socket.socket, x11: bool) -> Channels:
        """The channels from the launcher's ends of the guest's ports (protocol.PORT_*)."""
        return cls(
            control=ports[protocol.PORT_CONTROL],
            stdin=ports[protocol.PORT_STDIN],
            stdout=ports[protocol.PORT_STDOUT],
            stderr=ports[protocol.PORT_STDERR],
            console=console,
            x11=ports[protocol.PORT_X11] if x11 else None,
            exec=ports.get(protocol.PORT_EXEC),
        )

    def all(self) -> list[socket.socket]:
        return [s for s in (self.control, self.stdin, self.stdout, self.stderr, self.console, self.x11, self.exec) if s is not None]

    def close(self) -> None:
        for s in self.all():
            s.close()


class Guest(Protocol):
    """A started machine running the guest init."""

    channels: Channels
    # False for a backend whose ports cannot be half-closed (libvirt's
    # streams): the relay then tells the guest where stdin ends.
    half_close: bool

    @property
    def end_fd(self) -> int:
        """Readable once the machine has ended (its process is gone)."""
        ...

    def reap(self) -> int | None:
        """Its exit status, once it has ended (None while it runs)."""
        ...

    def booted(self) -> None:
        """The guest init reported in: what only the boot needed can go."""
        ...

    @property
    def holds_spec(self) -> bool:
        """Send the spec only after `ready()`: the backend snapshots the guest before any run data enters."""
        ...

    def ready(self) -> bytes | None:
        """The guest init waits for its spec, nothing of the run in it yet (a backend may snapshot it now).

        Returns a control message for the guest, after which it says
        "ready" again; None when the spec may go.
        """
        ...

    def stop(self, soft_timeout: float = 1.0) -> int:
        """A polite stop, then a forced one after `soft_timeout` seconds."""
        ...

    def kill(self) -> None:
        """The forced stop, at once."""
        ...

    def host_identity(self) -> tuple[str, str]:
        """The machine's name and security label on its host ("" for what this backend does not know)."""
        ...

    def finish(self) -> None:
        """The guest has said its last word (acked, synced, powering off): end the machine without waiting for it."""
        ...

    def pids(self) -> tuple[int, ...]:
        """Host processes that make up the machine (for `info` and memory)."""
        ...

    def peak_rss_kb(self) -> int | None:
        """The machine's peak resident memory so far, read while it runs."""
        ...

    def wait_built(self, timeout: float, attempt: int) -> None:
        """Return once the machine is built (raise BootStallError if it never gets there)."""
        ...

    def explain(self, fatal: str) -> str:
        """A hint to add to the guest's set-up failure when it is this backend's doing ("" if none)."""
        ...

    def failure(self, message: str) -> MachineError:
        """An error carrying what diagnoses this machine (command line, log tails)."""
        ...
