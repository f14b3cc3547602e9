"""Facts about the host that the VM's shape depends on: accelerator, QEMU, TSC rate."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from sandbox.core import cache, progress
from sandbox.image import guestinit
from sandbox.core.errors import ToolMissingError, UsageError

log = logging.getLogger(__name__)

QEMU_HINT = "apt-get install qemu-system-x86"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """CPU flags of the host's first processor (read once: accel choice and TSC both ask)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def loaded_modules() -> set[str]:
    try:
        with open("/proc/modules") as f:
            return {line.split(" ", 1)[0] for line in f}
    except OSError:
        return set()


def kvm_problem(flags: frozenset[str] | set[str], modules: set[str], kvm_usable: bool) -> str | None:
    """Why hardware KVM cannot be used, or None if it can.

    /dev/kvm alone proves nothing: a paravirtual KVM (such as kvm_pvm) offers
    it too, and a stock kernel hangs there.  Real KVM needs the CPU's
    virtualisation extension and its vendor module.
    """
    if not flags & {"vmx", "svm"}:
        return "the CPU has no vmx/svm"
    if not modules & {"kvm_intel", "kvm_amd"}:
        return "neither kvm_intel nor kvm_amd is loaded"
    if not kvm_usable:
        return "/dev/kvm is missing or not accessible"
    return None


def choose_accel(requested: str) -> tuple[str, str | None]:
    """(accel, warning) for --accel auto|kvm|tcg."""
    if requested == "tcg":
        return "tcg", None
    problem = kvm_problem(cpu_flags(), loaded_modules(), os.access("/dev/kvm", os.R_OK | os.W_OK))
    if requested == "kvm":
        if problem:
            raise UsageError(f"--accel kvm: hardware KVM is not usable here ({problem})")
        return "kvm", None
    if problem:
        return "tcg", (
            f"KVM unavailable ({problem}); using TCG software emulation, which is much slower "
            "(said once, and with -v; SANDBOX_ACCEL=tcg or accel = \"tcg\" in ~/.config/sandbox/config.toml chooses it)"
        )
    return "kvm", None


def show_accel_notice(verbose: int) -> bool:
    """Whether to print the TCG notice: the first time for this user (a marker in the state dir), and with -v.

    Said on every run, it would be in every script's captured stderr and
    between a terminal user's every command and its output.
    """
    if verbose:
        return True
    marker = cache.state_dir() / "accel-notice-shown"
    if marker.exists():
        return False
    try:
        marker.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        marker.touch()
    except OSError:
        pass
    return True


@dataclass(frozen=True)
class QemuInfo:
    """What a QEMU binary supports, probed once and cached by binary identity."""

    path: str
    version: str
    microvm: bool
    seccomp: bool


def _probe(path: str) -> QemuInfo:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [path, *args], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL, timeout=30
        )

    version = run("-version").stdout.split("\n", 1)[0].removeprefix("QEMU emulator version ").strip()
    microvm = any(line.startswith("microvm ") for line in run("-machine", "help").stdout.splitlines())
    seccomp = run("-sandbox", "on", "-machine", "none", "-display", "none", "-S", "-version").returncode == 0
    return QemuInfo(path, version, microvm, seccomp)


def qemu_info(binary: str | None = None) -> QemuInfo:
    """The QEMU binary to use and its capabilities."""
    path = shutil.which(binary or "qemu-system-x86_64")
    if path is None:
        raise ToolMissingError(f"{binary or 'qemu-system-x86_64'} not found; {QEMU_HINT}")
    key = cache.file_identity(Path(path))
    record = cache.cache_dir() / f"qemu-{key}.json"
    try:
        return QemuInfo(**json.loads(record.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    with progress.step("probing QEMU"):
        info = _probe(path)
    cache.write_atomic(record, json.dumps(asdict(info)).encode())
    return info


def tsc_khz() -> int | None:
    """The host's TSC rate in kHz, measured once per host boot."""
    if not {"constant_tsc", "nonstop_tsc"} <= cpu_flags():
        return None
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    record = cache.cache_dir() / f"tsc-{boot_id}"
    try:
        return int(record.read_text())
    except (OSError, ValueError):
        pass
    try:
        with progress.step("measuring the host's TSC rate"):
            probe = guestinit.tsc_probe()
            out = subprocess.run([str(probe)], capture_output=True, text=True, check=True, timeout=10).stdout
        khz = int(out.strip())
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        log.warning("cannot measure the TSC rate: %s", exc)
        return None
    cache.write_atomic(record, str(khz).encode())
    return khz
