"""The `sandbox` command line: parses, calls, and maps errors to exit statuses."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from sandbox import __version__
from sandbox.cli import options
from sandbox.core import process, progress
from sandbox.core.errors import EXIT_LAUNCHER, Interrupted, MachineError, SandboxError, UsageError

log = logging.getLogger("sandbox")

# Outside the relay loop, these unwind the launcher (cleanup runs) instead of ending it on the spot.
UNWINDING = (signal.SIGTERM, signal.SIGHUP)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, and the launcher-failure status rather than argparse's 2,
        # which a command's own status could be.
        raise UsageError(f"{message} (see {self.prog} --help)")


def _add_vm_options(p: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    options.add(p, options.VM, defaults)
    p.add_argument("-v", "--verbose", action="count", default=0, help="show QEMU's argv and the console (-vv: full boot log)")


def _add_confinement_options(p: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    g = p.add_argument_group("confinement")
    options.add(g, options.CONFINEMENT, defaults)
    g.add_argument("--no-confine", action="store_true", help="no namespaces, seccomp, uid change or cgroup")


def _verb_parsers(defaults: Mapping[str, Any]) -> dict[str, Callable[[Any], None]]:
    """Each verb's sub-parser, added by its own function (a run builds only its own: argparse costs ~1 ms a verb).

    `defaults` (key -> value) replace the options' own defaults: the config file's and the environment's.
    """

    def _add_run(sub: Any) -> None:
        run = sub.add_parser("run", help="run one command in a fresh VM")
        _add_vm_options(run, defaults)
        options.add(run, options.RUN, defaults)
        pool = run.add_argument_group("pool (see sandbox pool)")
        options.add(pool, options.POOL, defaults)
        pool.add_argument("--no-pool", dest="pool", action="store_const", const=0, help="restore a guest for this run (as --pool 0)")
        tty = run.add_mutually_exclusive_group()
        tty.add_argument("-t", "--tty", dest="tty", action="store_const", const=True, default=None,
                         help="give the command a terminal (default: when stdin is one)")
        tty.add_argument("-T", "--no-tty", dest="tty", action="store_const", const=False, help="no terminal, even when stdin is one")
        fs = run.add_argument_group("files (default: the host's files, copy-on-write under /home, $HOME, /tmp and the cwd)")
        options.add(fs, options.FILES, defaults)
        run.add_argument("--timings", nargs="?", const="text", choices=("text", "json"), help="print the phase breakdown")
        life = run.add_argument_group("naming (see sandbox list)")
        life.add_argument("--name", metavar="NAME", help="name the sandbox (default: a generated one)")
        life.add_argument("-d", "--detach", action="store_true", help="run in the background: stdin /dev/null, output to `sandbox logs`")
        life.add_argument("--rm", action="store_true", help="forget a named or detached sandbox when it ends")
        _add_confinement_options(run, defaults)
        run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    def _add_bench(sub: Any) -> None:
        bench = sub.add_parser("bench", help="time many sandboxes, phase by phase")
        _add_vm_options(bench, defaults)
        bench.add_argument("--runs", type=int, default=10, metavar="N", help="timed runs (default 10)")
        bench.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs first (default 1)")
        bench.add_argument("--json", type=Path, metavar="FILE", help="save the results as JSON")
        bench.add_argument("--plot", type=Path, metavar="FILE.png", help="draw a stacked bar chart (needs matplotlib)")
        bench.add_argument("--no-confine", action="store_true", help="measure without the confinement walls")
        bench.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    def _add_prepare(sub: Any) -> None:
        prepare = sub.add_parser("prepare", help="build the warm-start template now (otherwise the first run does)")
        _add_vm_options(prepare, defaults)
        _add_confinement_options(prepare, defaults)

    def _add_list(sub: Any) -> None:
        ls = sub.add_parser("list", help="running sandboxes (--all: exited ones too)")
        ls.add_argument("-a", "--all", action="store_true", help="exited sandboxes too")
        ls.add_argument("--json", action="store_true", help="as JSON, with more fields")
        ls.add_argument("-q", "--quiet", action="store_true", help="only the names, one a line (quick: shell completion uses it)")

    def _add_info(sub: Any) -> None:
        info = sub.add_parser("info", help="one sandbox in detail")
        info.add_argument("name")
        info.add_argument("--json", action="store_true", help="as JSON")

    def _add_logs(sub: Any) -> None:
        logs = sub.add_parser("logs", help="a detached sandbox's output")
        logs.add_argument("name")
        logs.add_argument("-f", "--follow", action="store_true", help="keep printing while the sandbox runs")

    def _add_wait(sub: Any) -> None:
        wait = sub.add_parser("wait", help="wait for a sandbox to end; exit with its status")
        wait.add_argument("name")

    def _add_stop(sub: Any) -> None:
        stop = sub.add_parser("stop", help="signal the command (SIGTERM); power off after the grace period")
        stop.add_argument("name")
        stop.add_argument("-t", "--time", type=options.positive, default=10.0, metavar="S", help="grace period (default 10 s)")

    def _add_kill(sub: Any) -> None:
        kill = sub.add_parser("kill", help="end the sandbox's QEMU at once")
        kill.add_argument("name")

    def _add_send_key(sub: Any) -> None:
        key = sub.add_parser("send-key", help="press keys in a sandbox's keyboard (as virsh send-key)")
        key.add_argument("name")
        key.add_argument("--codeset", default="linux", metavar="SET",
                         help="as virsh: linux (default), xt, atset1, atset2, atset3, os_x, xt_kbd, win32, usb, qnum (or rfb)")  # fmt: skip
        key.add_argument("--holdtime", type=int, default=100, metavar="MS", help="release after MS (default 100)")
        key.add_argument("keys", nargs="+", metavar="KEY", help="codes (decimal or 0x) or names (linux, win32, os_x)")

    def _add_exec(sub: Any) -> None:
        ex = sub.add_parser("exec", help="run another command in a running sandbox (as its user, in its environment)")
        ex.add_argument("name")
        ex.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE", help="add to the environment")
        ex.add_argument("-w", "--workdir", metavar="DIR", help="default: the sandbox's working directory")
        ex.add_argument("-t", "--tty", action="store_true", help="give the process a terminal (stdin, stdout and stderr on it)")
        ex.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    def _add_attach(sub: Any) -> None:
        attach = sub.add_parser("attach", help="adopt a QEMU launched by hand (it needs a QMP monitor on a UNIX socket)")
        attach.add_argument("pid", type=int)
        attach.add_argument("--name", metavar="NAME", help="default: its -name, else qemu-PID")

    def _add_rm(sub: Any) -> None:
        rm = sub.add_parser("rm", help="forget an exited sandbox (-f: kill a running one first)")
        rm.add_argument("name", nargs="+")
        rm.add_argument("-f", "--force", action="store_true", help="kill a running sandbox first")

    def _add_net(sub: Any) -> None:
        net = sub.add_parser("net", help="virtual networks for --net nat=NAME (root)")
        nsub = net.add_subparsers(dest="net_verb", required=True, parser_class=_Parser)
        create = nsub.add_parser("create", help="define a NAT'd network (it comes up on first use)")
        create.add_argument("name")
        create.add_argument("--ipv4", metavar="CIDR", help="a private IPv4 network (default: a free 10.213.N.0/24)")
        create.add_argument("--ipv6", metavar="PREFIX/64", help="a /64, routed when global (default: a generated ULA /64)")
        create.add_argument("--nat66", action="store_true", help="NAT the IPv6 prefix too (for a ULA prefix that is not routed)")
        nls = nsub.add_parser("list", help="the networks")
        nls.add_argument("--json", action="store_true", help="as JSON")
        ninfo = nsub.add_parser("info", help="one network and its sandboxes")
        ninfo.add_argument("name")
        ninfo.add_argument("--json", action="store_true", help="as JSON")
        ndestroy = nsub.add_parser("destroy", help="take a network down and forget it (refused while in use)")
        ndestroy.add_argument("name")

    def _add_config(sub: Any) -> None:
        cfg = sub.add_parser("config", help="the defaults of run's options and where each comes from (config file, environment)")
        cfg.add_argument("--json", action="store_true", help="as JSON")

    def _add_pool(sub: Any) -> None:
        pool = sub.add_parser("pool", help="the guests kept ready for your runs: start, status, stop")
        psub = pool.add_subparsers(dest="pool_verb", required=True, parser_class=_Parser)
        for verb, text in (("start", "start your pool (the first run starts one too, unless pool = 0)"),
                           ("serve", "run the pool in the foreground, logging to stderr (what start starts)")):  # fmt: skip
            p = psub.add_parser(verb, help=text)
            p.add_argument("--size", type=options.pool_size, metavar="N", help="guests kept ready (default: the pool setting, else 2)")
            p.add_argument("--idle", type=options.positive, metavar="S", help="end after S seconds without a run (default: pool-idle, 600)")
            _add_vm_options(p, defaults)
            _add_confinement_options(p, defaults)
            if verb == "serve":
                p.add_argument("--request", help=argparse.SUPPRESS)  # a run's machine and walls (start and a run's auto-start give it)
        status = psub.add_parser("status", help="ready guests, their memory, runs served, refills and misses")
        status.add_argument("--json", action="store_true", help="as JSON")
        psub.add_parser("stop", help="end the pool and its ready guests (runs it serves finish first)")

    def _add_audit(sub: Any) -> None:
        audit = sub.add_parser("audit", help="show the last sandbox start/stop records")
        audit.add_argument("-n", type=int, default=20, help="how many entries")

    return {"run": _add_run, "bench": _add_bench, "prepare": _add_prepare, "list": _add_list, "info": _add_info, "logs": _add_logs, "wait": _add_wait, "stop": _add_stop, "kill": _add_kill, "send-key": _add_send_key, "exec": _add_exec, "attach": _add_attach, "rm": _add_rm, "net": _add_net, "config": _add_config, "pool": _add_pool, "audit": _add_audit}  # fmt: skip


# The verbs whose options take their defaults from the config file and the environment.
CONFIGURED = ("run", "bench", "prepare", "pool")


def build_parser(verb: str | None = None, defaults: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """The command line's parser; with `verb`, only that verb's sub-parser (unknown verbs get them all).

    `defaults` (key -> value): the options' defaults from the config file and the environment.
    """
    parser = _Parser(prog="sandbox", description="Run a command in a throw-away VM over the host's read-only root.")
    parser.add_argument("--version", action="version", version=f"sandbox {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    builders = _verb_parsers(defaults or {})
    for name, add in builders.items():
        if verb is None or verb not in builders or name == verb:
            add(sub)
    return parser


def _command(args: argparse.Namespace) -> tuple[str, ...]:
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return tuple(cmd)


class _LogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines on stderr, with the progress line out of their way."""

    def emit(self, record: logging.LogRecord) -> None:
        with progress.hidden():
            super().emit(record)


