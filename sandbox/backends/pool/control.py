"""Starting, asking and stopping this user's pool (`sandbox pool start|status|stop`, and a run's auto-start).

The pool is `python -m sandbox pool serve`, started in a session of its
own so that it outlives the run or the shell that started it; it writes
its log to `pool.log` beside its socket.  What its guests are made for
(the machine and the walls) travels as the JSON of key.describe().
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sandbox
from sandbox.core import runtime
from sandbox.core.errors import SandboxError, UsageError
from sandbox.plan.request import RunRequest
from sandbox.backends.pool import key as keys
from sandbox.backends.pool import wire
from sandbox.backends.pool.paths import log_path, socket_path, usable
from sandbox.core import unixsock

START_WAIT = 300.0  # s for a started pool to listen (a first one builds the warm-start template: a boot under TCG)
STOP_WAIT = 60.0  # s for a stopping pool to end (it lets runs it serves finish first)


class PoolError(SandboxError):
    """The pool could not be started, asked or stopped."""


def ask(message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any] | None:
    """The pool's answer to `message`; None when no pool of this user's runs."""
    if not usable():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn.settimeout(timeout)
    try:
        unixsock.connect(conn, socket_path())
        if wire.peer_uid(conn) != os.geteuid():
            raise PoolError(f"{socket_path()} is another user's")
        wire.send(conn, message)
        answer, fds = wire.receive(conn)
        for fd in fds:
            os.close(fd)
        return answer
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except TimeoutError:
        raise PoolError(f"the pool did not answer in {timeout:g} s (see {log_path()})") from None
    finally:
        conn.close()


def images(trees: list[str], images_dir: str, timeout: float = 0.5) -> tuple[dict[str, str], list[str]]:
    """The pool's word on `trees` (its watcher, image/treewatch.py): ({tree: current image}, trees it decided); ({}, []) without a pool."""
    try:
        answer = ask({"op": "images", "trees": trees, "images_dir": images_dir}, timeout)
    except (OSError, SandboxError):
        return {}, []
    if not answer or not isinstance(answer.get("images"), dict) or not isinstance(answer.get("decided"), list):
        return {}, []
    found = {t: p for t, p in answer["images"].items() if t in trees and isinstance(p, str)}
    return found, [t for t in answer["decided"] if t in trees]


def pool_request(request: RunRequest) -> RunRequest:
    """What a pool for `request`'s machine and walls makes its guests from (refused: what no pool serves)."""
    why = keys.unpoolable(request)
    if why is not None:
        raise UsageError(f"a pool cannot serve {why}: its runs restore a guest each")
    return keys.request_from(keys.describe(request))


def spawn(request: RunRequest, size: int, idle: float) -> subprocess.Popen[bytes]:
    """`sandbox pool serve` for `request`'s machine and walls, in a session of its own; not waited for."""
    if size < 1:
        raise PoolError("a pool needs at least one guest (--size 1 or more)")
    argv = [sys.executable, "-m", "sandbox", "pool", "serve", "--size", str(size), "--idle", f"{idle:g}",
            "--request", keys.describe(request)]  # fmt: skip
    env = dict(os.environ)
    # It runs in / (it must not keep the caller's directory busy): the package must be found from there too.
    package_root = str(Path(sandbox.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    with open(log_path(), "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True, cwd="/", env=env,
                                start_new_session=True)  # fmt: skip


def start_in_background(request: RunRequest, size: int, idle: float) -> None:
    """Start a pool for the runs after this one (a run that found none); any failure is the pool log's."""
    if not usable():
        return
    with contextlib.suppress(OSError, SandboxError):
        spawn(request, size, idle)


def start(request: RunRequest, size: int, idle: float) -> dict[str, Any]:
    """Start the pool and wait until it listens; its status (an already running one's, with "already": true)."""
    if not usable():
        raise PoolError(f"no private runtime directory to keep a pool in ({runtime.runtime_base()})")
    found = ask({"op": "status"})
    if found is not None:
        return {**found, "already": True}
    proc = spawn(request, size, idle)
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            found = ask({"op": "status"})  # lost a race to another start: that pool is this user's pool
            if found is not None:
                return {**found, "already": True}
            raise PoolError(f"the pool exited at once (status {proc.returncode}; see {log_path()})")
        found = ask({"op": "status"})
        if found is not None:
            return found
        time.sleep(0.05)
    raise PoolError(f"the pool did not listen in {START_WAIT:g} s (see {log_path()})")


def stop() -> tuple[int, int] | None:
    """Stop the pool: it takes no more runs and ends its ready guests.

    Its pid and how many runs it still serves (it ends when they do: a
    user's running command is never killed by this), or None when no
    pool ran.  With none, it waits for the pool to end.
    """
    found = ask({"op": "status"})
    if found is None:
        return None
    pid = int(found["pid"])
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return pid, 0
    try:
        answer = ask({"op": "stop"})
        serving = int(answer.get("serving", 0)) if answer is not None else 0
        if serving:
            return pid, serving
        import select

        if not select.select([pidfd], [], [], STOP_WAIT)[0]:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            if not select.select([pidfd], [], [], 10)[0]:
                raise PoolError(f"the pool (pid {pid}) did not stop")
    finally:
        os.close(pidfd)
    return pid, 0


def format_status(status: dict[str, Any] | None) -> str:
    """`sandbox pool status` for people."""
    if status is None:
        return "no pool runs (the next `sandbox run` starts one, unless pool = 0)"
    lines = [
        f"pool {status['pid']}: {len(status['ready'])} of {status['size']} guests ready, {status['serving']} serving a run"
        + (" (stopping)" if status.get("stopping") else ""),
        f"  served {status['served']}, refills {status['refills']}, misses {status['misses']}, failures {status['failures']},"
        f" ended stale {status['stale']}; launcher ready: {'yes' if status['launchers_ready'] else 'no'}, launches {status['launches']}",
        f"  up {status['uptime_s']:.0f} s, ends after {status['idle_s']:g} s without a run; pool process {status['pool_pss_mib']} MiB PSS",
        f"  guests made for: {status.get('memory_mb')} MiB, {status.get('accel')}, {status.get('kernel')} (key {status.get('key')});"
        " runs that ask for other machine or wall settings restore",
    ]
    for g in status["ready"]:
        lines.append(f"  guest: QEMU {g['qemu_pid']}, {g['pss_mib']} MiB PSS, waiting {g['waiting_s']:.0f} s")
    if status.get("last_error"):
        lines.append(f"  last failure: {status['last_error']}")
    return "\n".join(lines)
