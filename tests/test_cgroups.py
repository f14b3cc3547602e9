"""cgroup v2 limits, checked on a real v2 tree: the guest kernel's (this host is v1)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO, VISIBLE_BASE, run_sandbox


def test_v2_limits_on_the_guest_kernels_cgroup2_tree() -> None:
    if os.geteuid() != 0:
        pytest.fail("root's v2 layout is what this checks (the guest command runs as the caller)")
    python = Path("/usr/bin/python3")
    if not python.exists():
        pytest.fail("Debian's python3 is needed in the guest (./setup.sh installs it)")
    # The package and the check travel in a --home share: the repository
    # may sit under /root or /tmp, which are private in the guest.
    share = VISIBLE_BASE / f"cgroupv2-{os.getpid()}"
    share.mkdir(parents=True)
    try:
        shutil.copy(REPO / "tests/cgroupv2/guest_check.py", share)
        shutil.copytree(REPO / "sandbox", share / "sandbox", ignore=shutil.ignore_patterns("__pycache__"))
        result = run_sandbox(
            str(python), "guest_check.py",
            run_opts=("--qemu-user", "root", "--home", str(share)),
            cwd=share, timeout=300, env=dict(os.environ, PYTHONPATH="."),
        )  # fmt: skip
    finally:
        shutil.rmtree(share, ignore_errors=True)
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