def _setup_logging(verbose: int) -> None:
    # -v's own lines say what is going on; otherwise a terminal gets the progress line of slow first-time work.
    progress.use(sys.stderr if not verbose and sys.stderr is not None and sys.stderr.isatty() else None)
    root = logging.getLogger("sandbox")
    for old in [h for h in root.handlers if isinstance(h, _LogHandler)]:
        root.removeHandler(old)  # set up again by the pool's launcher, for the run it takes (sandbox/cli/worker.py)
    handler = _LogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sandbox: %(message)s"))
    # In tty mode the terminal is raw while we run: lines need their \r.
    handler.terminator = "\r\n" if sys.stdin is not None and sys.stdin.isatty() else "\n"
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose > 2 else logging.INFO if verbose else logging.WARNING)


def _run(args: argparse.Namespace) -> int:
    from sandbox.features import registry
    from sandbox.cli import requests
    from sandbox.run import runner

    cmd = _command(args)
    if args.detach and (args.tty or args.x11):
        raise UsageError("--detach runs without a terminal or display (drop -t / --x11)")
    entry = registry.Entry.create(args.name, cmd, args.detach, keep=(args.detach or args.name is not None) and not args.rm)
    # Detached, the command's stdio is /dev/null and the log, whatever ours was.
    req = requests.from_namespace(args, cmd, None, 0 if args.detach else args.closed_stdio, entry.name)
    ready: list[Callable[[], None]] = []

    def started(st: Any) -> None:
        entry.update(qemu_pid=st.qemu_pid, accel=st.accel, kernel=st.kernel, memory_mb=st.memory_mb, cpus=st.cpus,
                     start=st.start, label=st.label, shares=st.shares, x11_display=st.x11_display, x11_auth=st.x11_auth,
                     network=st.network, machine=st.machine)  # fmt: skip
        while ready:
            ready.pop()()

    hooks = dataclasses.replace(entry.hooks(started), launcher_pid=args.launcher_pid)
    if req.machine.keyboard:
        entry.update(keyboard=True)
    if args.detach:
        from sandbox.features import lifecycle

        return lifecycle.detach(entry, lambda: _report_errors(lambda: _finish_run(args, runner.run(req, hooks)), args.verbose), ready)
    with entry:
        entry.ended(_finish_run(args, runner.run(req, hooks)))
    return entry.final_status  # 137 when `sandbox kill` or `stop` ended it


