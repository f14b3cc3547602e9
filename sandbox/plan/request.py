"""What the user asked of one run, typed and frozen: built once from the command line, read by every layer below.

The run's live resources (the walls, the nested X server, the network,
the registry entry) are not here: the runner enters each as a context
manager in the run's one ExitStack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.core.errors import UsageError
from sandbox.plan.mounts import Share



@dataclass(frozen=True)
class NetRequest:
    """--net MODE[=NAME] and --mac."""

    mode: str = "none"
    name: str = ""  # nat: the network; bridge: the host's bridge
    mac: str | None = None
    host: bool = False  # user,host: the host's own services are reachable too

    @property
    def label(self) -> str:
        if self.host:
            return f"{self.mode},host"
        return f"{self.mode}={self.name}" if self.name else self.mode

    @property
    def nic_kind(self) -> str | None:
        """QEMU's -netdev type for this mode: passt's socket, or a tap."""
        return {"none": None, "user": "stream"}.get(self.mode, "tap")


@dataclass(frozen=True)
class MachineRequest:
    """The guest machine: kernel, accelerator, hardware, and how it starts."""

    kernel: Path | None = None
    accel: str | None = None  # None: the user's default (config.accel)
    qemu: str | None = None
    machine: str = "auto"  # auto | microvm | q35
    memory_mb: int = 512
    cpus: int = 1
    cpu_model: str | None = None
    tb_size_mb: int = 24  # MiB; the trade-off is measured in benchmarks/README.md
    boot_timeout: float | None = None  # None: chosen by accelerator
    pvh: bool = True
    kernel_append: str = ""
    crypto_selftests: bool = False
    keyboard: bool = False  # a virtio keyboard for `sandbox send-key`
    warm: bool = True  # restore from a template when one fits (--cold: never)
    tracefs: bool = False


@dataclass(frozen=True)
class FilesRequest:
    """What the guest sees where, beyond the defaults (sandbox/plan/mounts.py)."""

    shares: tuple[Share, ...] = ()
    home: Path | None = None  # --home DIR: a read-write share shown as $HOME
    tmpfs: tuple[tuple[str, str], ...] = ()
    private: tuple[str, ...] = ()
    hide: tuple[str, ...] = ()
    unhide: tuple[str, ...] = ()
    images: bool = True  # read-only host trees from erofs images where current (sandbox/image/hostfiles.py)
    image_trees: tuple[str, ...] = ()  # beyond hostfiles.default_trees()


@dataclass(frozen=True)
class CommandRequest:
    """The command and how it meets the user: argv, environment, directory, terminal."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] | None = None  # None: this process's environment
    cwd: str | None = None  # None: this process's working directory
    tty: bool | None = None  # None: when stdin is a terminal
    closed_stdio: int = 0  # bit 1 << fd: fd 0, 1 or 2 was closed when the launcher started, so it is for the command too
    timeout: float | None = None
    hostname: str = ""  # the guest's (the sandbox's name); "": the kernel's own
    workdir: str | None = None  # --workdir: where the command starts (a guest path; relative: to where it would start)

    def __post_init__(self) -> None:
        if not self.argv:
            raise UsageError("no command given (usage: sandbox run [OPTIONS] -- CMD [ARGS...])")


@dataclass(frozen=True)
class ConfinementOptions:
    """What the user asked of the walls (options.CONFINEMENT; sandbox/confinement/walls.py puts them up)."""

    security: str = "auto"  # auto | selinux | none
    label: str | None = None  # static:LABEL
    show_label: bool = False
    qemu_user: str | None = None
    memory_limit: int | None = None
    cpu_weight: int | None = None
    cpu_quota: float | None = None
    pids_limit: int | None = None
    limits: str = "strict"  # strict | best-effort


@dataclass(frozen=True)
class X11Request:
    """--x11: which nested display, and its size."""

    mode: str  # xephyr | xpra
    size: tuple[int, int]


@dataclass(frozen=True)
class RunRequest:
    """Everything `sandbox run` was asked to do."""

    command: CommandRequest
    machine: MachineRequest = field(default_factory=MachineRequest)
    files: FilesRequest = field(default_factory=FilesRequest)
    net: NetRequest = field(default_factory=NetRequest)
    connect: str | None = None  # a libvirt URI (sandbox/libvirt), or None: QEMU runs here
    confinement: ConfinementOptions | None = None  # None: --no-confine
    x11: X11Request | None = None
    verbose: int = 0
    pool: int = 0  # guests a pool keeps ready for runs like this one (0: no pool, the guest is restored for this run)
    pool_idle: float = 600.0  # s without a run before a pool this run starts ends


def x11_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if not (64 <= w <= 16384 and 64 <= h <= 16384):
            raise ValueError
    except ValueError:
        raise UsageError(f"--x11-size {text!r}: want WIDTHxHEIGHT, e.g. 1024x768") from None
    return w, h
