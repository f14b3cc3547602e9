"""Bad input: one line on stderr, exit status 125, no traceback, and no VM started."""

import os
import subprocess

import pytest

from conftest import SANDBOX


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run"], "no command given"),
        (["run", "--memory", "lots", "--", "true"], "bad size"),
        (["run", "--cpus", "0", "--", "true"], "bad CPU count"),
        (["run", "--kernel", "/nonexistent/vmlinuz", "--", "true"], "does not exist"),
        (["run", "--home", "/nonexistent/dir", "--", "true"], "not a directory"),
        (["run", "--accel", "kvm", "--", "true"], "hardware KVM is not usable"),
        (["run", "--qemu", "no-such-qemu", "--", "true"], "apt-get install qemu-system-x86"),
        (["run", "--frobnicate", "--", "true"], "unrecognized arguments: --frobnicate (see sandbox --help)"),
        (["run", "--timeout", "inf", "--", "true"], "must be a finite positive number: 'inf'"),
        (["run", "--timeout", "nan", "--", "true"], "must be a finite positive number: 'nan'"),
        (["run", "--memory", "64M", "--", "true"], "the guest kernel needs 96M at least"),
        (["run", "--cpus", "64", "--", "true"], "this host offers"),
        (["run", "--kernel", "/etc/passwd", "--", "true"], "is not a Linux kernel image"),
        (["run", "--kernel", "/boot", "--", "true"], "is a directory, not a kernel image"),
        (["run", "--share", "/nonexistent/x", "--", "true"], "is not a directory"),
        (["run", "--share", "/tmp:rel", "--", "true"], "is not absolute"),
        (["run", "--tmpfs", "/x:lots", "--", "true"], "expected PATH[:SIZE]"),
        (["run", "--tmpfs", "/etc/passwd", "--", "true"], "is not a directory: cannot mount over it"),
        (["bench", "--plot", "/tmp/x.png", "--", "true"], "--plot needs matplotlib"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_125(args: list[str], needle: str) -> None:
    proc = subprocess.run([*SANDBOX, *args], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if "KVM unavailable" not in ln]
    assert proc.returncode == 125, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("sandbox: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert "sandbox sandbox" not in proc.stderr


def test_a_bad_accelerator_setting_names_its_source() -> None:
    env = dict(os.environ, SANDBOX_ACCEL="fast")
    proc = subprocess.run([*SANDBOX, "run", "--", "true"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 125
    assert proc.stderr.strip() == "sandbox: SANDBOX_ACCEL=fast: invalid choice: 'fast' (choose from 'auto', 'kvm', 'tcg')"
