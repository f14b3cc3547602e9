"""Resource limits for the QEMU process: cgroup v2 where writable, otherwise v1."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox.core.errors import ConfinementError

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

    def oom_kills(self) -> int:
        """How many processes the OOM killer killed in this group (memory controller)."""
        total = 0
        for d in self.dirs:
            for name in ("memory.events", "memory.oom_control"):  # v2, v1
                try:
                    text = (d / name).read_text()
                except OSError:
                    continue
                for line in text.splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and value.strip().isdigit():
                        total += int(value)
        return total

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


V2_BASE = "sandbox"  # root's sandboxes live in /sys/fs/cgroup/sandbox/<name>


def _enable(directory: Path, controllers: list[str]) -> None:
    """Make `controllers` available to `directory`'s children (cgroup.subtree_control)."""
    enabled = (directory / "cgroup.subtree_control").read_text().split()
    missing = [c for c in controllers if c not in enabled]
    if missing:
        (directory / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))


def _v2_parent(controllers: list[str], root: Path = CGROUP_ROOT) -> Path | None:
    """Where a v2 cgroup with `controllers` can go, or None if this is not a v2 host.

    cgroup v2 lets a group hand controllers to its children only while it
    holds no process itself, and the launcher sits in its own (leaf) group.
    As root, sandboxes go in a group of their own under the root, which may
    always delegate (libvirt's machine.slice, without systemd's help).  A
    user gets limits only if their own group already offers the
    controllers to children, which a group holding the launcher itself
    cannot: in practice a non-root launcher on v2 gets the warning.
    """
    if not (root / "cgroup.controllers").exists():
        return None
    if os.geteuid() == 0:
        base = root / V2_BASE
        _enable(root, controllers)
        base.mkdir(exist_ok=True)
        _enable(base, controllers)
        return base
    own = _own_paths().get("")
    if own is None:
        return None
    parent = root / own.lstrip("/")
    offered = (parent / "cgroup.subtree_control").read_text().split()
    if not set(controllers) <= set(offered) or not os.access(parent, os.W_OK):
        raise OSError(f"{parent} does not delegate {', '.join(controllers)} to this user (run as root)")
    return parent


def create(name: str, limits: Limits, strict: bool = True) -> Cgroup | None:
    """Cgroups holding `limits`.

    Limits the user asked for and that cannot be applied are an error
    (ConfinementError); with `strict` off, one warning and None.
    """
    if not limits.any():
        return None
    wanted = v2_files(limits)
    try:
        parent = _v2_parent(list(wanted))
        if parent is not None:
            d = parent / name
            d.mkdir()
            try:
                for files in wanted.values():
                    for fname, value in files.items():
                        if fname == "memory.swap.max" and not (d / fname).exists():
                            continue  # a kernel without swap accounting: nothing to limit
                        (d / fname).write_text(value)
            except OSError:
                Cgroup([d], 2).remove()
                raise
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
        reason = exc.strerror if exc.strerror else str(exc)
        if strict:
            raise ConfinementError(
                f"cannot apply the requested resource limits: {reason} (--limits=best-effort runs without them)"
            ) from None
        log.warning("resource limits not applied: cannot use cgroups (%s)", reason)
        return None