def _finish_run(args: argparse.Namespace, result: Any) -> int:
    from sandbox.plan import timings
    from sandbox.run import runner

    if args.timings and result is not None:
        phases = result.timeline.phases()
        if args.timings == "json":
            out = timings.to_json(phases, result.qemu_peak_rss_kb, result.timeline.start)
        else:
            out = timings.format_table(phases, result.timeline.start)
            if result.qemu_peak_rss_kb:
                out += f"\n  qemu peak RSS {result.qemu_peak_rss_kb / 1024:.0f} MiB"
        print(out, file=sys.stderr)
    return runner.exit_status(result)


def _list(args: argparse.Namespace) -> int:
    from sandbox.features import lifecycle

    if args.quiet:
        for name in lifecycle.names(args.all):
            print(name)
        return 0
    data = lifecycle.rows(args.all)
    print(json.dumps(data, indent=2) if args.json else lifecycle.format_rows(data))
    return 0


def _info(args: argparse.Namespace) -> int:
    from sandbox.features import lifecycle, registry

    data = lifecycle.describe(registry.find(args.name))
    print(json.dumps(data, indent=2) if args.json else lifecycle.format_info(data))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from sandbox.features import lifecycle, registry

    lifecycle.logs(registry.find(args.name), args.follow)
    return 0


