"""Options that shape a sandbox, each declared once.

Each entry gives its flags, its argparse keywords and the field it fills in
RunOptions (or ConfinementOptions); from the table come the parser's
arguments, the values handed to the runner, and the arguments `sandbox
bench` forwards to every run.  Adding an option is one entry here plus its
use.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import sizes


def size_mb(text: str, minimum: int = 64) -> int:
    """A size option's value in MiB (512M, 2G, 1.5G; a bare number is MiB), at least `minimum`."""
    mb = sizes.parse_mb(text)
    if mb is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 512M, 2G)")
    if mb < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} is too small ({minimum}M at least)")
    return mb


# Measured with Debian's 6.1 kernel: 64M hangs before the first console
# line (the kernel image does not fit), 72M panics unpacking the
# initramfs, 80M boots; 96M leaves room for a real command.
MIN_GUEST_MB = 96


def host_memory_mb() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return None


def guest_memory(text: str) -> int:
    mb = sizes.parse_mb(text)
    if mb is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 512M, 2G)")
    if mb < MIN_GUEST_MB:
        raise argparse.ArgumentTypeError(f"{text!r} is too small: the guest kernel needs {MIN_GUEST_MB}M at least")
    total = host_memory_mb()
    if total and mb > total:
        raise argparse.ArgumentTypeError(f"{text!r} is more than this host's {total}M of memory")
    return mb


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite positive number: {text!r}")
    return value


def cpus(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"bad CPU count {text!r}")
    # More vCPUs than host CPUs only competes with itself: under TCG a
    # 16-vCPU guest on 2 cores took 20 s to boot, 64 never got there.
    host = len(os.sched_getaffinity(0))
    if int(text) > host:
        raise argparse.ArgumentTypeError(f"{text} CPUs: this host offers {host}, so --cpus {host} at most")
    return int(text)


@dataclass(frozen=True)
class Option:
    """One command-line option and the field it fills."""

    flags: tuple[str, ...]
    target: str  # the field it fills
    kw: Mapping[str, Any] = field(default_factory=dict)
    inverted: bool = False  # a --no-X flag that sets field X to False

    @property
    def dest(self) -> str:
        return self.flags[-1].lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        parser.add_argument(*self.flags, dest=self.dest, **self.kw)

    def value(self, ns: argparse.Namespace) -> Any:
        raw = getattr(ns, self.dest)
        return not raw if self.inverted else raw

    def forward(self, value: Any) -> list[str]:
        """The flags that give a run `value` (nothing for the default)."""
        flag = self.flags[-1]
        if self.kw.get("action") == "store_true":
            return [flag] if value != self.inverted else []
        if value is None or value == self.kw.get("default"):
            return []
        return [flag, str(value)]


