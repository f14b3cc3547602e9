"""A `sandbox run` handed to the pool's ready launcher, or the whole launcher here (sandbox/cli/launch.py calls it).

A run's launcher spends most of its start-up importing itself.  When this
user's pool runs (sandbox/backends/pool/), it keeps a launcher ready that
has done so (sandbox/cli/worker.py).  This module, which imports almost
nothing, hands it what the run is: the command line, the environment,
the working directory, the stdio descriptors (SCM_RIGHTS), the umask,
ids, limits and nice value.  That launcher then runs the command line
exactly as `main` here would, on the user's terminal and files, and
sends back the exit status.  Meanwhile this process passes on the
signals it gets (its terminal's Ctrl-C, a `kill`), and when it dies, by
any signal, the launcher sees its connection close and ends the run.

When the pool's launcher cannot be this process (no pool, another
namespace or root, ids it cannot take, a request the pool does not
serve), nothing has happened yet and `main` runs here as ever.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import sys

from sandbox.backends.pool import paths, wire
from sandbox.cli import stdio
from sandbox.core.identity import identity
from sandbox.core.signals import FORWARDED, HELD, not_ignored
from sandbox.core import unixsock

# What the guest command is given from the launcher's limits (sandbox/run/runner.py's RLIMITS).
RLIMITS = (resource.RLIMIT_STACK, resource.RLIMIT_NOFILE, resource.RLIMIT_CORE)
HAND_OFF_TIMEOUT = 2.0  # s for the pool to answer (it answers at once; a stuck pool is no pool)
TAKE_TIMEOUT = 10.0  # s for its launcher to take the run or give it back
EXIT_LAUNCHER = 125  # sandbox/core/errors.py's, not imported for it


def _launch_message(argv: list[str], closed: int) -> dict[str, object]:
    umask = os.umask(0)
    os.umask(umask)
    return {
        "op": "launch", "argv": argv, "env": dict(os.environ), "umask": umask, "closed": closed,
        "rlimits": [[r, *resource.getrlimit(r)] for r in RLIMITS], "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "gid": os.getgid(), "egid": os.getegid(), "groups": os.getgroups(), **identity(),
    }  # fmt: skip


def _connect() -> socket.socket | None:
    """A connection the pool's launcher now holds the other end of; None when there is none to have."""
    path = paths.base()
    if path is None:
        return None
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError:
        return None
    conn.settimeout(HAND_OFF_TIMEOUT)
    try:
        unixsock.connect(conn, os.path.join(path, "pool.sock"))
        if wire.peer_uid(conn) != os.geteuid():
            raise OSError("the pool's socket is another user's")
        wire.send(conn, {"op": "launch", "install": paths.install_id()})
        answer, fds = wire.receive(conn)
        for fd in fds:
            os.close(fd)
        if answer.get("op") != "go":
            raise OSError(str(answer.get("why", "no launcher ready")))
    except (OSError, wire.WireError):
        conn.close()
        return None
    conn.settimeout(None)
    return conn


