"""Resource limits for the QEMU process: cgroup v2 where writable, otherwise v1."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    memory_mb: int | None = None
    cpu_weight: int | None = None  # 1..10000, v2 scale (100 = default)
    cpu_quota: float | None = None  # in CPUs
    pids: int | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.memory_mb, self.cpu_weight, self.cpu_quota, self.pids))


def v2_files(limits: Limits) -> dict[str, dict[str, str]]:
    """controller -> {file: value} for cgroup v2."""
    out: dict[str, dict[str, str]] = {}
    if limits.memory_mb is not None:
        out["memory"] = {"memory.max": str(limits.memory_mb << 20), "memory.swap.max": "0"}
    cpu = {}
    if limits.cpu_weight is not None:
        cpu["cpu.weight"] = str(limits.cpu_weight)
    if limits.cpu_quota is not None:
        cpu["cpu.max"] = f"{int(limits.cpu_quota * PERIOD_US)} {PERIOD_US}"
    if cpu:
        out["cpu"] = cpu
    if limits.pids is not None:
        out["pids"] = {"pids.max": str(limits.pids)}
    return out


def v1_files(limits: Limits) -> dict[str, dict[str, str]]:
    """controller -> {file: value} for cgroup v1 (weights become shares: 100 -> 1024)."""
    out: dict[str, dict[str, str]] = {}
    if limits.memory_mb is not None:
        out["memory"] = {"memory.limit_in_bytes": str(limits.memory_mb << 20)}
    cpu = {}
    if limits.cpu_weight is not None:
        cpu["cpu.shares"] = str(max(2, limits.cpu_weight * 1024 // 100))
    if limits.cpu_quota is not None:
        cpu["cpu.cfs_period_us"] = str(PERIOD_US)
        cpu["cpu.cfs_quota_us"] = str(int(limits.cpu_quota * PERIOD_US))
    if cpu:
        out["cpu"] = cpu
    if limits.pids is not None:
        out["pids"] = {"pids.max": str(limits.pids)}
    return out


def _own_paths() -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    return out


@dataclass
class Cgroup:
    """Cgroup directories made for one QEMU process."""

    dirs: list[Path]
    version: int

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs]

    def join(self) -> None:
        """Move the calling process in (runs in the child before exec)."""
        for procs in self.procs_files:
            with open(procs, "w") as f:
                f.write("0")

    def remove(self) -> None:
        for d in self.dirs:
            # The last member may still be exiting: retry briefly.
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _v2_usable(controllers: list[str]) -> Path | None:
    base = _own_paths().get("")
    if base is None or not (CGROUP_ROOT / "cgroup.controllers").exists():
        return None
    parent = CGROUP_ROOT / base.lstrip("/")
    try:
        available = (parent / "cgroup.controllers").read_text().split()
    except OSError:
        return None
    if not set(controllers) <= set(available) or not os.access(parent, os.W_OK):
        return None
    return parent


def create(name: str, limits: Limits) -> Cgroup | None:
    """Cgroups holding `limits`, or None (with a warning) where none can be made."""
    if not limits.any():
        return None
    wanted = v2_files(limits)
    parent = _v2_usable(list(wanted))
    try:
        if parent is not None:
            d = parent / name
            d.mkdir()
            for files in wanted.values():
                for fname, value in files.items():
                    if (d / fname).exists():
                        (d / fname).write_text(value)
            return Cgroup([d], 2)
        own = _own_paths()
        made = Cgroup([], 1)
        try:
            for controller, files in v1_files(limits).items():
                mount = CGROUP_ROOT / controller
                if not mount.is_dir():
                    raise OSError(f"no cgroup v1 {controller} hierarchy")
                d = mount / own.get(controller, "/").lstrip("/") / name
                d.mkdir()
                made.dirs.append(d)
                for fname, value in files.items():
                    (d / fname).write_text(value)
        except OSError:
            made.remove()
            raise
        return made
    except OSError as exc:
        log.warning("resource limits not applied: cannot use cgroups (%s)", exc)
        return None
