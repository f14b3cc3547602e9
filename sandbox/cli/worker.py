"""A launcher the pool keeps ready: imported already, it runs one `sandbox run` for the process the user started.

The pool starts it (`python -m sandbox.cli.worker FD`), it imports what a run needs
and says so, then waits.  Handed a run (sandbox/cli/launch.py's message
and descriptors), it becomes that process for the run's length: its
stdio, working directory, environment, umask, limits, groups and nice
value.  What it cannot become (another mount or user namespace or root,
ids or limits it may not take), or a run the pool is not for (`--no-pool`,
`pool = 0`, `--detach`), it gives back untouched ("local") and the
user's process runs it itself.  A run whose request no pooled guest fits
(`--net`, another `--memory`...) it runs all the same, restoring a guest
for it as the user's process would.  Otherwise it
runs `main` as that process would, sends the exit status, and exits: one
run each.

The user's process passes on its signals, one byte each; they are raised
here, where the run's relay takes them as its own.  When that process
dies, the connection closes and this launcher is killed, exactly as that
process would have been.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import resource
import signal
import socket
import sys
import threading
from typing import Any

from sandbox.backends.pool import wire
from sandbox.core.identity import identity
from sandbox.core.signals import RELAYING

log = logging.getLogger(__name__)

# What a run imports on its way, loaded before it is asked for.
PRELOAD = (
    "sandbox.cli.main", "sandbox.cli.requests", "sandbox.cli.config", "sandbox.features.registry", "sandbox.run.runner",
    "sandbox.run.relay", "sandbox.run.diagnostics", "sandbox.backends.pool.client", "sandbox.features.execs", "sandbox.plan.mounts",
    "sandbox.backends.direct.backend", "sandbox.confinement.walls", "sandbox.plan.timings", "tomllib",
)  # fmt: skip


def _adopt(message: dict[str, Any], fds: list[int]) -> str | None:
    """Become the user's process (see the module's docstring); why not, if it cannot be done exactly."""
    ours = identity()
    if message.get("ns") != ours["ns"] or message.get("root") != ours["root"]:
        return "another namespace or root"
    closed = int(message["closed"])
    stdio = [fd for fd in (0, 1, 2) if not closed & (1 << fd)]
    if len(fds) != 1 + len(stdio):
        return "not the descriptors a run hands over"
    gid, egid, groups = int(message["gid"]), int(message["egid"]), sorted(int(g) for g in message["groups"])
    try:
        if sorted(os.getgroups()) != groups:
            os.setgroups(groups)
        if (os.getgid(), os.getegid()) != (gid, egid):
            os.setresgid(gid, egid, egid)
        for r, soft, hard in message["rlimits"]:
            resource.setrlimit(int(r), (int(soft), int(hard)))
        nice = int(message["nice"])
        if os.getpriority(os.PRIO_PROCESS, 0) != nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (OSError, ValueError) as exc:
        return f"ids, limits or priority it may not take ({exc})"
    env = message["env"]
    if not isinstance(env, dict):
        return "no environment"
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    os.umask(int(message["umask"]))
    os.fchdir(fds[0])
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(fds[1 + stdio.index(fd)] if fd in stdio else null, fd)
    os.close(null)
    for fd in fds:
        os.close(fd)
    return None


def _refusal(argv: list[str]) -> str | None:
    """Why the pool's launcher does not take this run (None: it does); a command line in error is taken, for main to say so."""
    from sandbox.cli import config, main, requests
    from sandbox.core.errors import SandboxError

    if "-h" in argv or "--help" in argv:
        return None  # main says what it is (the run's own argv, after --, is never read: see below)
    try:
        args = main.build_parser("run", config.defaults()).parse_args(argv)
        if args.detach:
            return "--detach (its launcher outlives the user's process)"
        request = requests.from_namespace(args, ("true",), None, 0)
    except (SandboxError, SystemExit):
        return None
    if request.pool == 0:
        return "no pool for this run (--no-pool or pool = 0)"
    # Anything else is this launcher's to run, as the user's own process
    # would: a pooled guest when the request fits the pool (key.py), else
    # one restored for it.
    return None


def _deliver(signo: int, done: threading.Event) -> None:
    """Raise a signal the user's process passed on, once the run's relay passes it on to the command.

    Before that, Python's defaults would turn a Ctrl-C into a
    KeyboardInterrupt traceback in this launcher, or a SIGTERM into its
    death without a status; so it is held (a run's relay starts within
    moments), as the user's process held it while it started.
    """
    while not RELAYING.wait(0.05):
        if done.is_set():
            return  # the run ended before its command started: the signal has nothing left to end
    with contextlib.suppress(ValueError, OSError):
        signal.raise_signal(signal.Signals(signo))


def _watch(conn: socket.socket, done: threading.Event) -> None:
    """The user's process: its signals raised here; its end (however it died) ends this launcher."""
    while True:
        try:
            data = conn.recv(64)
        except OSError:
            data = b""
        if not data:
            if not done.is_set():
                os.kill(os.getpid(), signal.SIGKILL)
            return
        for signo in data:
            _deliver(signo, done)


def serve(fd: int) -> int:
    """Wait on `fd` (from the pool) for one run, and run it."""
    for name in PRELOAD:
        importlib.import_module(name)
    pool = socket.socket(fileno=fd)
    wire.send(pool, {"op": "ready", "pid": os.getpid()})
    try:
        message, fds = wire.receive(pool)
    except (OSError, wire.WireError):
        return 0  # the pool ended
    pool.close()
    if len(fds) != 1:
        return 0
    conn = socket.socket(fileno=fds[0])
    conn.setblocking(True)  # the pool's timeout left the shared file non-blocking
    try:
        request, fds = wire.receive(conn, limit=wire.MAX_LAUNCH)
    except (OSError, wire.WireError) as exc:
        log.warning("pool launcher: no run came (%s)", exc)
        return 0
    client_pid = wire.peer_pid(conn)
    argv = request.get("argv")
    if not isinstance(argv, list) or argv[:1] != ["run"] or not all(isinstance(a, str) for a in argv):
        why: str | None = "not a run"
    else:
        why = _adopt(request, fds)
        if why is None:
            why = _refusal(argv)
    if why is not None:
        for extra in fds:
            with contextlib.suppress(OSError):
                os.close(extra)
        wire.send(conn, {"op": "local", "why": why})
        return 0
    from sandbox.cli.main import main

    try:
        wire.send(conn, {"op": "taken"})  # from here on the run is ours, whatever happens
    except OSError:
        return 0  # the user's process gave up waiting and runs it itself
    done = threading.Event()
    threading.Thread(target=_watch, args=(conn, done), name="sandbox-client", daemon=True).start()
    status = main(argv, closed_stdio=int(request["closed"]), launcher_pid=client_pid)
    done.set()
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    with contextlib.suppress(OSError):
        wire.send(conn, {"op": "status", "status": status})
    return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1])))