VM: tuple[Option, ...] = (
    Option(("--kernel",), "kernel", {"type": Path, "help": "kernel image (default: newest /boot/vmlinuz-* with 9p)"}),
    Option(("--accel",), "accel", {"choices": ("auto", "kvm", "tcg"), "help": "default: SANDBOX_ACCEL, the config file, or auto"}),
    Option(("--qemu",), "qemu", {"help": "QEMU binary (default: qemu-system-x86_64)"}),
    Option(("--machine",), "machine", {"choices": ("auto", "microvm", "q35"), "default": "auto",
                                       "help": "QEMU machine type (default auto: microvm when this QEMU has it)"}),
    Option(("--memory",), "memory_mb", {"type": guest_memory, "default": 512, "metavar": "SIZE", "help": "guest RAM (default 512M)"}),
    Option(("--cpus",), "cpus", {"type": cpus, "default": 1, "metavar": "N", "help": "guest vCPUs (default 1, at most the host's CPUs)"}),
    Option(("--cpu-model",), "cpu_model", {"metavar": "MODEL", "help": "QEMU -cpu (default: host under KVM, x86-64-v2 under TCG)"}),
    Option(("--tb-size",), "tb_size_mb", {"type": int, "default": 24, "metavar": "MB", "help": "TCG translation cache size (default 24)"}),
    Option(("--boot-timeout",), "boot_timeout", {"type": positive, "metavar": "S", "help": "give up on a boot that stalls this long"}),
    Option(("--no-pvh",), "pvh", {"action": "store_true", "help": "boot the bzImage instead of the extracted vmlinux"}, inverted=True),
    Option(("--kernel-append",), "kernel_append", {"default": "", "metavar": "ARGS", "help": "extra guest kernel arguments"}),
    Option(("--crypto-selftests",), "crypto_selftests", {"action": "store_true", "help": "keep the guest kernel's crypto self-tests"}),
    Option(("--keyboard",), "keyboard", {"action": "store_true", "help": "a virtio keyboard in the guest, for sandbox send-key"}),
    Option(("--net",), "net", {"default": "none", "metavar": "MODE",
                               "help": "none (default), user (passt, anyone), nat[=NAME] or bridge=BRIDGE (root)"}),
    Option(("--mac",), "mac", {"metavar": "MAC", "help": "the guest's MAC address (default: random, 52:54:00:xx:xx:xx)"}),
    Option(("-w", "--workdir"), "workdir", {"metavar": "DIR",
                                            "help": "start in DIR, a guest path (default: the working directory; with a remote --connect, the home)"}),
    Option(("--connect",), "connect", {"metavar": "URI",
                                       "help": "run through libvirt (qemu:///system, qemu+ssh://HOST/system; default: SANDBOX_CONNECT)"}),
    Option(("--cold",), "warm", {"action": "store_true", "help": "boot the kernel even when a warm-start template fits"}, inverted=True),
    Option(("--tracefs",), "tracefs", {"action": "store_true", "help": "keep the guest kernel's tracefs (ftrace event files)"}),
)  # fmt: skip

CONFINEMENT: tuple[Option, ...] = (
    Option(("--security",), "security", {"choices": ("auto", "selinux", "none"), "default": "auto",
                                         "help": "SELinux confinement for QEMU (default auto: when SELinux is enabled)"}),
    Option(("--label",), "label", {"metavar": "static:LABEL", "help": "a fixed SELinux label for QEMU"}),
    Option(("--show-label",), "show_label", {"action": "store_true", "help": "print the label in use to stderr"}),
    Option(("--qemu-user",), "qemu_user", {"metavar": "USER", "help": "run QEMU as this user when started as root (default: nobody)"}),
    Option(("--memory-limit",), "memory_limit", {"type": size_mb, "metavar": "SIZE", "help": "cgroup memory.max for QEMU"}),
    Option(("--cpu-weight",), "cpu_weight", {"type": int, "metavar": "N", "help": "cgroup cpu.weight (1-10000)"}),
    Option(("--cpu-quota",), "cpu_quota", {"type": positive, "metavar": "CPUS", "help": "cgroup cpu.max, in CPUs (e.g. 0.5)"}),
    Option(("--pids-limit",), "pids_limit", {"type": int, "metavar": "N", "help": "cgroup pids.max for QEMU"}),
    Option(("--limits",), "limits", {"choices": ("strict", "best-effort"), "default": "strict",
                                     "help": "a limit that cannot be applied is an error (strict) or a warning"}),
)  # fmt: skip


def add(parser: argparse.ArgumentParser | argparse._ArgumentGroup, table: Sequence[Option]) -> None:
    for opt in table:
        opt.add_to(parser)


def values(ns: argparse.Namespace, table: Sequence[Option]) -> dict[str, Any]:
    """field -> value for every option of `table`."""
    return {opt.target: opt.value(ns) for opt in table}


def forward(table: Sequence[Option], vals: Mapping[str, Any]) -> list[str]:
    """The command-line arguments that reproduce `vals` (defaults left out)."""
    return [arg for opt in table for arg in opt.forward(vals[opt.target])]
