"""`sandbox run` end to end: every test boots a real VM (TCG here, ~2 s a boot)."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import shlex
import shutil
import signal
import struct
import subprocess
import termios
import fcntl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import (
    CLOSED_FD_SCRIPTS, read_pty, SANDBOX, STARTED, VISIBLE_BASE, Nobody, clean_up, popen, run_sandbox, run_tracked,
    run_with_fd_closed, stderr_lines,
)

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("start_mode")]


@pytest.fixture
def visible_dir() -> Iterator[Path]:
    """A host directory the guest can see (not under the private /tmp or /home), path with spaces."""
    base = VISIBLE_BASE
    path = base / f"dir with spaces {uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True, mode=0o755)
    base.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("code", [1, 42, 255])
def test_exit_status_is_the_commands(code: int) -> None:
    proc = run_sandbox("sh", "-c", f"exit {code}")
    assert proc.returncode == code, proc.stderr
    assert stderr_lines(proc) == []


def test_success_with_json_timings(start_mode: str) -> None:
    if start_mode == "warm":
        run_sandbox("true")  # builds the template if this cache has none
    proc = run_sandbox("true", run_opts=("--timings=json",))
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    data = json.loads(err[err.index("{") :])
    assert data["start"] == start_mode
    phases = data["phases"]
    # A pooled guest was restored, and its root mounted, before the run asked for it.
    machine = ["handed_off"] if start_mode == "pooled" else ["qemu_exec"]
    boot = ["kernel_entry", "init_start", "modules_loaded"] if start_mode == "cold" else []
    mount = [] if start_mode == "pooled" else ["root_mounted"]
    order = ["launcher_start", *machine, *boot, "spec_read", *mount, "command_exec", "command_exit", "poweroff", "qemu_reaped"]
    assert list(phases) == order, phases
    times = [phases[p] for p in order]
    assert times == sorted(times), "phases out of order on the host clock"
    assert 0 < data["spans_ms"]["shutdown"] < 5000


def test_death_by_signal_is_128_plus_n() -> None:
    proc = run_sandbox("sh", "-c", "kill -KILL $$")
    assert proc.returncode == 128 + signal.SIGKILL


def test_stdout_stderr_env_and_argv_exact(visible_dir: Path) -> None:
    env = dict(os.environ, SB_SPACES="a b  c", SB_QUOTES="it's \"quoted\"", SB_NL="line1\nline2", SB_EMPTY="")
    env.pop("HOME", None)  # no HOME on the host: none for the command either (the guest still mounts the user's home)
    script = 'printf "%s|" "$PWD" "$SB_SPACES" "$SB_QUOTES" "$SB_NL" "$SB_EMPTY" "${HOME-unset}" "$@"; echo to-stderr >&2'
    args = ["with space", 'quote"d', "new\nline", ""]
    proc = run_sandbox("sh", "-c", script, "argv0", *args, env=env, cwd=visible_dir)
    assert proc.returncode == 0, proc.stderr
    fields = proc.stdout.decode().split("|")[:-1]
    assert fields == [str(visible_dir), "a b  c", "it's \"quoted\"", "line1\nline2", "", "unset", *args]
    assert stderr_lines(proc) == ["to-stderr"]


def test_binary_stdin_to_stdout_is_byte_exact() -> None:
    data = os.urandom(10 * 1024 * 1024)
    proc = run_sandbox("cat", input=data)
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(proc.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_stdin_eof_reaches_the_guest() -> None:
    proc = run_sandbox("sh", "-c", "wc -c; echo after-eof", input=b"12345")
    assert proc.stdout.split() == [b"5", b"after-eof"]


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_100mb_of_stdout_streams_without_buffering() -> None:
    total = 100 * 1024 * 1024
    proc = popen(
        [*SANDBOX, "run", "--", "head", "-c", str(total), "/dev/zero"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    got = 0
    peak = 0
    while chunk := proc.stdout.read(1 << 20):
        got += len(chunk)
        if got % (10 << 20) < len(chunk):  # every ~10 MB, while the launcher lives
            try:
                peak = max(peak, _vm_hwm_kb(proc.pid))
            except (OSError, AssertionError):
                pass
    assert proc.wait(120) == 0
    assert got == total
    # The launcher's own peak memory stays far below the data size.
    assert 0 < peak < 80 * 1024, f"launcher peak RSS {peak} kB"


def test_root_is_read_only_and_scratch_dirs_are_private() -> None:
    tag = uuid.uuid4().hex
    script = f"""
        touch /usr/probe-{tag} 2>&1; echo "usr=$?"
        echo hi > /tmp/probe-{tag} && echo tmp=ok
        echo hi > /var/tmp/probe-{tag} && echo vartmp=ok
        echo hi > "$HOME/probe-{tag}" && echo home=ok
        mkdir -p /home/someone && echo homedir=ok
    """
    proc = run_sandbox("sh", "-c", script)
    out = proc.stdout.decode()
    assert "Read-only file system" in out and "usr=1" in out
    assert all(f"{k}=ok" in out for k in ("tmp", "vartmp", "home", "homedir")), out
    home = Path(os.environ.get("HOME", "/root"))
    for host_path in (Path(f"/usr/probe-{tag}"), Path(f"/tmp/probe-{tag}"), Path(f"/var/tmp/probe-{tag}"), home / f"probe-{tag}"):
        assert not host_path.exists(), f"{host_path} leaked to the host"
    assert not Path("/home/someone").exists()


def test_home_share_persists_writes(visible_dir: Path) -> None:
    (visible_dir / "existing").write_text("before")
    owner = (visible_dir.stat().st_uid, visible_dir.stat().st_gid)
    proc = run_sandbox(
        "sh", "-c", 'cat "$HOME/existing"; echo written > "$HOME/new"; mkdir "$HOME/sub"; echo x > "$HOME/sub/f"',
        run_opts=("--home", str(visible_dir)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"before"
    assert (visible_dir / "new").read_text() == "written\n"
    assert (visible_dir / "sub/f").read_text() == "x\n"
    # Everything is the user's again afterwards, new files included.
    for p in (visible_dir, visible_dir / "new", visible_dir / "sub", visible_dir / "sub/f", visible_dir / "existing"):
        assert (p.stat().st_uid, p.stat().st_gid) == owner, p


def test_workdir_starts_the_command_there_copy_on_write(visible_dir: Path) -> None:
    (visible_dir / "sub").mkdir()
    (visible_dir / "sub" / "kept").write_text("host\n")
    script = 'pwd; echo "$PWD"; cat kept; echo guest > kept; rm kept; touch new; ls'
    for workdir in (str(visible_dir / "sub"), "sub"):  # absolute, or relative to where it would start
        proc = run_sandbox("sh", "-c", script, run_opts=("--workdir", workdir), cwd=visible_dir, env=dict(os.environ, PWD=str(visible_dir)))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.decode().splitlines() == [str(visible_dir / "sub"), str(visible_dir / "sub"), "host", "new"]
        assert stderr_lines(proc) == []
    # Shown copy-on-write, as the working directory is: the host's files are as they were.
    assert sorted(p.name for p in (visible_dir / "sub").iterdir()) == ["kept"] and (visible_dir / "sub" / "kept").read_text() == "host\n"
    missing = run_sandbox("true", run_opts=("--workdir", "/no/such/dir"))
    assert missing.returncode == 125
    assert stderr_lines(missing) == ["sandbox: cannot enter the working directory /no/such/dir in the sandbox: No such file or directory"]


def test_runs_as_a_non_root_user(nobody: Nobody) -> None:
    env = nobody.env(HOME="/home/sbuser")  # a home the host does not have: made, empty, in the guest
    proc = nobody.run("run", "--", "sh", "-c", 'id -u; id -g; echo "$HOME"; touch "$HOME/x" && echo home-ok', env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["65534", "65534", "/home/sbuser", "home-ok"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--qemu-user", "root"), "--qemu-user root: only a sandbox started as root changes QEMU's user (here QEMU runs as you)"),
        (("--name", ""), "bad sandbox name '' (letters, digits, '_', '.', '-'; 64 at most)"),
    ],
)
def test_what_means_nothing_for_a_normal_user_is_refused(nobody: Nobody, args: tuple[str, ...], message: str) -> None:
    proc = nobody.run("run", *args, "--", "true")
    assert (proc.returncode, proc.stderr.decode()) == (125, f"sandbox: {message}\n")


def test_the_guest_is_named_after_the_sandbox() -> None:
    name = f"web-{os.getpid()}"
    proc = run_sandbox("sh", "-c", "hostname; cat /proc/sys/kernel/hostname", run_opts=("--name", name, "--rm"))
    assert (proc.returncode, proc.stdout.decode().split()) == (0, [name, name]), proc.stderr
    proc = run_sandbox("hostname")
    assert proc.returncode == 0 and re.fullmatch(rb"sandbox-[0-9a-f]{6}\n", proc.stdout), proc.stdout


def test_command_not_found_is_127_and_not_executable_is_126(visible_dir: Path) -> None:
    proc = run_sandbox("no-such-command-xyz")
    assert proc.returncode == 127
    assert stderr_lines(proc) == ["sandbox: no-such-command-xyz: command not found"]
    script = visible_dir / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    proc = run_sandbox(str(script))
    assert proc.returncode == 126
    assert stderr_lines(proc) == [f"sandbox: {script}: Permission denied"]


def test_timeout_kills_the_vm_with_124() -> None:
    start = time.monotonic()
    proc = run_sandbox("sleep", "600", run_opts=("--timeout", "4"))
    assert proc.returncode == 124
    assert time.monotonic() - start < 30
    assert stderr_lines(proc) == ["sandbox: the command timed out; the VM was killed"]


def test_sigint_is_forwarded_to_the_command() -> None:
    script = 'trap "echo got-int; exit 7" INT; echo ready; while :; do sleep 0.1; done'
    proc = popen([*SANDBOX, "run", "--", "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert out == b"got-int\n"
    assert proc.returncode == 7


def test_two_sandboxes_at_once() -> None:
    procs = [
        popen([*SANDBOX, "run", "--", "sh", "-c", f"sleep 1; echo {i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o for o, _ in outs] == [b"0\n", b"1\n"]


def test_tty_gets_a_pty_with_the_window_size() -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    proc = popen(
        [*SANDBOX, "run", "--", "sh", "-c", "tty; stty size; test -t 0 && echo stdin-tty"],
        stdin=slave, stdout=slave, stderr=slave, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    out = read_pty(master, 120)
    assert proc.wait(30) == 0
    text = out.decode(errors="replace")
    assert "/dev/pts/" in text and "33 101" in text and "stdin-tty" in text, text


def test_a_resize_before_the_command_starts_reaches_it(tmp_path: Path, start_mode: str) -> None:
    """SIGWINCH before the spec (warm: while the template is built, the guest about to be snapshotted): held back, then sent after the spec."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    name = f"t-winch-{os.getpid()}"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 70, 0, 0))
    proc = popen([*SANDBOX, "run", "--name", name, "--timings=json", "--", "sh", "-c", "sleep 2; stty size"],
                 stdin=slave, stdout=slave, stderr=slave, close_fds=True, env=env)  # fmt: skip
    os.close(slave)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the machine is built; the kernel boots for seconds yet
            rows = json.loads(run_tracked([*SANDBOX, "list", "--json"]).stdout)
            if any(r["name"] == name and r.get("qemu_pid") for r in rows):
                break
            time.sleep(0.1)
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 44, 132, 0, 0))
        proc.send_signal(signal.SIGWINCH)
        text = read_pty(master, 120).decode(errors="replace")
        assert proc.wait(30) == 0, text
    finally:
        run_tracked([*SANDBOX, "rm", "-f", name])
    start = {"warm": "cold, building the template", "cold": "cold", "pooled": "pooled"}[start_mode]
    assert f'"start": "{start}"' in text, text
    assert "44 132" in text and "20 70" not in text, text


