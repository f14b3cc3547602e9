"""What `sandbox list`, `info`, `logs`, `wait`, `stop`, `kill`, `rm` and `run --detach` do with named sandboxes."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sandbox.core import progress
from sandbox.features import registry
from sandbox.core.errors import SandboxError, UsageError
from sandbox.core import unixsock

STOP_GRACE = 10.0


def detach(entry: registry.Entry, run: Callable[[], int], on_started: list[Callable[[], None]]) -> int:
    """Run `run` in a background supervisor with stdin /dev/null and output to the entry's log.

    The caller waits until the guest's QEMU runs (the supervisor calls what
    it finds in `on_started`), prints the name and returns 0; if the
    supervisor ends before that, its log and status are the caller's.
    """
    log_path = entry.path / registry.LOG
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        started = os.read(ready_r, 1)
        os.close(ready_r)
        if started:
            print(entry.name)
            return 0
        _, wait_status = os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            sys.stderr.write(log_path.read_text(errors="replace"))
        return os.waitstatus_to_exitcode(wait_status)
    status = 125
    try:
        os.close(ready_r)
        os.setsid()  # no terminal: the user's Ctrl-C and hang-up are not ours
        # The progress line of a first run's builds stays on the user's
        # terminal until the caller prints the name, not in the log.
        progress.use(os.fdopen(os.dup(2), "w") if os.isatty(2) else None)
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        # The lock came with fork (one open file, ours alone once the caller exits).
        entry.update(launcher_pid=os.getpid())

        def tell() -> None:
            progress.clear()
            progress.use(None)
            os.write(ready_w, b"1")
            os.close(ready_w)

        on_started.append(tell)
        status = run()
    finally:
        status = entry.finish(status)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status if 0 <= status <= 255 else 125)


def _process_figures(pid: int | None) -> dict[str, Any]:
    import psutil

    if pid is None:
        return {}
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            cpu = p.cpu_times()
            mem = p.memory_full_info()
            return {"cpu_s": round(cpu.user + cpu.system, 2), "rss_mib": round(mem.rss / 2**20, 1), "pss_mib": round(mem.pss / 2**20, 1)}
    except (psutil.Error, OSError):
        return {}


def describe(entry: registry.Entry) -> dict[str, Any]:
    """Everything `info` shows, as data."""
    r = entry.record()
    state = entry.state()
    out: dict[str, Any] = {
        "name": r.name,
        "uuid": r.uuid,
        "state": state,
        "command": list(r.argv),
        "user": r.user,
        "launcher_pid": r.launcher_pid,
        "qemu_pid": r.qemu_pid,
        "vcpus": r.cpus,
        "memory_mib": r.memory_mb,
        "accel": r.accel,
        "kernel": r.kernel,
        "start": r.start,
        "label": r.label or "unlabelled",
        "shares": list(r.shares),
        "network": r.network,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created)),
        "uptime_s": round(time.time() - r.created, 1),
        "detached": r.detached,
        "attached": r.attached,
        "tainted": list(r.taint),
    }
    if r.attached:
        out.update(machine=r.machine, disks=list(r.disks), monitor=r.monitor)
    elif r.machine:
        out["machine"] = r.machine
    if state == "running":
        out.update(_process_figures(r.qemu_pid))
    else:
        out["exit_status"] = entry.status()
    return out


def rows(include_exited: bool) -> list[dict[str, Any]]:
    return [d for e in registry.entries() if e.listed() and ((d := describe(e))["state"] == "running" or include_exited)]


def names(include_exited: bool) -> list[str]:
    """What `sandbox list -q` prints: the names alone, without reading each QEMU's figures."""
    return [e.name for e in registry.entries() if e.running() or (include_exited and e.listed())]