def _hand_off(conn: socket.socket, argv: list[str], closed: int, early: list[int]) -> int | None:
    """Hand the run to the pool's launcher; its exit status, or None when it gave the run back (run it here)."""
    try:
        fds = [os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
    except OSError:
        conn.close()
        return None  # a working directory we cannot open (not searchable, gone): the whole launcher says so, in one line
    fds += [fd for fd in (0, 1, 2) if not closed & (1 << fd)]
    try:
        wakeup_r, wakeup_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        os.close(fds[0])
        conn.close()
        return None  # out of descriptors: the same, here
    old = {s: signal.signal(s, lambda *_: None) for s in (*not_ignored(FORWARDED), signal.SIGWINCH)}
    old_wakeup = signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
    taken = False
    # Signals that came before the launcher took the run (launch.py noted the earliest): passed on then, or raised here if it gives it back.
    pending = bytearray(early)
    early.clear()
    try:
        try:
            wire.send(conn, _launch_message(argv, closed), fds, limit=wire.MAX_LAUNCH)
        finally:
            os.close(fds[0])
        while True:
            ready, _, _ = select.select([conn.fileno(), wakeup_r], [], [], None if taken else TAKE_TIMEOUT)
            if not ready:
                return None  # a launcher that does not answer has not run anything: run it here
            if wakeup_r in ready:
                # Each signal is one byte (its number), passed on as it came.
                pending += os.read(wakeup_r, 64)
                if taken:
                    conn.sendall(pending)
                    pending.clear()
            if conn.fileno() in ready:
                answer, extra = wire.receive(conn)
                for fd in extra:
                    os.close(fd)
                if answer.get("op") == "local":
                    return None
                if answer.get("op") == "taken":
                    taken = True
                    conn.sendall(pending)
                    pending.clear()
                    continue
                status = answer.get("status")
                if isinstance(status, int) and not isinstance(status, bool) and 0 <= status <= 255:
                    return status
                raise wire.WireError(f"the pool's launcher sent {answer!r}")
    except (OSError, wire.WireError) as exc:
        if not taken:
            return None  # it ended before it took the run: nothing ran
        print(f"sandbox: the pool's launcher for this run ended without its status ({exc}; see {paths.base()}/pool.log)", file=sys.stderr)
        return EXIT_LAUNCHER
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for s, handler in old.items():
            signal.signal(s, handler)
        os.close(wakeup_r)
        os.close(wakeup_w)
        conn.close()
        if not taken:
            for signo in pending:
                signal.raise_signal(signo)


# Options that keep a run from the pool's launcher (worker.py would give the run back): seen here, no launcher is spent on them.
NOT_POOLED = ("--no-pool", "--pool=0", "-d", "--detach")


def _for_pool(argv: list[str]) -> bool:
    if argv[:1] != ["run"] or os.environ.get("SANDBOX_POOL", "").strip() == "0":
        return False
    options = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    pool_zero = any(a == "--pool" and options[i + 1 : i + 2] == ["0"] for i, a in enumerate(options))
    return not pool_zero and not any(a in NOT_POOLED for a in options)


def _python_coerced_locale() -> None:
    """Take back the LC_CTYPE Python added: the command gets the environment the user gave.

    Python started under the C or POSIX locale sets LC_CTYPE=C.UTF-8 in its
    own environment (PEP 538); /proc/self/environ still holds what execve
    was given.
    """
    if "LC_CTYPE" not in os.environ:
        return
    try:
        with open("/proc/self/environ", "rb") as f:
            given = f.read().split(b"\0")
    except OSError:
        return
    if not any(entry.startswith(b"LC_CTYPE=") for entry in given):
        del os.environ["LC_CTYPE"]


def main(early: list[int]) -> int:
    """The `sandbox` command, once launch.py holds its signals: `early` are those that came meanwhile (and still come)."""
    _python_coerced_locale()
    closed = stdio.reserve()
    argv = sys.argv[1:]
    if _for_pool(argv):
        try:
            conn = _connect()
            if conn is not None:
                status = _hand_off(conn, argv, closed, early)
                if status is not None:
                    return status
        except KeyboardInterrupt:
            return 130
    from sandbox.cli.main import main as whole

    # A signal before the run began ends it as it would have ended the command: nothing ran.
    try:
        _release(early)
    except KeyboardInterrupt:
        return 130
    return whole(argv, closed_stdio=closed)


def _release(early: list[int]) -> None:
    """Signals back to their defaults, and those that came early delivered now (before anything ran)."""
    for signo in HELD:
        if signal.getsignal(signo) is not signal.SIG_IGN:
            signal.signal(signo, signal.default_int_handler if signo == signal.SIGINT else signal.SIG_DFL)
    for number in list(early):
        signal.raise_signal(number)