def _wait(args: argparse.Namespace) -> int:
    from sandbox.features import lifecycle, registry

    status = lifecycle.wait(registry.find(args.name))
    if status is None:
        raise SandboxError(f"sandbox {args.name!r} ended without a status (its launcher was killed)")
    print(status)
    return status


def _stop(args: argparse.Namespace) -> int:
    from sandbox.features import lifecycle, registry

    stopped = lifecycle.stop(registry.find(args.name), args.time)
    if stopped.note is not None:
        print(f"sandbox: {args.name}: {stopped.note}", file=sys.stderr)
    print(stopped.status if stopped.status is not None else "stopped")
    return 0


def _kill(args: argparse.Namespace) -> int:
    from sandbox.features import lifecycle, registry

    lifecycle.kill(registry.find(args.name))
    return 0


def _send_key(args: argparse.Namespace) -> int:
    from sandbox.features import sendkey

    if args.holdtime < 0:
        raise UsageError(f"--holdtime {args.holdtime}: must not be negative")
    sendkey.send_key(args.name, args.codeset, args.holdtime, args.keys)
    return 0


def _exec(args: argparse.Namespace) -> int:
    from sandbox.features import lifecycle

    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"-e {item}: expected NAME=VALUE")
        env[key] = value
    return lifecycle.exec_command(args.name, list(_command(args)), env, args.workdir, args.tty, args.closed_stdio)