def printable(text: str) -> str:
    """`text` with each character a terminal would act on (newline, escape, ...) shown as '?', as ps does."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_rows(data: list[dict[str, Any]]) -> str:
    """A table like `virsh list` / `docker ps`."""
    head = ("NAME", "STATE", "COMMAND", "UPTIME", "CPU", "MEMORY", "LABEL", "TAINTED")
    lines = [head]
    for d in data:
        state = d["state"] if d["state"] == "running" else f"exited ({d.get('exit_status')})"
        command = printable(" ".join(d["command"]))
        lines.append((
            d["name"], state, command if len(command) <= 30 else command[:29] + "…",
            _uptime(d["uptime_s"]) if d["state"] == "running" else "-",
            f"{d['cpu_s']:.1f}s" if "cpu_s" in d else "-",
            f"{d['pss_mib']:.0f}M" if "pss_mib" in d else "-",
            d["label"], "yes: " + ", ".join(d["tainted"]) if d["tainted"] else "no",
        ))  # fmt: skip
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in lines)


def format_info(d: dict[str, Any]) -> str:
    """`virsh dominfo`-style lines."""
    order = [("Name", "name"), ("UUID", "uuid"), ("State", "state"), ("Command", "command"), ("User", "user"),
             ("Launcher PID", "launcher_pid"), ("QEMU PID", "qemu_pid"), ("vCPUs", "vcpus"), ("Memory", "memory_mib"),
             ("QEMU RSS", "rss_mib"), ("QEMU PSS", "pss_mib"), ("CPU time", "cpu_s"), ("Accelerator", "accel"),
             ("Start", "start"), ("Machine", "machine"), ("Kernel", "kernel"), ("Disks", "disks"), ("Monitor", "monitor"), ("Security label", "label"), ("Shares", "shares"),
             ("Network", "network"), ("Started", "started"), ("Exit status", "exit_status"), ("Tainted", "tainted")]  # fmt: skip
    units = {"memory_mib": " MiB", "rss_mib": " MiB", "pss_mib": " MiB", "cpu_s": " s"}
    lines = []
    for label, key in order:
        if key not in d:
            continue
        value = d[key]
        if isinstance(value, list):
            value = ", ".join(value) if key != "command" else printable(" ".join(value))
            value = value or ("no" if key == "tainted" else "-")
        if value == "" or value is None:
            value = "-"
        lines.append(f"{label + ':':<16}{value}{units.get(key, '')}")
    return "\n".join(lines)


def _signal_launcher(entry: registry.Entry, signo: int) -> None:
    r = entry.record()
    if entry.state() != "running":
        raise UsageError(f"sandbox {entry.name!r} is not running")
    try:
        os.kill(r.launcher_pid, signo)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def open_monitor(path: str) -> Iterator[Any]:
    """A QMP session on a sandbox's monitor socket."""
    import socket

    from sandbox.backends.direct.monitor import Monitor

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            unixsock.connect(sock, path)
        except OSError as exc:
            raise UsageError(f"the sandbox's monitor does not answer ({exc.strerror})") from None
        monitor = Monitor(sock)
        try:
            yield monitor
        finally:
            monitor.close()
    finally:
        sock.close()


def monitor_path(entry: registry.Entry) -> str:
    """Where a sandbox's QMP socket is (an attached QEMU's own)."""
    r = entry.record()
    return r.monitor if r.attached else str(entry.path / registry.MONITOR)


@dataclass(frozen=True)
class Stopped:
    """How `sandbox stop` ended a sandbox."""

    status: int | None  # its exit status (None for an attached QEMU: it has none of ours)
    note: str | None = None  # what had to be done when the grace ran out


def stop(entry: registry.Entry, grace: float = STOP_GRACE) -> Stopped:
    """Signal the command (SIGTERM, forwarded by the launcher); after `grace` seconds power the VM off.

    As `docker stop` (SIGKILL after its -t), a command that is still
    running then ends with status 137, whatever SIGTERM would have made it
    (a `sandbox kill`'s status), and the note says so.  An attached QEMU
    gets an ACPI power-button press, then `quit`.
    """
    from sandbox.confinement import audit

    audit.record("stop-request", name=entry.name, uuid=entry.record().uuid, grace_s=grace)
    if entry.record().attached:
        if entry.state() != "running":
            raise UsageError(f"sandbox {entry.name!r} is not running")
        with open_monitor(monitor_path(entry)) as qmp:
            qmp.execute("system_powerdown", 5.0)
        if entry.wait(grace) is None and entry.running():
            with contextlib.suppress(Exception), open_monitor(monitor_path(entry)) as qmp:
                qmp.execute("quit", 5.0)
            entry.wait(30)
            return Stopped(None, f"quit QEMU after {grace:g} s (the guest did not power off on the power button)")
        return Stopped(None)
    if entry.state() != "running":
        raise UsageError(f"sandbox {entry.name!r} is not running")
    (entry.path / registry.STOP_GRACE).write_text(f"{grace}\n")  # the launcher waits that long too
    _signal_launcher(entry, signal.SIGTERM)
    status = entry.wait(grace)
    if status is None and entry.running():
        (entry.path / registry.KILLED).touch()
        _signal_launcher(entry, signal.SIGTERM)  # a second signal: the launcher kills the VM
        status = entry.wait(30)
        return Stopped(status, f"powered off after {grace:g} s (the command did not exit on SIGTERM)")
    return Stopped(status)


