"""Bad input: one line on stderr, exit status 125, no traceback, and no VM started."""

import os
import subprocess
from pathlib import Path

import pytest

from conftest import SANDBOX


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--image-tree", "/proc/sys/kernel/random", "--", "true"], "the guest mounts a filesystem of its own there"),
        (["run", "--image-tree", "/", "--", "true"], "the whole root cannot be one image"),
        (["run", "--image-tree", "/nonexistent/tree", "--", "true"], "'/nonexistent/tree': no such directory"),
        (["run", "--image-tree", "/etc/passwd", "--", "true"], "'/etc/passwd': not a directory"),
        (["run"], "no command given"),
        (["run", "--memory", "lots", "--", "true"], "bad size"),
        (["run", "--cpus", "0", "--", "true"], "bad CPU count"),
        (["run", "--kernel", "/nonexistent/vmlinuz", "--", "true"], "does not exist"),
        (["run", "--home", "/nonexistent/dir", "--", "true"], "not a directory"),
        (["run", "--qemu", "no-such-qemu", "--", "true"], "apt-get install qemu-system-x86"),
        (["run", "--frobnicate", "--", "true"], "unrecognized arguments: --frobnicate (see sandbox --help)"),
        (["run", "--timeout", "inf", "--", "true"], "must be a finite positive number: 'inf'"),
        (["run", "--timeout", "nan", "--", "true"], "must be a finite positive number: 'nan'"),
        (["run", "--memory", "64M", "--", "true"], "the guest kernel needs 96M at least"),
        (["run", "--cpus", str(len(os.sched_getaffinity(0)) + 1), "--", "true"], "this host offers"),
        (["run", "--kernel", "/etc/passwd", "--", "true"], "is not a Linux kernel image"),
        (["run", "--kernel", "/boot", "--", "true"], "is a directory, not a kernel image"),
        (["run", "--share", "/nonexistent/x", "--", "true"], "is not a directory"),
        (["run", "--share", "/tmp:rel", "--", "true"], "is not absolute"),
        (["run", "--tmpfs", "/x:lots", "--", "true"], "expected PATH[:SIZE]"),
        (["run", "--tmpfs", "/etc/passwd", "--", "true"], "is not a directory: cannot mount over it"),
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


def test_kvm_asked_for_where_it_does_not_work_is_one_line() -> None:
    from sandbox.image import host

    problem = host.kvm_problem(host.cpu_flags(), host.loaded_modules(), os.access("/dev/kvm", os.R_OK | os.W_OK))
    proc = subprocess.run([*SANDBOX, "run", "--accel", "kvm", "--", "true"], capture_output=True, text=True, timeout=300)
    if problem is None:  # a host with working KVM: it is no bad input there
        assert proc.returncode == 0, proc.stderr
        return
    lines = proc.stderr.splitlines()
    assert proc.returncode == 125 and len(lines) == 1 and "hardware KVM is not usable" in lines[0] and problem in lines[0], proc.stderr


def test_a_plot_without_matplotlib_is_one_line(tmp_path: Path) -> None:
    # Whatever this machine has installed: a matplotlib that cannot be imported stands in for none.
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([*SANDBOX, "bench", "--plot", str(tmp_path / "x.png"), "--", "true"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 125 and len(proc.stderr.splitlines()) == 1 and "--plot needs matplotlib" in proc.stderr, proc.stderr


def test_a_bad_accelerator_setting_names_its_source() -> None:
    env = dict(os.environ, SANDBOX_ACCEL="fast")
    proc = subprocess.run([*SANDBOX, "run", "--", "true"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 125
    assert proc.stderr.strip() == "sandbox: SANDBOX_ACCEL=fast: invalid choice: 'fast' (choose from 'auto', 'kvm', 'tcg')"


@pytest.mark.parametrize("verb", [["config"], ["pool", "status"], ["list"]])
def test_output_to_a_reader_that_left_ends_quietly_as_sigpipe_would(verb: list[str]) -> None:
    """`sandbox list | head -1`: no "Broken pipe" line (an OSError branch caught it first), status 128+SIGPIPE."""
    import signal

    read, write = os.pipe()
    os.close(read)  # the reader has left before the first byte
    try:
        proc = subprocess.run([*SANDBOX, *verb], stdout=write, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write)
    assert proc.stderr == b"" and proc.returncode == 128 + signal.SIGPIPE, (proc.returncode, proc.stderr)
