"""MCS pair allocation, label formatting, cgroup values: the pure parts of confinement."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
from pathlib import Path

import pytest

from sandbox.confinement import cgroups, mcs as labels
from sandbox.core.errors import ConfinementError


def test_levels_and_contexts() -> None:
    assert labels.mcs_level(7, 3) == "s0:c3,c7"
    proc, image = labels.sandbox_contexts((3, 7))
    assert str(proc) == "system_u:system_r:svirt_t:s0:c3,c7"
    assert str(image) == "system_u:object_r:svirt_image_t:s0:c3,c7"
    assert labels.Context.parse("u:r:t:s0:c1,c2").level == "s0:c1,c2"
    for bad in [(1, 1), (-1, 2), (0, 1024)]:
        with pytest.raises(ValueError):
            labels.mcs_level(*bad)
    with pytest.raises(ConfinementError):
        labels.Context.parse("no-colons")


def _hold_one(directory: str, barrier: multiprocessing.synchronize.Barrier, queue: "multiprocessing.Queue[tuple[int, int]]") -> None:
    res = labels.reserve(Path(directory))
    queue.put(res.pair)
    barrier.wait()  # hold until every process has its pair


def test_200_concurrent_reservations_across_processes_are_unique(tmp_path: Path) -> None:
    n = 200
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_hold_one, args=(str(tmp_path), barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    pairs = [queue.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(60)
    assert len(set(pairs)) == n
    assert all(0 <= a < b < labels.CATEGORIES for a, b in pairs)


def test_a_held_pair_is_skipped_and_a_dead_launchers_pair_reclaimed(tmp_path: Path) -> None:
    # Only one pair exists among 2 categories: (0, 1).
    held = labels.reserve(tmp_path, categories=2)
    with pytest.raises(ConfinementError):
        labels.reserve(tmp_path, categories=2, attempts=20)
    held.release()
    # A launcher that dies holding the pair: its lock dies with it.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        labels.reserve(tmp_path, categories=2)
        os.write(w, b"x")
        signal.pause()
    os.close(w)
    assert os.read(r, 1) == b"x"
    with pytest.raises(ConfinementError):
        labels.reserve(tmp_path, categories=2, attempts=20)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    again = labels.reserve(tmp_path, categories=2)  # the stale file is still there
    assert again.pair == (0, 1)
    again.release()


def test_static_pair_conflicts_with_a_live_one(tmp_path: Path) -> None:
    live = labels.reserve(tmp_path, rng=random.Random(1))
    with pytest.raises(ConfinementError, match="in use"):
        labels.reserve_static(tmp_path, live.pair[::-1])
    live.release()
    labels.reserve_static(tmp_path, live.pair).release()


def test_cgroup_values_for_v2_and_v1() -> None:
    lim = cgroups.Limits(memory_mb=256, cpu_weight=50, cpu_quota=0.5, pids=64)
    v2 = cgroups.v2_files(lim)
    assert v2["memory"]["memory.max"] == str(256 << 20)
    assert v2["cpu"] == {"cpu.weight": "50", "cpu.max": "50000 100000"}
    assert v2["pids"] == {"pids.max": "64"}
    v1 = cgroups.v1_files(lim)
    assert v1["memory"] == {"memory.limit_in_bytes": str(256 << 20)}
    assert v1["cpu"] == {"cpu.shares": "512", "cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000"}
    assert not cgroups.Limits().any() and cgroups.v2_files(cgroups.Limits()) == {}