def wait(entry: registry.Entry) -> int | None:
    """Block until the sandbox has ended; its status (an entry not kept may then go: it has been collected)."""
    status = entry.wait()
    entry.collect()
    return status


def kill(entry: registry.Entry) -> int | None:
    """End QEMU at once."""
    from sandbox.confinement import audit

    r = entry.record()
    if entry.state() != "running":
        raise UsageError(f"sandbox {entry.name!r} is not running")
    audit.record("kill", name=entry.name, uuid=r.uuid, qemu_pid=r.qemu_pid)
    if not r.attached:
        (entry.path / registry.KILLED).touch()
    target = r.qemu_pid or r.launcher_pid
    try:
        os.kill(target, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return entry.wait(30)


def logs(entry: registry.Entry, follow: bool, out: Any = None) -> None:
    out = out or sys.stdout.buffer
    path = entry.path / registry.LOG
    if entry.record().attached:
        raise UsageError(f"sandbox {entry.name!r} is an attached QEMU: it has no log of ours (its output went where its launcher sent it)")
    if not path.exists():
        raise UsageError(f"sandbox {entry.name!r} has no log (only detached sandboxes keep one)")
    with path.open("rb") as f:
        while True:
            chunk = f.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not follow or not entry.running():
                if follow:  # whatever came between the last read and the end
                    rest = f.read()
                    out.write(rest)
                    out.flush()
                return
            time.sleep(0.1)


def remove(entry: registry.Entry, force: bool) -> None:
    if entry.state() == "running":
        if not force:
            raise UsageError(f"sandbox {entry.name!r} is running (sandbox stop it, or rm -f)")
        kill(entry)
    entry.remove()


EXEC_CONNECT_WAIT = 30.0  # s: a cold boot after a failed restore, under TCG


def exec_command(name: str, argv: list[str], env: dict[str, str], cwd: str | None, tty: bool = False, closed: int = 0) -> int:
    """Run `argv` in a running sandbox beside its command, with our stdin, stdout and stderr; its exit status.

    `closed` (bit 1 << fd): our fds that were closed, so are the process's.
    """
    import json
    import socket

    from sandbox.core.signals import FORWARDED

    entry = registry.find(name)
    r = entry.record()
    if r.attached:
        raise UsageError(f"sandbox {name!r} was attached, not started here: exec needs the sandbox's own guest init")
    if entry.state() != "running":
        raise UsageError(f"sandbox {name!r} is not running")
    if not argv:
        raise UsageError("no command given (usage: sandbox exec NAME -- CMD [ARGS...])")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A sandbox whose warm start failed boots again cold, with a new exec
    # socket: a request made meanwhile waits for it (as long as it runs).
    deadline = time.monotonic() + EXEC_CONNECT_WAIT
    while True:
        try:
            unixsock.connect(sock, entry.path / registry.EXEC)
            break
        except OSError as exc:
            absent = isinstance(exc, (FileNotFoundError, ConnectionRefusedError))
            if absent and time.monotonic() < deadline and entry.state() == "running":
                time.sleep(0.1)
                continue
            sock.close()
            raise UsageError(f"sandbox {name!r} does not take exec requests ({exc.strerror})") from None
    size = None
    if tty:
        try:
            term = os.get_terminal_size(0)
            size = (term.lines, term.columns)
        except OSError:
            size = (0, 0)
    request = json.dumps({"argv": argv, "env": env, "cwd": cwd, "tty": size, "closed": closed}).encode() + b"\n"

    held: list[int] | None = []  # signals that came before the request went (None: it went)

    def forward(signo: int, _frame: object) -> None:
        if held is not None:
            held.append(signo)
            return
        try:
            sock.sendall(b"K %d\n" % signo)
        except OSError:
            pass

    # Before the request: the process may run (and print) at once, and a
    # signal that comes then is for it too.
    old = {s: signal.signal(s, forward) for s in FORWARDED}
    socket.send_fds(sock, [request], [0, 1, 2])
    early = held or []
    held = None
    for signo in early:
        forward(signo, None)
    saved = None
    if tty and os.isatty(0):
        import termios
        import tty as ttymod

        saved = termios.tcgetattr(0)
        ttymod.setraw(0)  # keys go to the guest's terminal as typed

    try:
        reply = b""
        while not reply.endswith(b"\n"):
            try:
                chunk = sock.recv(64)
            except InterruptedError:
                continue
            if not chunk:
                raise SandboxError(f"sandbox {name!r} ended before the process did")
            reply += chunk
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        for s, handler in old.items():
            signal.signal(s, handler)
        sock.close()
    status = int(reply.split()[1])
    return status if 0 <= status <= 255 else 125