def test_verbose_shows_qemu_argv_and_console() -> None:
    # A kernel message at error level reaches the console whatever the loglevel.
    proc = run_sandbox("sh", "-c", "echo '<3>sbx-console-check' > /dev/kmsg", run_opts=("-v",))
    assert proc.returncode == 0
    err = proc.stderr.decode()
    assert "sandbox: qemu: " in err and "-nodefaults" in err
    assert "] sbx-console-check" in err  # the guest console, streamed


def test_guest_kernel_panic_is_a_launcher_error_with_console_tail() -> None:
    proc = run_sandbox("sh", "-c", "echo c > /proc/sysrq-trigger")
    assert proc.returncode == 125
    err = proc.stderr.decode()
    assert "sandbox: guest kernel panic (sysrq triggered crash)" in err
    assert "Traceback" not in err


def test_a_stalled_boot_is_detected_retried_and_reported() -> None:
    # A boot bound far below the real boot time: every attempt "stalls".
    start = time.monotonic()
    proc = run_sandbox("true", run_opts=("--cold", "--boot-timeout", "0.3"))
    assert proc.returncode == 125
    lines = stderr_lines(proc)
    assert any("no progress" in ln and "retrying" in ln for ln in lines), lines
    assert any("no progress for 0.3 s (attempt 2)" in ln for ln in lines), lines
    assert time.monotonic() - start < 30


