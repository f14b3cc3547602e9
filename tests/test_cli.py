"""Bad input: one line on stderr, exit status 125, no traceback, and no VM started."""

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
        (["run", "--frobnicate", "--", "true"], "unrecognized arguments"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_125(args: list[str], needle: str) -> None:
    proc = subprocess.run([*SANDBOX, *args], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if "KVM unavailable" not in ln]
    assert proc.returncode == 125, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("sandbox: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
