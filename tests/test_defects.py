"""The edge cases a new user hit (issue 9), end to end: each boots a real VM."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from conftest import SANDBOX, Nobody, run_sandbox, run_tracked, running_pool, stderr_lines

pytestmark = [pytest.mark.vm]


def test_huge_argv_and_environment_arrive_whole_and_are_logged_once(tmp_path: Path, start_mode: str) -> None:
    # Cut at 4,095 entries before: xargs-style commands silently did part of their work.
    args = [str(i) for i in range(1, 100_001)]
    env = {f"SBT_{i}": "x" for i in range(5036)}
    env["HOME"] = os.environ.get("HOME", "/root")
    env["SANDBOX_AUDIT_LOG"] = str(tmp_path / "audit.jsonl")
    env["PATH"] = "/sbt-custom:/usr/bin:/bin"  # last, as the one that was dropped
    script = 'echo "$#"; env | grep -c "^SBT_"; echo "$PATH"; echo "$1 ${100000}"'
    # --timeout 1e300 used to end in an OverflowError traceback.
    zero = f"sh-{os.getpid()}-{time.monotonic_ns()}"  # $0: this run's own, for finding its audit record
    proc = run_sandbox("sh", "-c", script, zero, *args, env=env, run_opts=("--timeout", "1e300"), timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.decode().splitlines() == ["100000", "5036", "/sbt-custom:/usr/bin:/bin", "1 100000"]
    if start_mode == "pooled":
        # The pool's guest was made (and its start logged) before; the pool logs whom it served, in its own trail.
        trail = Path(os.environ.get("SANDBOX_AUDIT_LOG", "/var/log/sandbox/audit.jsonl")).read_text().splitlines()[-200:]
        ours = hashlib.sha256(b"\0".join(a.encode() for a in ["sh", "-c", script, zero, *args])).hexdigest()
        (served,) = [r for r in map(json.loads, trail) if r["event"] == "serve" and r["command"].get("sha256") == ours]  # earlier runs' are there too
        assert len(served["command"]["sha256"]) == 64
        return
    start, stop = (json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines())
    assert start["command"]["argc"] == 100_004 and len(start["command"]["sha256"]) == 64
    assert "command" not in stop and start["run"] == stop["run"]
    assert len((tmp_path / "audit.jsonl").read_bytes()) < 16_000


@pytest.mark.usefixtures("start_mode")
def test_tty_with_a_pipe_on_stdin_gives_the_output_a_pty() -> None:
    # Was a termios.error traceback.
    proc = run_sandbox("sh", "-c", "cat; test -t 1 && echo out-tty; test -t 0 || echo in-pipe", input=b"hi\n", run_opts=("-t",))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hi\r\nout-tty\r\nin-pipe\r\n"


def test_the_smallest_memory_accepted_boots_a_real_command() -> None:
    proc = run_sandbox("python3", "-c", "print('ok')", run_opts=("--memory", "96M"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"ok\n"


def test_the_guests_oom_killer_is_named_and_the_status_kept() -> None:
    proc = run_sandbox("tail", "/dev/zero", run_opts=("--memory", "128M"))
    assert proc.returncode == 137
    assert stderr_lines(proc) == ["sandbox: the command was killed by the out-of-memory killer in the guest; --memory is 128M"]


def test_a_host_memory_limit_that_kills_qemu_is_named() -> None:
    if os.geteuid() != 0:
        pytest.fail("root's cgroups are what this checks")
    # A cold boot needs more than 100M; a warm start (test_warm.py) does not.
    proc = run_sandbox("true", run_opts=("--cold", "--memory-limit", "100M"))
    assert proc.returncode == 125
    lines = stderr_lines(proc)
    assert lines == [
        "sandbox: QEMU was killed by the host's out-of-memory killer: --memory-limit 100M is too small "
        "for a guest with --memory 512M (raise the limit or lower --memory)"
    ], lines


def test_loopback_works_and_lookups_fail_at_once_with_a_hint() -> None:
    script = """