def test_a_qemu_that_never_starts_its_machine_is_a_stall(tmp_path: Path) -> None:
    # QEMU that answers the capability probes but then hangs before its
    # main loop: the launcher must not wait on its monitor for ever.
    fake = tmp_path / "qemu-system-x86_64"
    real = shutil.which("qemu-system-x86_64")
    fake.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *-version*|*help*) exec {real} "$@";; esac\n'
        "exec sleep 600\n"
    )
    fake.chmod(0o755)
    start = time.monotonic()
    proc = run_sandbox("true", run_opts=("--qemu", str(fake), "--no-confine", "--boot-timeout", "1"))
    assert proc.returncode == 125
    lines = stderr_lines(proc)
    assert any("never answered its monitor" in ln and "retrying" in ln for ln in lines), lines
    assert any("no progress for 1 s (attempt 2)" in ln for ln in lines), lines
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_sigterm_during_boot_ends_the_run_and_leaves_nothing(delay: float) -> None:
    # Before the guest command runs there is nothing to forward the signal
    # to: the VM is stopped and everything unwound (the no_leftovers fixture
    # checks QEMU processes and runtime dirs).
    proc = popen([*SANDBOX, "run", "--", "sleep", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err


def test_q35_machine_with_virtio_pci() -> None:
    proc = run_sandbox("sh", "-c", "echo q35-ok", run_opts=("--machine", "q35"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"q35-ok\n"


def test_a_closed_reader_ends_the_command_by_sigpipe() -> None:
    # `yes | head -1`: yes must die of SIGPIPE (141), as it would on the host.
    proc = popen([*SANDBOX, "run", "--", "yes"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"y\n"
    proc.stdout.close()
    assert proc.wait(120) == 128 + signal.SIGPIPE


@pytest.mark.parametrize("fd", sorted(CLOSED_FD_SCRIPTS))
def test_a_closed_stdio_fd_is_closed_for_the_command(fd: int) -> None:
    # `cmd <&-`, `cmd >&-`, `cmd 2>&-`: the command itself meets EBADF, as it
    # does run directly (not an empty stdin or a sink that swallows output).
    argv = ["sh", "-c", CLOSED_FD_SCRIPTS[fd]]
    expected = run_with_fd_closed(argv, fd, timeout=30)
    assert b"rc=" in (expected[0] or b"") + (expected[1] or b""), expected  # the script ran and said how it went
    assert run_with_fd_closed([*SANDBOX, "run", "--", *argv], fd) == expected


def test_an_unrelated_qemu_is_neither_reported_nor_touched() -> None:
    # Benchmarks, other users and other test runs share the machine: the
    # fixtures judge only the sandboxes a test started.
    other = subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-display", "none", "-nodefaults", "-S"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.3)
        assert other.poll() is None
        proc = run_sandbox("true")
        assert proc.returncode == 0, proc.stderr
        assert clean_up({STARTED[-1]}) == []
        assert other.poll() is None, "the unrelated QEMU was killed"
    finally:
        other.kill()
        other.wait()


def test_the_environment_is_the_callers_even_in_the_c_locale() -> None:
    # Python, started under the C locale, adds LC_CTYPE=C.UTF-8 to its own environment (PEP 538):
    # the command got it too.  The oracle: env run directly with the same environment.
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C"}
    env |= {k: os.environ[k] for k in ("XDG_RUNTIME_DIR", "SANDBOX_POOL", "XDG_CONFIG_HOME") if k in os.environ}
    host = subprocess.run(["env"], env=env, capture_output=True, check=True).stdout
    proc = run_tracked([*SANDBOX, "run", "--", "env"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == sorted(host.splitlines())


def test_nohup_keeps_the_command_deaf_to_a_hangup() -> None:
    # A launcher started with SIGHUP ignored passed the hangup on all the same: the command died (129).
    script = "echo started; sleep 3; echo survived"
    proc = popen(["nohup", *SANDBOX, "run", "--", "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (0, b"survived\n"), err


def test_supplementary_groups_arrive_as_they_are() -> None:
    # The primary gid was dropped from the supplementary groups (root's 0 here, as a user's own gid elsewhere).
    wrap = ["setpriv", "--groups", "0,29"]
    host = subprocess.run([*wrap, "grep", "^Groups", "/proc/self/status"], capture_output=True, check=True).stdout
    proc = run_tracked([*wrap, *SANDBOX, "run", "--", "grep", "^Groups", "/proc/self/status"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == host.split() == [b"Groups:", b"0", b"29"]


def test_a_file_on_stdin_goes_on_where_the_command_stopped_reading(tmp_path: Path) -> None:
    # The launcher reads ahead of the command: `while read l; do sandbox run -- true; done < file`
    # saw one line, and the rest of a file was gone for whoever read it next.  The oracle: the
    # same shell lines with the command run directly.
    lines = tmp_path / "lines"
    lines.write_bytes(b"l1\nl2\nl3\n")
    sandbox = " ".join(shlex.quote(w) for w in [*SANDBOX, "run", "--"])
    script = """while read l; do echo "got $l"; {run} true; done < "$1"; {{ {run} sh -c 'read x; echo "in:$x"'; cat; }} < "$1\""""
    host = subprocess.run(["sh", "-c", script.format(run=""), "sh", str(lines)], capture_output=True, check=True).stdout
    proc = popen(["sh", "-c", script.format(run=sandbox), "sh", str(lines)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert out == host == b"got l1\ngot l2\ngot l3\nin:l1\nl2\nl3\n"