def _attach(args: argparse.Namespace) -> int:
    from sandbox.features import attach

    entry = attach.attach(args.pid, args.name)
    print(entry.name)
    return 0


def _rm(args: argparse.Namespace) -> int:
    from sandbox.features import lifecycle, registry

    for name in args.name:
        lifecycle.remove(registry.find(name), args.force)
    return 0


def _report_errors(body: Callable[[], int], verbose: int) -> int:
    """Run `body`; a SandboxError becomes its one line on stderr and its exit status."""
    try:
        return body()
    except SandboxError as exc:
        _print_error(exc, verbose)
        return exc.exit_status
    except Exception as exc:  # noqa: BLE001 - a bug of ours: still one line (and where, with -v)
        _print_internal_error(exc, verbose)
        return EXIT_LAUNCHER


def _print_internal_error(exc: BaseException, verbose: int) -> None:
    print(f"sandbox: internal error: {type(exc).__name__}: {exc} (a bug in sandbox; -v shows where)", file=sys.stderr)
    if verbose:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)


def _prepare(args: argparse.Namespace) -> int:
    from sandbox.cli import requests
    from sandbox.run import runner

    # The first run's boot runs `true`: it must not take the user's input.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    req = requests.from_namespace(args, ("true",), None, 0)
    print(runner.prepare(dataclasses.replace(req, command=dataclasses.replace(req.command, tty=False))))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from sandbox.cli import bench

    vm = options.values(args, options.VM)
    run_args = options.forward(options.VM, vm) + (["--no-confine"] if args.no_confine else [])
    return bench.main(run_args, _command(args) or ("true",), args.runs, args.warmup, args.json, args.plot, vm["accel"], vm["kernel"])


