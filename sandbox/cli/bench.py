"""`sandbox bench`: many sandboxes of one command, timed phase by phase.

Each run is a separate `sandbox run --timings=json` process, so the figures
include the interpreter start-up a user pays, and nothing is shared between
runs but the caches a user's runs share too.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sandbox.cli import config
from sandbox.image import host, kernel
from sandbox.core.errors import ToolMissingError
from sandbox.plan.timings import SHUTDOWN, SPANS, TOTAL


@dataclass
class Sample:
    status: int
    spans_ms: dict[str, float]
    qemu_peak_rss_kb: int | None
    wall_ms: float


@dataclass
class Stats:
    min: float
    median: float
    max: float


@dataclass
class Report:
    label: str
    command: list[str]
    runs: int
    failures: int
    machine: dict[str, Any]
    spans: dict[str, Stats] = field(default_factory=dict)
    qemu_peak_rss_mib: Stats | None = None


def machine_facts(accel: str, kernel_path: Path | None) -> dict[str, Any]:
    """CPU, accelerator, kernel and QEMU, for the record."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    chosen, _ = host.choose_accel(accel)
    try:
        kern = kernel.find_kernel(kernel_path).version
    except Exception:  # noqa: BLE001 - a fact, not a requirement
        kern = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "accel": chosen,
        "guest_kernel": kern,
        "qemu": host.qemu_info().version,
        "host_kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def run_once(run_args: list[str], command: list[str]) -> Sample:
    """One `sandbox run --timings=json` as a separate process."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox", "run", "--timings=json", *run_args, "--", *command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    wall = (time.monotonic() - start) * 1000
    err = proc.stderr.decode(errors="replace")
    spans: dict[str, float] = {}
    rss = None
    if "{" in err:
        try:
            data = json.loads(err[err.index("{") :])
            spans, rss = data["spans_ms"], data.get("qemu_peak_rss_kb")
        except (ValueError, KeyError):
            pass
    return Sample(proc.returncode, spans, rss, wall)


def summarize(label: str, command: list[str], samples: list[Sample], facts: dict[str, Any]) -> Report:
    good = [s for s in samples if s.status == 0 and s.spans_ms]
    report = Report(label, command, len(samples), len(samples) - len(good), facts)
    names = [n for n, _a, _b in SPANS] + [SHUTDOWN[0], TOTAL[0], "wall"]
    for name in names:
        values = [s.wall_ms if name == "wall" else s.spans_ms.get(name) for s in good]
        vals = [v for v in values if v is not None]
        if vals:
            report.spans[name] = Stats(min(vals), statistics.median(vals), max(vals))
    rss = [s.qemu_peak_rss_kb / 1024 for s in good if s.qemu_peak_rss_kb]
    if rss:
        report.qemu_peak_rss_mib = Stats(min(rss), statistics.median(rss), max(rss))
    return report


def format_report(r: Report) -> str:
    total = r.spans.get("total")
    lines = [
        f"{r.label}: {r.runs} runs of {' '.join(r.command)}, {r.failures} failed",
        "  " + ", ".join(f"{k}: {v}" for k, v in r.machine.items()),
        f"  {'phase':<11} {'min':>8} {'median':>8} {'max':>8}  share",
    ]
    for name, st in r.spans.items():
        share = f"{100 * st.median / total.median:5.1f}%" if total and name in {n for n, _a, _b in SPANS} else ""
        lines.append(f"  {name:<11} {st.min:8.1f} {st.median:8.1f} {st.max:8.1f}  {share}")
    if r.qemu_peak_rss_mib:
        q = r.qemu_peak_rss_mib
        lines.append(f"  qemu peak RSS MiB: min {q.min:.0f}, median {q.median:.0f}, max {q.max:.0f}")
    return "\n".join(lines)


def plot(reports: list[Report], path: Path) -> None:
    """A stacked bar per configuration (median of each phase)."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise SystemExit("sandbox: --plot needs matplotlib (pip install 'sandbox[plot]')") from None
    fig, ax = plt.subplots(figsize=(8, 2.0 + 0.6 * len(reports)))
    for i, r in enumerate(reports):
        left = 0.0
        for name, _a, _b in SPANS:
            if name in r.spans:
                width = r.spans[name].median
                ax.barh(i, width, left=left, label=name if i == 0 else None)
                left += width
    ax.set_yticks(range(len(reports)), [r.label for r in reports])
    ax.set_xlabel("ms (median)")
    ax.legend(ncol=5, fontsize="small", loc="lower center", bbox_to_anchor=(0.5, 1.02))
    fig.tight_layout()
    fig.savefig(path)


def bench(label: str, run_args: list[str], command: list[str], runs: int, warmup: int, facts: dict[str, Any]) -> Report:
    samples: list[Sample] = []
    for i in range(warmup + runs):
        s = run_once(run_args, command)
        if i >= warmup:
            samples.append(s)
        tag = "warmup" if i < warmup else f"{i - warmup + 1}/{runs}"
        total = s.spans_ms.get("total")
        shown = f"{total:.0f} ms" if total else f"status {s.status}"
        print(f"\r{label}: run {tag}: {shown}   ", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return summarize(label, command, samples, facts)


def main(
    run_args: list[str],
    command: tuple[str, ...],
    runs: int,
    warmup: int,
    json_path: Path | None,
    plot_path: Path | None,
    accel: str | None,
    kernel_path: Path | None,
) -> int:
    """`sandbox bench`: `runs` timed runs of `sandbox run RUN_ARGS -- COMMAND`."""
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ToolMissingError("--plot needs matplotlib (pip install matplotlib)") from None
    facts = machine_facts(config.accel(accel), kernel_path)
    report = bench("sandbox run", run_args, list(command), runs, warmup, facts)
    print(format_report(report))
    if json_path:
        json_path.write_text(json.dumps(asdict(report), indent=2) + "\n")
    if plot_path:
        plot([report], plot_path)
    return 0 if report.failures == 0 else 1
