"""The pool of ready guests (sandbox/backends/pool/), end to end: what it promises beyond a run's own tests.

Every run test of test_run.py also runs pooled (conftest.start_mode);
these are the pool's own promises: clones that stay unique, a clock set
at the run, nothing carried from a run to the next, a pool or client
killed at any moment, another user's pool, and the verbs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import psutil
import pytest

from conftest import SANDBOX, VISIBLE_BASE, Nobody, PoolForTests, popen, run_tracked, running_pool

pytestmark = [pytest.mark.vm]


@pytest.fixture
def own_pool() -> Iterator[PoolForTests]:
    """A pool for one test (one that kills or stops it)."""
    with running_pool("own-pool") as pool:
        yield pool


def pooled(pool: PoolForTests, *argv: str, opts: tuple[str, ...] = (), **kw: Any) -> subprocess.CompletedProcess[bytes]:
    """`sandbox run` in the pool's environment, once a guest is ready (so that it is pooled, not restored)."""
    pool.wait_ready(1)
    return pool.sandbox("run", "--timings=json", *opts, "--", *argv, **kw)


def start_of(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode()
    return str(json.loads(err[err.index("{\n") :])["start"])


def test_clones_of_one_template_stay_unique(test_pool: PoolForTests) -> None:
    script = ("python3 -c 'import os; print(os.getrandom(16).hex())'; cat /proc/sys/kernel/random/uuid /proc/sys/kernel/random/boot_id;"
              " grep '\\[stack\\]' /proc/self/maps")  # fmt: skip
    runs = [pooled(test_pool, "sh", "-c", script) for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0 and start_of(proc) == "pooled", proc.stderr
    first, second = (proc.stdout.decode().splitlines() for proc in runs)
    assert len(first) == len(second) == 4
    for what, a, b in zip(("getrandom", "uuid", "boot_id", "grep's stack"), first, second):
        assert a != b, f"two pooled runs share their {what}: {a}"


def test_the_clock_is_the_hosts_at_the_start_even_after_a_wait(test_pool: PoolForTests) -> None:
    test_pool.wait_ready()
    time.sleep(20)  # the guests wait; their clocks would drift from the host's if nothing set them
    before = time.time()
    proc = pooled(test_pool, "date", "+%s.%N")
    after = time.time()
    assert proc.returncode == 0 and start_of(proc) == "pooled", proc.stderr
    guest = float(proc.stdout)
    assert before - 1 <= guest <= after + 1, (before, guest, after)


def test_a_guest_serves_one_run_and_carries_nothing_to_the_next(test_pool: PoolForTests) -> None:
    write = "echo secret > /tmp/left; echo secret > /dev/shm/left; echo secret > $HOME/left; export LEFT=1; cat /proc/sys/kernel/random/boot_id"
    check = "ls /tmp/left /dev/shm/left $HOME/left 2>&1 | grep -c 'No such'; cat /proc/sys/kernel/random/boot_id"
    first = pooled(test_pool, "sh", "-c", write)
    second = pooled(test_pool, "sh", "-c", check)
    assert first.returncode == 0 and start_of(first) == "pooled", first.stderr
    assert second.returncode == 0 and start_of(second) == "pooled", second.stderr
    lines = second.stdout.decode().split()
    assert lines[0] == "3"  # none of the files the run before wrote
    assert lines[1] != first.stdout.decode().strip()  # another guest
    assert not (Path(os.environ.get("HOME", "/root")) / "left").exists()


def test_waiting_guests_cost_next_to_no_cpu(test_pool: PoolForTests) -> None:
    # A guest's kernel stops its tick when idle (the TCG CPU has ARAT); without that, 250 timer
    # interrupts a second cost each waiting guest ~5% of a core under TCG.
    proc = pooled(test_pool, "sh", "-c", "grep LOC: /proc/interrupts; sleep 2; grep LOC: /proc/interrupts")
    assert proc.returncode == 0 and start_of(proc) == "pooled", proc.stderr
    before, after = (int(line.split()[1]) for line in proc.stdout.decode().splitlines())
    assert after - before < 200, f"{after - before} local timer interrupts in 2 s of sleep: the guest ticks periodically"
    status = test_pool.wait_ready()
    guests = [psutil.Process(g["qemu_pid"]) for g in status["ready"]]
    used_before = [sum(p.cpu_times()[:2]) for p in guests]
    time.sleep(10)
    used = [sum(p.cpu_times()[:2]) - b for p, b in zip(guests, used_before)]
    assert all(u < 0.15 for u in used), f"CPU seconds over 10 s of waiting, per guest: {used}"


def test_status_says_what_is_ready_and_what_was_served(own_pool: PoolForTests) -> None:
    status = own_pool.wait_ready()
    assert status["size"] == 2 and len(status["ready"]) == 2 and status["launchers_ready"] == 1, status
    for guest in status["ready"]:
        assert guest["pss_mib"] > 0 and guest["qemu_pid"] > 0
    served = status["served"]
    first = pooled(own_pool, "true")
    assert first.returncode == 0 and start_of(first) == "pooled", first.stderr
    miss = own_pool.sandbox("run", "--memory", "768M", "--timings=json", "--", "true")  # made for other options: restored
    assert miss.returncode == 0 and start_of(miss) != "pooled", miss.stderr
    no_pool = own_pool.sandbox("run", "--no-pool", "--timings=json", "--", "true")
    assert no_pool.returncode == 0 and start_of(no_pool) == "warm", no_pool.stderr
    after = own_pool.status()
    assert after is not None
    assert after["served"] == served + 1 and after["misses"] == status["misses"] + 1, (status, after)
    text = own_pool.sandbox("pool", "status").stdout.decode()
    assert f"pool {own_pool.pid}:" in text and "served" in text and "MiB PSS" in text


def test_a_killed_pool_leaves_no_qemu_and_the_next_run_starts_another(own_pool: PoolForTests) -> None:
    own_pool.wait_ready()
    assert len([p for p in own_pool.processes() if Path(f"/proc/{p}/comm").read_text().strip() == "qemu-system-x86"]) == 2
    os.kill(own_pool.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while own_pool.processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert own_pool.processes() == []  # its QEMUs (parent-death signal) and its ready launcher (its socket closed)
    assert own_pool.status() is None
    proc = own_pool.sandbox("run", "--timings=json", "--", "echo", "still-works")
    assert proc.returncode == 0 and proc.stdout == b"still-works\n", proc.stderr
    assert start_of(proc) == "warm"
    assert not (own_pool.runtime / "sandbox" / "pool.sock").exists() or own_pool.status() is not None
    deadline = time.monotonic() + 60
    while own_pool.status() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the run started a pool for the next runs
    status = own_pool.status()
    assert status is not None and status["pid"] != own_pool.pid
    own_pool.pid = int(status["pid"])


def test_a_killed_client_ends_its_guest(own_pool: PoolForTests) -> None:
    own_pool.wait_ready()
    proc = popen([*SANDBOX, "run", "--", "sh", "-c", "echo started; sleep 300"], env=own_pool.env,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
    status = own_pool.status()
    assert status is not None and status["serving"] == 1
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status = own_pool.status()
        assert status is not None
        if status["serving"] == 0:
            break
        time.sleep(0.1)
    assert status["serving"] == 0
    running = subprocess.run(["pgrep", "-f", "sleep 300"], capture_output=True, text=True).stdout.split()
    assert not [p for p in running if Path(f"/proc/{p}/cwd").exists() and str(own_pool.runtime) in os.readlink(f"/proc/{p}/cwd")]


def test_a_changed_host_file_the_guests_read_is_never_served_stale(own_pool: PoolForTests) -> None:
    own_pool.wait_ready()
    # /etc's entries changed (as when ld.so.preload is made): what the waiting guests looked up there may be stale.
    marker = Path("/etc") / f"sandbox-test-{os.getpid()}"
    marker.write_text("x")
    marker.unlink()
    proc = own_pool.sandbox("run", "--timings=json", "--", "true")
    assert proc.returncode == 0 and start_of(proc) == "warm", proc.stderr
    status = own_pool.status()
    assert status is not None and status["stale"] == 2
    assert start_of(pooled(own_pool, "true")) == "pooled"  # the guests made since


def test_a_mount_or_unmount_on_the_host_is_seen_by_the_next_pooled_run(own_pool: PoolForTests) -> None:
    # A ready guest's QEMU copied the host's mount table when it was made; where the host's mounts do not
    # propagate (this host's / is private), a mount made later never reaches it: its 9p root would show
    # the old view.  The oracle: the host's own read of the file at each step.
    where = Path("/var/lib") / f"sandbox-test-mount-{os.getpid()}"
    where.mkdir()
    try:
        (where / "f").write_text("under\n")
        own_pool.wait_ready()
        assert start_of(proc := pooled(own_pool, "cat", str(where / "f"))) == "pooled" and proc.stdout == b"under\n"
        subprocess.run(["mount", "-t", "tmpfs", "sandbox-test", str(where)], check=True)
        try:
            (where / "f").write_text("over\n")
            own_pool.wait_ready()  # guests made before the mount, waiting
            proc = own_pool.sandbox("run", "--", "cat", str(where / "f"))
            assert (proc.returncode, proc.stdout) == (0, (where / "f").read_bytes()), proc.stderr
        finally:
            subprocess.run(["umount", str(where)], check=True)
        own_pool.wait_ready(1)  # perhaps one made while the tmpfs was there: it must not be the one served
        proc = own_pool.sandbox("run", "--", "cat", str(where / "f"))
        assert (proc.returncode, proc.stdout) == (0, b"under\n") == (0, (where / "f").read_bytes()), proc.stderr
    finally:
        (where / "f").unlink(missing_ok=True)
        where.rmdir()


def test_another_users_pool_is_never_used(nobody: Nobody) -> None:
    theirs = PoolForTests(VISIBLE_BASE / f"nobody-pool-{time.monotonic_ns()}", user=nobody)
    try:
        theirs.start()
        # root pointed at nobody's runtime dir: not a private dir of root's, so no pool is looked for there
        env = dict(os.environ, XDG_RUNTIME_DIR=str(theirs.runtime), SANDBOX_POOL="2")
        proc = run_tracked([*SANDBOX, "run", "--timings=json", "--", "true"], env=env)
        assert proc.returncode == 0, proc.stderr
        assert start_of(proc) == "warm"
        # and the pool answers nothing to a process of another user that reaches its socket
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(10)
            conn.connect(str(theirs.runtime / "sandbox" / "pool.sock"))
            try:
                conn.sendall(b'{"op": "status"}\n')
                answer = conn.recv(100)
            except (BrokenPipeError, ConnectionResetError):
                answer = b""  # closed before it read a byte
            assert answer == b""
        status = theirs.status()
        assert status is not None and status["served"] == 0 and status["launches"] == 0
    finally:
        problems = theirs.close()
    assert not problems, problems


def test_a_pool_without_runs_ends_by_itself(nobody: Nobody) -> None:
    pool = PoolForTests(VISIBLE_BASE / f"idle-pool-{time.monotonic_ns()}", user=nobody)
    try:
        proc = pool.sandbox("pool", "start", "--idle", "8")
        assert proc.returncode == 0, proc.stderr
        deadline = time.monotonic() + 60
        while pool.status() is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pool.status() is None
        deadline = time.monotonic() + 10
        while pool.processes() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        problems = pool.close()
    assert not problems, problems


def test_pool_verbs_say_what_they_did(own_pool: PoolForTests) -> None:
    again = own_pool.sandbox("pool", "start")
    assert again.returncode == 0 and again.stdout.decode().startswith("already running: pool"), again.stdout
    bad = own_pool.sandbox("pool", "start", "--net", "user")
    assert (bad.returncode, bad.stderr.decode()) == (125, "sandbox: a pool cannot serve --net: its runs restore a guest each\n")
    stopped = own_pool.sandbox("pool", "stop")
    assert stopped.returncode == 0 and stopped.stdout.decode() == f"pool {own_pool.pid} stopped\n"
    none = own_pool.sandbox("pool", "stop")
    assert none.returncode == 0 and none.stdout.decode() == "no pool runs\n"


def test_stop_lets_the_runs_it_serves_finish(own_pool: PoolForTests) -> None:
    own_pool.wait_ready()
    run = popen([*SANDBOX, "run", "--", "sh", "-c", "sleep 4; echo finished"], env=own_pool.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while (own_pool.status() or {}).get("serving", 0) == 0:
        assert time.monotonic() < deadline and run.poll() is None, "the run was not served by the pool"
        time.sleep(0.1)
    began = time.monotonic()
    stopped = own_pool.sandbox("pool", "stop")
    assert time.monotonic() - began < 4, "pool stop waited for the user's run"
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.decode() == f"pool {own_pool.pid} stopping: it takes no more runs, and ends when the 1 it serves end\n"
    out, err = run.communicate(timeout=120)
    assert (run.returncode, out) == (0, b"finished\n"), err
    deadline = time.monotonic() + 30
    while own_pool.processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert own_pool.processes() == []


@pytest.mark.parametrize("delay", [0.1, 0.2, 0.4])
def test_a_signal_in_the_first_milliseconds_ends_the_run_as_it_would_the_command(test_pool: PoolForTests, delay: float) -> None:
    # Ctrl-C while the client imported (or before the pool's launcher had handlers) gave a
    # KeyboardInterrupt traceback, and a pooled run then ended 125, not 130.  (Within Python's
    # own start-up, before any of sandbox runs, Python's default is all there is: not tested.)
    for signo in (signal.SIGINT, signal.SIGTERM):
        test_pool.wait_ready(1)
        proc = popen([*SANDBOX, "run", "--", "sleep", "30"], env=test_pool.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signo)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (128 + signo, -signo), (delay, signo, proc.returncode, err)
        assert b"Traceback" not in err and b"ended without its status" not in err, err


def test_a_working_directory_the_user_cannot_open_is_one_line(nobody_pool: PoolForTests, tmp_path: Path) -> None:
    closed = tmp_path / "roots-only"
    closed.mkdir(mode=0o700)
    nobody_pool.wait_ready(1)
    proc = nobody_pool.sandbox("run", "--", "pwd", cwd=closed)
    assert proc.returncode == 125, proc.stderr
    assert proc.stderr.decode().count("\n") == 1 and "working directory" in proc.stderr.decode(), proc.stderr


def test_a_pooled_run_says_what_a_restored_one_says_of_its_accelerator(test_pool: PoolForTests) -> None:
    from sandbox.image import host

    _accel, warning = host.choose_accel("auto")
    proc = pooled(test_pool, "true", opts=("-v",))
    assert proc.returncode == 0 and start_of(proc) == "pooled", proc.stderr
    said = [line for line in proc.stderr.decode().splitlines() if "KVM unavailable" in line]
    assert len(said) == (1 if warning else 0), proc.stderr
