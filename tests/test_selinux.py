"""The SELinux policy module compiles, and labelling works under a real enforcing policy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run_guest_python

DEVEL_MAKEFILE = Path("/usr/share/selinux/devel/Makefile")
POLICY_ROOT = Path("/etc/selinux/default")


def build_modules(workdir: Path, *sources: Path) -> list[Path]:
    """Compile .te/.if/.fc modules with Debian's refpolicy devel Makefile."""
    if not DEVEL_MAKEFILE.exists():
        pytest.fail("selinux-policy-dev is needed to compile policies/ (./setup.sh installs it)")
    for src in sources:
        shutil.copy(src, workdir)
    names = sorted({s.stem for s in sources})
    proc = subprocess.run(
        ["make", "-f", str(DEVEL_MAKEFILE), *(f"{n}.pp" for n in names)],
        cwd=workdir, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [workdir / f"{n}.pp" for n in names]


def test_policy_module_compiles(tmp_path: Path) -> None:
    [pp] = build_modules(tmp_path, *sorted((REPO / "policies").glob("sandbox.*")))
    assert pp.stat().st_size > 0


@pytest.mark.slow
@pytest.mark.vm
def test_labels_confine_under_enforcing_selinux_in_a_guest(tmp_path: Path) -> None:
    """Boots a guest with SELinux and Debian's policy plus our module, enforcing.

    The host has SELinux off, so the policy is linked on the host (semodule
    into a copy of the policy store) and the guest loads it whole.
    """
    if not POLICY_ROOT.exists():
        pytest.fail("selinux-policy-default is needed (./setup.sh installs it)")
    build = tmp_path / "build"
    build.mkdir()
    modules = build_modules(build, *sorted((REPO / "policies").glob("sandbox.*")), REPO / "tests/selinux/sandbox_test.te")
    root = tmp_path / "root"
    (root / "var/lib").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copytree("/var/lib/selinux", root / "var/lib/selinux", symlinks=True)
    shutil.copytree("/etc/selinux", root / "etc/selinux", symlinks=True)
    proc = subprocess.run(
        ["semodule", "-p", str(root), "-s", "default", "-i", *map(str, modules)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    policy = root / "etc/selinux/default/policy/policy.33"
    assert proc.returncode == 0 and policy.exists(), proc.stderr

    # The policy, the check and the package travel in a --home share.
    result = run_guest_python(
        REPO / "tests/selinux/selinux_check.py", "policy.33",
        files=(policy,), run_opts=("--kernel-append", "selinux=1 security=selinux audit=1"),
    )  # fmt: skip
    out = result.stdout.decode()
    print(out)
    assert result.returncode == 0, result.stderr.decode()
    facts = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    loaded, size = facts["loaded"].split("/")
    assert loaded == size
    assert facts["enforce"] == "1" and facts["enabled"] == "True"
    assert facts["launcher"].split(":")[2] == "kernel_t"
    pairs = facts["pairs"]
    process = facts["process"]
    assert process.startswith("system_u:system_r:sandbox_t:s0:c"), process
    level = process.split(":", 3)[3]
    assert facts["file"] == f"system_u:object_r:sandbox_image_t:{level}"
    assert facts["read-same"] == "same pair"
    assert "Permission denied" in facts["read-different"], facts["read-different"]
    # QEMU's domain reads the boot images the launcher hands it as memfds.
    assert facts["read-memfd"] == "boot image", facts["read-memfd"]
    assert facts["memfd-label"].split(":")[2] == "tmpfs_t", facts["memfd-label"]
    assert pairs
