"""Options that shape a sandbox, each declared once.

Each entry gives its flags, its argparse keywords and the field it fills in
the run request (sandbox/plan/request.py); from the tables come the parser's
arguments, the values handed to the runner, the arguments `sandbox bench`
forwards to every run, and the settings of the config file (sandbox/cli/config.py),
which are read by the option's own parser.  Adding an option is one entry
here plus its use.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from sandbox.core import sizes
from sandbox.core.errors import SandboxError, UsageError


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


MAX_POOL = 16  # guests kept ready: each holds its QEMU and a share of the host's CPU to make


def pool_size(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_POOL:
        raise argparse.ArgumentTypeError(f"bad pool size {text!r} (0 to {MAX_POOL}; 0: no pool)")
    return int(text)


def cpus(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"bad CPU count {text!r}")
    # More vCPUs than host CPUs only competes with itself: under TCG a
    # 16-vCPU guest on 2 cores took 20 s to boot, 64 never got there.
    host = len(os.sched_getaffinity(0))
    if int(text) > host:
        raise argparse.ArgumentTypeError(f"{text} CPUs: this host offers {host}, so --cpus {host} at most")
    return int(text)


def directory(text: str) -> Path:
    """A host directory (~ expanded, as a shell would have for a flag), resolved."""
    path = Path(os.path.expanduser(text))
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return path.resolve()


def tree(text: str) -> str:
    """A host directory for --image-tree: absolute once resolved, and not the root."""
    from sandbox.image.hostfiles import refusal

    path = os.path.realpath(os.path.expanduser(text)) if text else ""
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r}: {'no such directory' if not os.path.exists(path) else 'not a directory'}")
    why = refusal(path)
    if why is not None:
        raise argparse.ArgumentTypeError(f"{text}: {why}")
    return path


def share(text: str) -> Any:
    """--share HOST[:GUEST][:MODE], its host path relative to the working directory (a mounts.Share)."""
    from sandbox.plan import mounts

    return mounts.parse_share(text, mounts.working_directory())


def tmpfs(text: str) -> tuple[str, str]:
    from sandbox.plan import mounts

    return mounts.parse_tmpfs(text)


# On/off options: the --no-X form turns off what the config file turned on.
SWITCH = argparse.BooleanOptionalAction


class _Refused(Exception):
    pass


class _OneOption(argparse.ArgumentParser):
    """A parser of one option, to read a setting exactly as its flag is read."""

    def error(self, message: str) -> NoReturn:
        raise _Refused(message)


@dataclass(frozen=True)
class Option:
    """One command-line option and the field it fills."""

    flags: tuple[str, ...]
    target: str  # the field it fills
    kw: Mapping[str, Any] = field(default_factory=dict)
    inverted: bool = False  # the field is the opposite of the flag (--cold fills warm)
    env: str | None = None  # an environment variable that gives its default, over the config file

    @property
    def dest(self) -> str:
        return self.key.replace("-", "_")

    @property
    def key(self) -> str:
        """Its name in the config file: the long flag without its dashes."""
        return self.flags[-1].lstrip("-")

    @property
    def default(self) -> Any:
        return self.kw.get("default")

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: Any = None) -> None:
        kw = dict(self.kw)
        if default is not None:
            kw["default"] = default
        parser.add_argument(*self.flags, dest=self.dest, **kw)

    def value(self, ns: argparse.Namespace) -> Any:
        raw = getattr(ns, self.dest)
        return not raw if self.inverted else raw

    def forward(self, value: Any) -> list[str]:
        """The flags that give a run `value` (nothing for the default)."""
        flag = self.flags[-1]
        if self.kw.get("action") is SWITCH:
            raw = not value if self.inverted else value
            return [] if raw == bool(self.default) else [flag if raw else f"--no-{self.key}"]
        if value is None or value == self.default:
            return []
        return [flag, str(value)]

    def words(self, setting: object) -> list[str]:
        """The command-line words that a setting's value stands for (its TOML type checked)."""
        flag = self.flags[-1]
        action = self.kw.get("action")
        if action is SWITCH:
            if not isinstance(setting, bool):
                raise ValueError("expected true or false")
            return [flag if setting else f"--no-{self.key}"]
        if action == "append":
            if not isinstance(setting, list) or not all(isinstance(v, str) for v in setting):
                raise ValueError('expected a list of strings, e.g. ["a", "b"]')
            return [f"{flag}={v}" for v in setting]
        if isinstance(setting, bool) or not isinstance(setting, (str, int, float)):
            raise ValueError("expected a string or a number")
        return [f"{flag}={setting}"]

    def read_setting(self, setting: object, where: str) -> Any:
        """What the flag's own parser makes of a setting; an error is one line starting with `where` (its file and key, or variable)."""
        if self.kw.get("type") in (tree, directory):
            # On the command line a relative path is the shell's, from where you are; in a setting
            # it would be taken from each run's working directory, and fail (or differ) elsewhere.
            for value in setting if isinstance(setting, list) else [setting]:
                if isinstance(value, str) and value and not value.startswith(("/", "~")):
                    raise UsageError(f"{where}: {value!r}: a path in a setting must be absolute (or start with ~)")
        parser = _OneOption(add_help=False, allow_abbrev=False)
        self.add_to(parser)
        try:
            return getattr(parser.parse_args(self.words(setting)), self.dest)
        except (ValueError, _Refused, SandboxError) as exc:
            why = re.sub(r"^argument [^:]*: ", "", str(exc))
            raise UsageError(f"{where}: {why}") from None


