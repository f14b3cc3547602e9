import json

from sandbox.plan import timings
from sandbox.plan.timings import Timeline


def test_offset_is_the_tightest_bound_over_all_lines() -> None:
    t = Timeline()
    # guest sends at guest time g, arrives at host time g + offset + delay
    true_offset = 100.0
    for g, delay in ((1.0, 0.004), (1.5, 0.0005), (2.0, 0.002)):
        t.observe(int(g * 1e9), g + true_offset + delay)
    assert t.offset is not None and abs(t.offset - (true_offset + 0.0005)) < 1e-9


def test_guest_stamps_map_onto_the_host_clock_and_kernel_entry_from_tsc() -> None:
    t = Timeline(tsc_khz=2_000_000)  # 2 GHz
    t.stamp_host("launcher_start", 10.0)
    t.stamp_host("qemu_exec", 10.1)
    t.observe(1_000_000_000, 11.0)  # offset 10.0
    t.stamp_guest("init_start", 1_000_000_000)
    t.stamp_guest("tsc", 1_800_000_000)  # 0.9 s of guest time since vCPU reset
    t.stamp_guest("command_exit", 1_300_000_000)
    t.stamp_host("qemu_reaped", 11.35)
    p = t.phases()
    assert list(p) == ["launcher_start", "qemu_exec", "kernel_entry", "init_start", "command_exit", "qemu_reaped"]
    assert abs(p["init_start"] - 11.0) < 1e-9
    assert abs(p["kernel_entry"] - 10.1) < 1e-9
    d = timings.spans(p)
    assert abs(d["shutdown"] - 0.05) < 1e-9 and abs(d["total"] - 1.35) < 1e-9


def test_first_stamp_of_a_phase_wins() -> None:
    t = Timeline()
    t.stamp_host("qemu_exec", 1.0)
    t.stamp_host("qemu_exec", 2.0)
    assert t.host["qemu_exec"] == 1.0


def test_table_and_json() -> None:
    phases = {"launcher_start": 0.0, "qemu_exec": 0.1, "qemu_reaped": 1.0}
    assert "launcher" in timings.format_table(phases) and "total" in timings.format_table(phases)
    data = json.loads(timings.to_json(phases))
    assert data["spans_ms"]["launcher"] == 100.0 and data["phases"]["qemu_reaped"] == 1.0