def _net(args: argparse.Namespace) -> int:
    from sandbox.net import networks

    if args.net_verb == "create":
        net = networks.create(args.name, args.ipv4, args.ipv6, args.nat66)
        print(f"network {net.name}: {net.ipv4} (NAT), {net.ipv6} ({'routed' if net.ipv6_routed else 'ULA'}) on bridge {net.bridge}")
    elif args.net_verb == "list":
        rows = [networks.describe(n) for n in networks.all_networks()]
        print(json.dumps(rows, indent=2) if args.json else networks.format_list(rows))
    elif args.net_verb == "info":
        found = networks.load(networks.check_name(args.name))
        if found is None:
            raise UsageError(f"no network {args.name}")
        d = networks.describe(found)
        print(json.dumps(d, indent=2) if args.json else networks.format_info(d))
    else:
        for what in networks.destroy(args.name):
            print(f"removed {what}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from sandbox.cli import config

    d = config.describe()
    print(json.dumps(d, indent=2) if args.json else config.format_table(d))
    return 0


def _pool(args: argparse.Namespace) -> int:
    from sandbox.backends.pool import control, paths

    if args.pool_verb == "status":
        found = control.ask({"op": "status"})
        print(json.dumps(found or {"ok": False}, indent=2) if args.json else control.format_status(found))
        return 0
    if args.pool_verb == "stop":
        stopped = control.stop()
        if stopped is None:
            print("no pool runs")
        elif stopped[1]:
            print(f"pool {stopped[0]} stopping: it takes no more runs, and ends when the {stopped[1]} it serves end")
        else:
            print(f"pool {stopped[0]} stopped")
        return 0
    from sandbox.cli import config, requests

    settings = config.defaults()
    size = args.size if args.size is not None else (settings.get("pool") or 2)
    idle = args.idle if args.idle is not None else float(settings.get("pool-idle") or 600.0)
    if args.pool_verb == "serve":
        from sandbox.backends.pool import daemon, key
        from sandbox.run import runner

        req = key.request_from(args.request) if args.request else control.pool_request(requests.from_namespace(args, ("true",), None, 0))
        # The template pool guests restore from: made first, as `sandbox prepare` makes it.
        status = daemon.run_pool(req, size, idle, before=lambda: log.info("%s", runner.prepare(req)))
        if status != 0:
            raise UsageError(f"a pool of yours runs already (sandbox pool status; its log: {paths.log_path()})")
        return 0
    found = control.start(control.pool_request(requests.from_namespace(args, ("true",), None, 0)), size, idle)
    print(("already running: " if found.get("already") else "") + control.format_status(found))
    if not settings.get("pool", 2):
        print("note: pool = 0 in your settings, so runs do not use it (sandbox config)")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from sandbox.confinement import audit

    for line in audit.tail(args.n):
        print(line)
    return 0


def _interrupt(signo: int, _frame: object) -> None:
    """SIGTERM/SIGHUP outside the relay loop: unwind, so that cleanup runs.

    Their default action would end the launcher on the spot and leave its
    runtime dir, cgroups and X11 files behind.  Later signals are ignored
    while we unwind: the first one already ends the run.
    """
    process.ignore(UNWINDING)
    raise Interrupted(signo)


def _print_error(exc: SandboxError, verbose: int) -> None:
    print(f"sandbox: {exc}", file=sys.stderr)
    if isinstance(exc, MachineError):
        if verbose and exc.argv:
            print(f"sandbox: qemu command: {' '.join(exc.argv)}", file=sys.stderr)
        if exc.log_tail:
            tail = exc.log_tail.strip().splitlines()[-(40 if verbose else 8) :]
            print("sandbox: last console lines:\n  " + "\n  ".join(tail), file=sys.stderr)


def main(argv: list[str] | None = None, closed_stdio: int | None = None, launcher_pid: int | None = None) -> int:
    """`sandbox ARGV...`; its exit status.

    `closed_stdio` and `launcher_pid` come from the pool's launcher
    (sandbox/cli/worker.py), which runs a command line for the process
    that the user started (and that took its stdio and was started without
    some of it).
    """
    if closed_stdio is None:
        from sandbox.cli import stdio

        closed_stdio = stdio.reserve()
    from sandbox.core.signals import not_ignored

    for sig in not_ignored(UNWINDING):
        signal.signal(sig, _interrupt)
    verbose = 0
    try:
        words = sys.argv[1:] if argv is None else argv
        verb = words[0] if words and not words[0].startswith("-") else None
        defaults = None
        if verb in CONFIGURED:
            from sandbox.cli import config

            defaults = config.defaults()
        args = build_parser(verb, defaults).parse_args(argv)
        verbose = getattr(args, "verbose", 0)
        args.closed_stdio = closed_stdio
        args.launcher_pid = launcher_pid
        _setup_logging(verbose)
        handler = {
            "run": _run, "bench": _bench, "prepare": _prepare, "audit": _audit, "list": _list, "info": _info,
            "logs": _logs, "wait": _wait, "stop": _stop, "kill": _kill, "rm": _rm, "send-key": _send_key,
            "attach": _attach, "exec": _exec, "net": _net, "config": _config, "pool": _pool,
        }[args.verb]  # fmt: skip
        return handler(args)
    except SandboxError as exc:
        _print_error(exc, verbose)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Our output's reader left (`sandbox list | head -1`): no word on it, as
        # a tool killed by SIGPIPE says none; the rest of it goes nowhere.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:
        # An environment problem we did not foresee still gets one line.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"sandbox: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_LAUNCHER
    except Exception as exc:  # noqa: BLE001 - a bug of ours: one line, never a traceback unasked
        _print_internal_error(exc, verbose)
        return EXIT_LAUNCHER


if __name__ == "__main__":
    sys.exit(main())
