"""cgroup v2 limits, checked on a real v2 tree: the guest kernel's (this host is v1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import REPO, run_guest_python
from sandbox.confinement import cgroups
from sandbox.core.errors import ConfinementError


def test_v2_limits_on_the_guest_kernels_cgroup2_tree() -> None:
    if os.geteuid() != 0:
        pytest.fail("root's v2 layout is what this checks (the guest command runs as the caller)")
    result = run_guest_python(REPO / "tests/cgroupv2/cgroupv2_check.py")
    out = result.stdout.decode()
    print(out)
    assert result.returncode == 0, result.stderr.decode()
    facts = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert facts["own"] == "0::/"  # a v2-only tree
    assert facts["version"] == "2"
    assert facts["dir"] == "/sys/fs/cgroup/sandbox/check"
    assert facts["memory.max"] == str(64 << 20)
    assert facts["pids.max"] == "8"
    assert facts["cpu.weight"] == "50"
    assert facts["cpu.max"] == "50000 100000"
    assert facts["member"] == "0::/sandbox/check"
    assert facts["fork"] == "refused Resource temporarily unavailable", facts["fork"]
    assert facts["forked"] == "7" and facts["pids.current"] == "8"
    assert facts["removed"] == "True"


def test_limits_that_cannot_be_applied_are_an_error_unless_best_effort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A host with neither a writable v2 tree nor v1 hierarchies there.
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    limits = cgroups.Limits(memory_mb=256, pids=10)
    with pytest.raises(ConfinementError, match="cannot apply the requested resource limits.*--limits=best-effort"):
        cgroups.create("x", limits)
    assert cgroups.create("x", limits, strict=False) is None
    assert "resource limits not applied" in caplog.text
    assert cgroups.create("x", cgroups.Limits()) is None  # none asked for: nothing to fail