VM: tuple[Option, ...] = (
    Option(("--kernel",), "kernel", {"type": Path, "help": "kernel image (default: newest /boot/vmlinuz-* with 9p)"}),
    Option(("--accel",), "accel", {"choices": ("auto", "kvm", "tcg"), "default": "auto",
                                   "help": "default: SANDBOX_ACCEL, the config file, or auto"}, env="SANDBOX_ACCEL"),
    Option(("--qemu",), "qemu", {"help": "QEMU binary (default: qemu-system-x86_64)"}),
    Option(("--machine",), "machine", {"choices": ("auto", "microvm", "q35"), "default": "auto",
                                       "help": "QEMU machine type (default auto: microvm when this QEMU has it)"}),
    Option(("--memory",), "memory_mb", {"type": guest_memory, "default": 512, "metavar": "SIZE", "help": "guest RAM (default 512M)"}),
    Option(("--cpus",), "cpus", {"type": cpus, "default": 1, "metavar": "N", "help": "guest vCPUs (default 1, at most the host's CPUs)"}),
    Option(("--cpu-model",), "cpu_model", {"metavar": "MODEL", "help": "QEMU -cpu (default: host under KVM, x86-64-v2 under TCG)"}),
    Option(("--tb-size",), "tb_size_mb", {"type": int, "default": 24, "metavar": "MB", "help": "TCG translation cache size (default 24)"}),
    Option(("--boot-timeout",), "boot_timeout", {"type": positive, "metavar": "S", "help": "give up on a boot that stalls this long"}),
    Option(("--pvh",), "pvh", {"action": SWITCH, "default": True, "help": "boot the extracted vmlinux (--no-pvh: the bzImage)"}),
    Option(("--kernel-append",), "kernel_append", {"default": "", "metavar": "ARGS", "help": "extra guest kernel arguments"}),
    Option(("--crypto-selftests",), "crypto_selftests", {"action": SWITCH, "default": False, "help": "keep the guest kernel's crypto self-tests"}),
    Option(("--keyboard",), "keyboard", {"action": SWITCH, "default": False, "help": "a virtio keyboard in the guest, for sandbox send-key"}),
    Option(("--net",), "net", {"default": "none", "metavar": "MODE",
                               "help": "none (default), user (passt, anyone), nat[=NAME] or bridge=BRIDGE (root)"}),
    Option(("--mac",), "mac", {"metavar": "MAC", "help": "the guest's MAC address (default: random, 52:54:00:xx:xx:xx)"}),
    Option(("-w", "--workdir"), "workdir", {"metavar": "DIR",
                                            "help": "start in DIR, a guest path (default: the working directory; with a remote --connect, the home)"}),
    Option(("--connect",), "connect", {"metavar": "URI",
                                       "help": "run through libvirt (qemu:///system, qemu+ssh://HOST/system; default: SANDBOX_CONNECT; '': QEMU here)"},
           env="SANDBOX_CONNECT"),
    Option(("--cold",), "warm", {"action": SWITCH, "default": False, "help": "boot the kernel even when a warm-start template fits"}, inverted=True),
    Option(("--tracefs",), "tracefs", {"action": SWITCH, "default": False, "help": "keep the guest kernel's tracefs (ftrace event files)"}),
)  # fmt: skip