import socket, subprocess, sys, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
cli = socket.create_connection(srv.getsockname()); conn, _ = srv.accept()
cli.sendall(b"ping"); print(conn.recv(4).decode())
t = time.monotonic()
rc = subprocess.run(["getent", "hosts", "example.com"]).returncode
print("lookup", rc, "fast" if time.monotonic() - t < 3 else "slow")
sys.exit(2)
"""
    proc = run_sandbox("python3", "-c", script)
    assert proc.returncode == 2
    assert proc.stdout.decode().splitlines() == ["ping", "lookup 2 fast"]
    assert stderr_lines(proc) == ["sandbox: note: the command looked up example.com, but this sandbox has no network"]


def test_a_successful_command_gets_no_network_hint() -> None:
    proc = run_sandbox("sh", "-c", "getent hosts example.com; exit 0")
    assert proc.returncode == 0 and stderr_lines(proc) == []


def test_a_command_name_with_a_newline_is_quoted() -> None:
    proc = run_sandbox("foo\nbar")
    assert proc.returncode == 127
    assert stderr_lines(proc) == ["sandbox: $'foo\\nbar': command not found"]


def test_a_planted_runtime_dir_is_not_used_and_limits_can_be_best_effort(nobody: Nobody, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o777)
    planted = Path("/tmp/sandbox-65534")
    aside = tmp_path / "own-runtime-dir"
    if planted.exists() or planted.is_symlink():
        planted.rename(aside)  # nobody's real runtime base: put back afterwards
    planted.symlink_to(victim)
    try:
        env = nobody.env(XDG_RUNTIME_DIR="")  # the /tmp/sandbox-UID default
        proc = nobody.run("run", "--memory-limit", "200M", "--limits=best-effort", "--", "echo", "ran", env=env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == b"ran\n"
        lines = stderr_lines(proc)
        assert any("/tmp/sandbox-65534 is not a private directory of yours" in ln for ln in lines), lines
        assert any("resource limits not applied" in ln for ln in lines), lines
        assert list(victim.iterdir()) == []
        assert not list(Path("/tmp").glob("sandbox-65534-*")), "the fallback dir is removed after the run"
    finally:
        planted.unlink()
        if aside.exists() or aside.is_symlink():
            aside.rename(planted)


def test_limits_a_user_cannot_have_are_an_error(nobody: Nobody) -> None:
    start = time.monotonic()
    proc = nobody.run("run", "--memory-limit", "200M", "--pids-limit", "50", "--", "true")
    assert proc.returncode == 125
    lines = stderr_lines(proc)
    assert len(lines) == 1 and "cannot apply the requested resource limits" in lines[0], lines
    assert "--limits=best-effort" in lines[0]
    assert time.monotonic() - start < 30  # refused before any boot


def test_choosing_the_accelerator_silences_the_notice() -> None:
    env = dict(os.environ, SANDBOX_ACCEL="tcg")
    proc = run_sandbox("true", env=env, run_opts=("-v",))
    assert proc.returncode == 0
    assert "KVM unavailable" not in proc.stderr.decode()


def test_a_long_runtime_dir_works_for_runs_named_sandboxes_and_the_pool(tmp_path: Path) -> None:
    # Every run failed with "AF_UNIX path too long" when $XDG_RUNTIME_DIR was long (the exec
    # socket of its registry entry, the pool's socket): found by the suite's own long test dirs.
    runtime = tmp_path / ("r" * 120)
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), SANDBOX_POOL="0")
    proc = run_sandbox("echo", "hi", env=env)
    assert proc.returncode == 0 and proc.stdout == b"hi\n", proc.stderr
    name = f"long-{os.getpid()}"
    started = run_sandbox("sleep", "60", env=env, run_opts=("-d", "--name", name))
    try:
        assert started.returncode == 0, started.stderr
        execd = run_tracked([*SANDBOX, "exec", name, "--", "echo", "inside"], env=env, timeout=120)
        assert execd.returncode == 0 and execd.stdout == b"inside\n", execd.stderr
    finally:
        run_tracked([*SANDBOX, "stop", name], env=env, timeout=120)
    with running_pool("long-" + "l" * 100, size=1) as pool:
        assert len(str(pool.runtime / "sandbox" / "pool.sock")) > 107
        pool.wait_ready()
        pooled = pool.sandbox("run", "--timings=json", "--", "echo", "pooled")
        assert pooled.returncode == 0 and pooled.stdout == b"pooled\n", pooled.stderr
        err = pooled.stderr.decode()
        assert json.loads(err[err.index("{\n") :])["start"] == "pooled"
