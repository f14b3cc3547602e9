"""Phase timestamps of one run, on one clock (the host's CLOCK_BOOTTIME, in seconds).

Host phases are stamped directly.  Guest phases arrive as guest
CLOCK_BOOTTIME readings and are mapped with an offset:

    host_time = guest_time + offset

Every control line carries the guest's clock at the moment it was sent, and
the host stamps its arrival, so each line gives an upper bound on the offset
(arrival - sent >= offset, the difference being the one-way delay).  The
smallest such bound over all lines of the run is the estimate; its error is
the shortest one-way delay seen, well under a millisecond under TCG.  The
guest's clock runs at the right rate because the guest is told the host's
TSC rate (tsc_early_khz) instead of calibrating it under load.

The guest's CLOCK_BOOTTIME starts late (it stands still until the kernel
has a clocksource), so kernel entry is derived instead from the guest TSC,
which QEMU starts at zero when the vCPU is reset: init reports its TSC, and
kernel entry = init_start - tsc / tsc_rate.  This includes the few
microseconds of firmware that a PVH boot runs before the kernel.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

# In order of occurrence; the names are also the JSON keys.
PHASES = (
    "launcher_start",
    "handed_off",
    "net_attach",
    "net_attached",
    "qemu_exec",
    "kernel_entry",
    "init_start",
    "modules_loaded",
    "template_saved",
    "spec_read",
    "root_mounted",
    "net_ready",
    "command_exec",
    "command_exit",
    "poweroff",
    "qemu_reaped",
)

# Spans reported by --timings and bench: (name, from phase, to phase).
SPANS = (
    ("launcher", "launcher_start", "qemu_exec"),
    # A pooled guest is running already: the launcher's part ends when the pool hands it over.
    ("launcher", "launcher_start", "handed_off"),
    ("hand_off", "handed_off", "spec_read"),
    ("qemu_setup", "qemu_exec", "kernel_entry"),
    ("kernel", "kernel_entry", "init_start"),
    ("modules", "init_start", "modules_loaded"),
    # A warm start has no kernel boot: QEMU restores the guest, which reads its spec.
    ("restore", "qemu_exec", "spec_read"),
    # The first run of a template: zeroing free guest memory and saving it.
    ("template", "modules_loaded", "template_saved"),
    ("mount", "modules_loaded", "root_mounted"),
    ("spawn", "root_mounted", "command_exec"),
    # --net: the host's side (tap, lease, rules; passt) and the guest's wait
    # for usable addresses (within spawn).
    ("net_attach", "net_attach", "net_attached"),
    ("net_wait", "root_mounted", "net_ready"),
    ("command", "command_exec", "command_exit"),
    ("report", "command_exit", "poweroff"),
    ("poweroff", "poweroff", "qemu_reaped"),
)
SHUTDOWN = ("shutdown", "command_exit", "qemu_reaped")
TOTAL = ("total", "launcher_start", "qemu_reaped")


def monotonic_boottime() -> float:
    """Host CLOCK_BOOTTIME in seconds: one clock for every phase stamp."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass
class Timeline:
    """Collects stamps during a run; `phases()` gives them on the host clock."""

    host: dict[str, float] = field(default_factory=dict)
    guest: dict[str, int] = field(default_factory=dict)  # ns, guest clock
    offset: float | None = None  # host - guest, seconds
    guest_tsc: int | None = None
    tsc_khz: int | None = None
    start: str = "cold"  # "warm" (restored from a template), "cold", "cold, building the template"

    def new_boot(self) -> None:
        """Forget a stalled boot's stamps before the retry (the launcher's start stays)."""
        self.guest.clear()
        self.guest_tsc = None
        self.offset = None
        launched = self.host.get("launcher_start")
        self.host.clear()
        if launched is not None:
            self.host["launcher_start"] = launched

    def rebase(self) -> None:
        """Fix the guest stamps so far on the host clock and estimate the offset anew.

        After the guest was paused (a template is taken mid-run) its clock
        is behind by the pause; stamps on either side need their own offset.
        """
        for phase, when in self.phases().items():
            self.host.setdefault(phase, when)
        self.guest.clear()
        self.guest_tsc = None
        self.offset = None

    def stamp_host(self, phase: str, when: float) -> None:
        self.host.setdefault(phase, when)

    def observe(self, guest_sent_ns: int, host_received: float) -> None:
        bound = host_received - guest_sent_ns / 1e9
        if self.offset is None or bound < self.offset:
            self.offset = bound

    def stamp_guest(self, phase: str, guest_ns: int) -> None:
        if phase == "tsc":
            self.guest_tsc = guest_ns
        else:
            self.guest.setdefault(phase, guest_ns)

    def phases(self) -> dict[str, float]:
        out = dict(self.host)
        if self.offset is not None:
            for phase, ns in self.guest.items():
                out[phase] = ns / 1e9 + self.offset
        if self.guest_tsc is not None and self.tsc_khz and "init_start" in out:
            out["kernel_entry"] = out["init_start"] - self.guest_tsc / (self.tsc_khz * 1e3)
        return {p: out[p] for p in PHASES if p in out}


def spans(phases: dict[str, float]) -> dict[str, float]:
    """Durations in seconds of each span whose two ends were stamped."""
    out = {}
    warm = "init_start" not in phases
    for name, a, b in (*SPANS, SHUTDOWN, TOTAL):
        if name == "restore" and not warm:
            continue
        if name == "spawn" and "root_mounted" not in phases:
            a = "spec_read"  # pooled: the root was mounted before the run
        if name == "mount" and warm:
            a = "spec_read"
        elif name == "mount" and "template_saved" in phases:
            a = "template_saved"
        if a in phases and b in phases:
            out[name] = phases[b] - phases[a]
    return out


def format_table(phases: dict[str, float], start: str = "cold") -> str:
    """The human-readable breakdown printed by --timings."""
    d = spans(phases)
    total = d.get("total") or 0.0
    lines = [f"sandbox timings ({start} start):"]
    for name in dict.fromkeys(name for name, _a, _b in SPANS):
        if name in d:
            share = f"{100 * d[name] / total:5.1f}%" if total else ""
            lines.append(f"  {name:<11} {d[name] * 1000:8.1f} ms {share}")
    for name in ("shutdown", "total"):
        if name in d:
            lines.append(f"  {name:<11} {d[name] * 1000:8.1f} ms")
    return "\n".join(lines)


def to_json(phases: dict[str, float], qemu_peak_rss_kb: int | None = None, start: str = "cold") -> str:
    base = phases.get("launcher_start", 0.0)
    return json.dumps(
        {
            "start": start,
            "clock": "host CLOCK_BOOTTIME, seconds since launcher_start",
            "phases": {p: round(t - base, 6) for p, t in phases.items()},
            "spans_ms": {k: round(v * 1000, 3) for k, v in spans(phases).items()},
            "qemu_peak_rss_kb": qemu_peak_rss_kb,
        },
        indent=2,
    )