CONFINEMENT: tuple[Option, ...] = (
    Option(("--security",), "security", {"choices": ("auto", "selinux", "none"), "default": "auto",
                                         "help": "SELinux confinement for QEMU (default auto: when SELinux is enabled)"}),
    Option(("--label",), "label", {"metavar": "static:LABEL", "help": "a fixed SELinux label for QEMU"}),
    Option(("--show-label",), "show_label", {"action": SWITCH, "default": False, "help": "print the label in use to stderr"}),
    Option(("--qemu-user",), "qemu_user", {"metavar": "USER", "help": "run QEMU as this user when started as root (default: nobody)"}),
    Option(("--memory-limit",), "memory_limit", {"type": size_mb, "metavar": "SIZE", "help": "cgroup memory.max for QEMU"}),
    Option(("--cpu-weight",), "cpu_weight", {"type": int, "metavar": "N", "help": "cgroup cpu.weight (1-10000)"}),
    Option(("--cpu-quota",), "cpu_quota", {"type": positive, "metavar": "CPUS", "help": "cgroup cpu.max, in CPUs (e.g. 0.5)"}),
    Option(("--pids-limit",), "pids_limit", {"type": int, "metavar": "N", "help": "cgroup pids.max for QEMU"}),
    Option(("--limits",), "limits", {"choices": ("strict", "best-effort"), "default": "strict",
                                     "help": "a limit that cannot be applied is an error (strict) or a warning"}),
)  # fmt: skip


# `sandbox run`'s own (not bench's or prepare's).
RUN: tuple[Option, ...] = (
    Option(("--timeout",), "timeout", {"type": positive, "metavar": "S", "help": "kill the VM after S seconds (exit 124)"}),
    Option(("--x11",), "x11", {"nargs": "?", "const": "xephyr", "choices": ("xephyr", "xpra"), "help": "show X11 apps in a nested server"}),
    Option(("--x11-size",), "x11_size", {"default": "1024x768", "metavar": "WxH", "help": "the nested display's size (default 1024x768)"}),
)  # fmt: skip

FILES: tuple[Option, ...] = (
    Option(("--share",), "shares", {"action": "append", "type": share, "default": [], "metavar": "HOST[:GUEST][:ro|rw|cow]",
                                    "help": "show a host directory in the guest (default mode cow; \\: escapes a colon)"}),
    Option(("--tmpfs",), "tmpfs", {"action": "append", "type": tmpfs, "default": [], "metavar": "PATH[:SIZE]", "help": "an empty tmpfs at PATH"}),
    Option(("--private",), "private", {"action": "append", "type": os.path.expanduser, "default": [], "metavar": "PATH",
                                       "help": "an empty private tmpfs instead of the host's files (e.g. /tmp or $HOME)"}),
    Option(("--hide",), "hide", {"action": "append", "default": [], "metavar": "PATH", "help": "hide PATH (relative: in the home) too"}),
    Option(("--unhide",), "unhide", {"action": "append", "default": [], "metavar": "PATH", "help": "show a path hidden by default (e.g. .ssh)"}),
    Option(("--images",), "images", {"action": SWITCH, "default": True,
                                     "help": "read-only host trees (C headers, Python's libraries, --image-tree) from cached images while they match the host"}),
    Option(("--image-tree",), "image_trees", {"action": "append", "type": tree, "default": [], "metavar": "DIR",
                                              "help": "serve this read-only host directory from a cached image too"}),
    Option(("--home",), "home", {"type": directory, "metavar": "DIR", "help": "share DIR read-write as the home directory"}),
)  # fmt: skip

# The pool of ready guests (sandbox/backends/pool/): how many a run keeps
# ready for the runs after it, and for how long without a run.
POOL: tuple[Option, ...] = (
    Option(("--pool",), "pool", {"type": pool_size, "default": 2, "metavar": "N",
                                 "help": "use, or start, a pool of N guests kept ready for runs (default 2; 0: no pool)"}, env="SANDBOX_POOL"),
    Option(("--pool-idle",), "pool_idle", {"type": positive, "default": 600.0, "metavar": "S",
                                           "help": "a pool this run starts ends after S seconds without a run (default 600)"}),
)  # fmt: skip

# What the config file can set: every option of `sandbox run` but those of
# one invocation (--name, -d, --rm, -t/-T, --timings, -v, --no-pool) and
# --no-confine (the walls are never off by default).
SETTABLE: tuple[Option, ...] = VM + CONFINEMENT + RUN + FILES + POOL


def add(parser: argparse.ArgumentParser | argparse._ArgumentGroup, table: Sequence[Option], defaults: Mapping[str, Any] | None = None) -> None:
    """The table's options, with `defaults` (key -> value, from sandbox/cli/config.py) instead of their own."""
    for opt in table:
        opt.add_to(parser, (defaults or {}).get(opt.key))


def values(ns: argparse.Namespace, table: Sequence[Option]) -> dict[str, Any]:
    """field -> value for every option of `table`."""
    return {opt.target: opt.value(ns) for opt in table}


def forward(table: Sequence[Option], vals: Mapping[str, Any]) -> list[str]:
    """The command-line arguments that reproduce `vals` (defaults left out)."""
    return [arg for opt in table for arg in opt.forward(vals[opt.target])]
