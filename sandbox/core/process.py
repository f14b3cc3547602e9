"""Child processes of the launcher: spawned with nothing leaked, gone with it, stopped politely then by force."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sandbox.core.signals import TERMINATING

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_THP_DISABLE = 41
_libc = ctypes.CDLL(None, use_errno=True)


def start_ticks(pid: int) -> int | None:
    """A live process's start time, in clock ticks since boot (its identity with its pid); None if gone or a zombie.

    Read by hand: this is on every run's critical path, and importing
    psutil (the card's library for process facts, used elsewhere) costs
    ~27 ms here.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def started_at(pid: int) -> float | None:
    """When a live process started, on the CLOCK_BOOTTIME scale (seconds)."""
    ticks = start_ticks(pid)
    return None if ticks is None else ticks / os.sysconf("SC_CLK_TCK")


def status_fields(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict ({} if the process is gone): what psutil does not tell (VmHWM, Seccomp)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def peak_rss_kb(pid: int) -> int | None:
    """A process's peak resident set (VmHWM), read while it runs."""
    value = status_fields(pid).get("VmHWM", "").split()
    return int(value[0]) if value and value[0].isdigit() else None


def pss_kb(pid: int) -> int | None:
    """A process's proportional set size (shared pages divided among their users), from /proc/PID/smaps_rollup.

    By hand: psutil's memory_full_info reads the whole smaps, which for a
    QEMU costs tens of ms of the CPU a pool's guests are made with.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to kill this process when its parent dies."""
    if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def set_name(name: str) -> None:
    """This process's name as ps and top show it."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def disable_transparent_hugepages() -> None:
    _libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)


def ignore(signals: tuple[int, ...] | tuple[signal.Signals, ...]) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def terminating_signals_deferred() -> Iterator[None]:
    """Hold TERMINATING signals for the block; one that arrived meanwhile is delivered at its end."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def spawn(
    argv: list[str],
    log_path: Path,
    pass_fds: tuple[int, ...] = (),
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a helper: its own session, stdin /dev/null, output to `log_path`, only `pass_fds` inherited.

    It dies with the launcher (parent-death signal), and the launcher's
    terminating signals, held while it spawns, are not held in it.
    """

    def child() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINATING)
        set_parent_death_signal()
        if preexec is not None:
            preexec()

    with log_path.open("wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=pass_fds,
            close_fds=True,
            cwd=cwd,
            env=env,
            # Its own session: a Ctrl-C at the terminal is for the launcher
            # to forward to the guest, not for its helpers.
            start_new_session=True,
            preexec_fn=child,
        )


def wait(proc: subprocess.Popen[bytes], timeout: float | None) -> int | None:
    """The exit status, or None if it still runs after `timeout` seconds."""
    if timeout is not None and proc.returncode is None:
        # Popen.wait with a timeout polls with growing sleeps (up to 50 ms
        # late); a pidfd wakes us the moment the process exits.
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:
            pass  # reaped already, or an old kernel: Popen's own wait
        else:
            try:
                if not select.select([fd], [], [], max(timeout, 0))[0]:
                    return None
            finally:
                os.close(fd)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def stop_pid(pid: int, timeout: float = 2.0) -> None:
    """End a process that is not our child (a daemon): SIGTERM, up to `timeout` s to go (a zombie has), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while start_ticks(pid) is not None:
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.005)


def stop(
    proc: subprocess.Popen[bytes],
    polite: Callable[[], None] | None = None,
    timeout: float = 1.0,
    inner_pid: int | None = None,
) -> int:
    """End `proc`: `polite` (default SIGTERM) and up to `timeout` s, then SIGKILL.

    `inner_pid` is the real program when `proc` is a reaper above it (a PID
    namespace's init): it is killed first, so that the reaper collects it
    and exits, instead of leaving it to the kernel's own reaping.
    """
    if proc.poll() is not None:
        return proc.returncode
    if timeout > 0:
        try:
            if polite is not None:
                polite()
            else:
                proc.send_signal(signal.SIGTERM)
                if inner_pid is not None:
                    os.kill(inner_pid, signal.SIGTERM)
        except OSError:  # gone already
            pass
        status = wait(proc, timeout)
        if status is not None:
            return status
    if inner_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(inner_pid, signal.SIGKILL)
        status = wait(proc, 5.0)
        if status is not None:
            return status
    proc.kill()
    return proc.wait()
