"""`sandbox run`: one ExitStack for the run's resources, a backend for its guest, the relay for each attempt."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import resource
import stat
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox.backends import base as backends
from sandbox.image import hostfiles
from sandbox.plan import mounts
from sandbox.run import diagnostics
from sandbox.wire import protocol
from sandbox.core import runtime
from sandbox.backends.base import Attempt, BootSpec, GuestFactory, NetDevice, Prepared, RunContext, RunResult, Share, Started, WarmStartFailed
from sandbox.core.errors import EXIT_LAUNCHER, BootStallError, MachineError, SandboxError, TimeoutExpired, UsageError
from sandbox.backends.base import RunHooks
from sandbox.plan.request import RunRequest
from sandbox.plan.timings import Timeline, monotonic_boottime

if TYPE_CHECKING:
    from sandbox.confinement.walls import Confinement, ConfinementSpec
    from sandbox.net.attachment import Attachment
    from sandbox.features.x11 import X11Session

log = logging.getLogger(__name__)


def launcher_start_time(pid: int | None = None) -> float:
    """When the launcher (this process, or the one the user started) started, on the CLOCK_BOOTTIME scale (interpreter start-up included)."""
    from sandbox.core.process import started_at

    return started_at(pid or os.getpid()) or monotonic_boottime()


def _winsize(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
        return size.lines, size.columns
    except OSError:
        return 0, 0


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _regular_file(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def tty_mask(force: bool | None) -> int:
    """Which of the command's stdin/stdout/stderr get the guest pty.

    `-t` with a pipe on stdin gives the pty to the output only: the pipe's
    bytes and its EOF still reach the command exactly.
    """
    stdin_tty = _isatty(0)
    # A file on stdin gets back its offset after the run (relay.py): a `while read` loop goes on where the command stopped.
    file = protocol.TTY_STDIN_FILE if _regular_file(0) else 0
    if force is False or (force is None and not stdin_tty):
        return file
    mask = file | (protocol.TTY_STDIN if stdin_tty else 0)
    if force or _isatty(1):
        mask |= protocol.TTY_STDOUT
    if _isatty(2):
        mask |= protocol.TTY_STDERR
    return mask


# Passed to the command as the host has them.  The stack limit first of
# all: it sets how much argv and environment execve accepts.
RLIMITS = (resource.RLIMIT_STACK, resource.RLIMIT_NOFILE, resource.RLIMIT_CORE)


def host_rlimits() -> tuple[tuple[int, int, int], ...]:
    def value(v: int) -> int:
        return -1 if v == resource.RLIM_INFINITY else v

    return tuple((r, value(soft), value(hard)) for r in RLIMITS for soft, hard in [resource.getrlimit(r)])


def user_home(env: dict[str, str]) -> str:
    """The home directory the guest overlays: $HOME, else the passwd entry's (the command's environment is left as it is)."""
    home = env.get("HOME")
    if not home:
        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            home = "/"
    return home


def start_directory(workdir: str | None, launcher_cwd: str | None, home: str, remote: bool) -> str:
    """Where the command starts, a guest path.

    Here: the launcher's working directory, at the same path.  On a remote
    libvirt host, whose files ours mean nothing to: the home.  `--workdir`
    names another (relative: to that one; `~` is the home); a local one
    that exists is taken at its real path, as the working directory is.
    """
    has_home = home.startswith("/") and home != "/"
    base = (home if has_home else "/") if remote else (launcher_cwd or mounts.working_directory())
    if workdir is None:
        return base
    if workdir == "~" or workdir.startswith("~/"):
        workdir = (home if has_home else "/") + workdir[1:]
    path = os.path.normpath(os.path.join(base, workdir))
    path = "/" + path.lstrip("/")  # normpath keeps a leading '//'
    if not remote and os.path.isdir(path):
        path = os.path.realpath(path)
    return path


def start_environment(env: dict[str, str], cwd: str, launcher_cwd: str | None) -> dict[str, str]:
    """The command's environment: PWD names where it starts.

    Started where the launcher is, the environment is left alone (PWD as
    the shell set it, symlinks and all, as a direct run sees it); anywhere
    else PWD is that directory, as `cd` would set it.
    """
    if cwd == launcher_cwd:
        return env
    return {**env, "PWD": cwd}


def mount_plan(request: RunRequest, home: str, cwd: str, remote: bool = False) -> mounts.Plan:
    """The guest's filesystem for this run.

    On a remote libvirt host the home is an empty private tmpfs of the
    user's: the host's own copy of that path (if any) is no more ours than
    our files are there.
    """
    files = request.files
    if remote:
        private = files.private
        if home.startswith("/") and home != "/":
            home = os.path.normpath(home)
            private = (*files.private, home)
        return mounts.plan(home, cwd, tmpfs=files.tmpfs, private=private, hide=files.hide, unhide=files.unhide, local=False)
    files = request.files
    real_home = os.path.realpath(home) if home.startswith("/") else home
    shares = list(files.shares)
    if files.home is not None:
        if not real_home.startswith("/") or real_home == "/":
            raise UsageError(f"--home {files.home}: HOME ({home}) is not a directory the guest can mount over")
        shares.append(mounts.Share(files.home, real_home, "rw"))
    return mounts.plan(
        real_home,
        cwd,
        shares=shares,
        tmpfs=files.tmpfs,
        private=files.private,
        hide=files.hide,
        unhide=files.unhide,
        homes=mounts.host_homes(),
    )


def command_spec(request: RunRequest, tty: int, plan: mounts.Plan, home: str, cwd: str, env: dict[str, str],
                 x11: X11Session | None = None) -> protocol.CommandSpec:  # fmt: skip
    """The guest command: this user, environment and directory."""
    x11_display = x11.display if x11 is not None else None
    env = dict(env)
    if x11_display is not None:
        env["DISPLAY"] = f":{x11_display}"
        env.pop("XAUTHORITY", None)  # the real desktop's cookie never enters
    uid, gid = os.getuid(), os.getgid()
    umask = os.umask(0)
    os.umask(umask)
    rows, cols = _winsize(0 if _isatty(0) else 1) if tty else (0, 0)
    argv = request.command.argv
    return protocol.CommandSpec(
        argv=x11.guest_argv(argv) if x11 is not None else argv,
        env=tuple(env.items()),
        cwd=cwd,
        home=home,
        uid=uid,
        gid=gid,
        groups=tuple(os.getgroups()),  # as they are: the primary gid is in them when the caller has it there
        umask=umask,
        tty=tty,
        rows=rows,
        cols=cols,
        rlimits=host_rlimits(),
        mounts=plan.steps,
        x11_display=x11_display,
        x11_xpra=x11 is not None and x11.mode == "xpra",
        entropy=os.urandom(64),
        realtime_ns=time.time_ns(),
        closed=request.command.closed_stdio,
        hostname=request.command.hostname,
    )


def _describe_net(net: protocol.GuestNet | None) -> str:
    if net is None:
        return "none"
    ipv4 = f", {net.ipv4}" if net.ipv4 and net.ipv4 != "dhcp" else ""
    return f"{net.mode}, MAC {net.mac}{ipv4}"


def _killed(status: int | None) -> bool:
    """QEMU was killed from outside (`sandbox kill`, an administrator): not the template's doing.

    A broken template makes QEMU exit with an error (a state it cannot
    load), or the guest crash, which -no-reboot turns into QEMU's exit 0.
    Under its PID-namespace reaper a signal death arrives as 128+N.
    """
    return status is not None and (status < 0 or status in (128 + 9, 128 + 15))


def _panic_line(console_log: Path) -> str | None:
    try:
        text = console_log.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if "Kernel panic - not syncing:" in line:
            return protocol.printable(line.split("Kernel panic - not syncing:", 1)[1].strip())
    return None


class Run:
    """One `sandbox run`'s attempts: the relay around each guest its backend makes (`once`)."""

    def __init__(self, request: RunRequest, hooks: RunHooks, ctx: RunContext, boot: BootSpec, cspec: protocol.CommandSpec,
                 timeout_at: float | None, x11: X11Session | None, net_wired: Callable[[], None],
                 images: hostfiles.Judging | None = None) -> None:  # fmt: skip
        self.request, self.hooks, self.ctx, self.boot, self.cspec = request, hooks, ctx, boot, cspec
        self.timeout_at, self.x11, self.net_wired, self.images = timeout_at, x11, net_wired, images

    def once(self, make_guest: GuestFactory, attempt: Attempt) -> RunResult:
        """One boot (or restore) of the VM; raises BootStallError or WarmStartFailed if it fails before the command starts."""
        ctx, request, cspec = self.ctx, self.request, self.cspec
        timeline = ctx.timeline
        timeline.start = attempt.start
        boot_timeout = request.machine.boot_timeout or (20.0 if self.boot.accel == "tcg" else 10.0)
        if attempt.progress_timeout is not None:
            boot_timeout = min(boot_timeout, attempt.progress_timeout)
        with contextlib.ExitStack() as stack, make_guest() as guest:
            # Done while QEMU starts (on the other core), not before: the
            # relay's import, the exec socket, the encoded spec.
            from sandbox.run.relay import End, Relay

            execs = None
            if self.hooks.exec_socket is not None:
                from sandbox.features.execs import ExecBridge

                execs = stack.enter_context(ExecBridge(self.hooks.exec_socket))
            if self.images is not None:
                found = self.images.result()
                if found:
                    log.info("from images: %s", ", ".join(tree for tree, _ in found))
                    cspec = replace(cspec, mounts=hostfiles.with_images(cspec.mounts, found))
            spec_message = protocol.encode_spec(cspec)
            guest.wait_built(boot_timeout, attempt.number)
            self._tell_started(guest)
            self.net_wired()  # the host's side of the network, set up meanwhile, before the guest's first packet
            relay = Relay(
                guest,
                console_log=ctx.rundir / "console.log",
                timeline=timeline,
                spec_message=spec_message,
                tty=cspec.tty,
                verbose=request.verbose,
                boot_timeout=boot_timeout,
                timeout_at=self.timeout_at,
                x11=self.x11,
                execs=execs,
                stop_grace=self.hooks.stop_grace,
            )
            outcome = relay.run()
            confinement = ctx.confinement
            if outcome.status is None and confinement is not None and confinement.oom_killed():
                # The limit is the user's: a cold boot would meet it too, and the template is fine.
                raise MachineError(diagnostics.host_oom(request.machine.memory_mb, confinement.limits.memory_mb or 0))
            if attempt.fallback and not outcome.started and outcome.end in (End.STALL, End.DIED) and not _killed(outcome.machine_status):
                # Nothing of the command ran and no input was read: the backend may try another way.
                why = outcome.fatal or ("it made no progress" if outcome.end is End.STALL else "the guest stopped")
                if outcome.end is End.DIED and outcome.fatal is None:
                    panic = _panic_line(ctx.rundir / "console.log")
                    why = f"guest kernel panic: {panic}" if panic else why
                log.info("%s log tail:\n%s", attempt.start, guest.failure("").log_tail)
                raise WarmStartFailed(f"{attempt.what} failed before the command started ({why})",
                                      outcome.fatal is None, outcome.end is End.STALL)  # fmt: skip
            if outcome.end is End.STALL:
                failure = guest.failure("")
                raise BootStallError(f"guest boot made no progress for {boot_timeout:g} s (attempt {attempt.number})", failure.argv, failure.log_tail)
            if outcome.end is End.TIMEOUT:
                raise TimeoutExpired("the command timed out; the VM was killed")
            if outcome.fatal is not None:
                raise SandboxError(f"cannot set up the sandbox: {outcome.fatal}{guest.explain(outcome.fatal)}")
            if outcome.status is None:
                panic = _panic_line(ctx.rundir / "console.log")
                raise guest.failure(f"guest kernel panic ({panic})" if panic else "guest stopped before reporting a status")
            if outcome.exec_failed is not None:
                log.warning("%s", diagnostics.exec_failure(outcome.exec_failed, cspec.argv[0], cspec.cwd))
            if outcome.oom_kills:
                log.warning("%s", diagnostics.guest_oom(outcome.oom_kills, outcome.status, request.machine.memory_mb))
            if outcome.looked_up is not None and outcome.status != 0:
                log.warning("%s", diagnostics.no_network(outcome.looked_up))
            return RunResult(outcome.status, timeline, outcome.qemu_peak_rss_kb)

    def _tell_started(self, guest: backends.Guest) -> None:
        """The registry entry hears of the machine (after the restore was set going: off its critical path)."""
        if self.hooks.on_started is None:
            return
        boot = self.boot
        machine, label = guest.host_identity()
        self.hooks.on_started(Started(
            (guest.pids() or (None,))[-1], boot.accel, str(boot.kernel_image), boot.memory_mb, boot.cpus, self.ctx.timeline.start,
            label,
            ("/ (read-only)",) + tuple(f"{s.path} ({'read-only' if s.readonly else 'read-write'})" for s in boot.shares),
            *(self.x11.xtest_target() if self.x11 is not None else (None, "")),
            network=_describe_net(self.cspec.net),
            machine=machine,
        ))  # fmt: skip


def run(request: RunRequest, hooks: RunHooks = RunHooks()) -> RunResult:
    """Run the command in a fresh VM and return how it ended."""
    timeline = Timeline()
    timeline.stamp_host("launcher_start", launcher_start_time(hooks.launcher_pid))
    env = dict(request.command.env) if request.command.env is not None else dict(os.environ)
    home = user_home(env)
    with contextlib.ExitStack() as stack:
        backend = stack.enter_context(backends.open_backend(request))
        walls = _walls(request) if backend.confined_here else None
        # A remote host's guest never looks at our working directory: any will do, even one deleted.
        remote = not backend.local_files
        launcher_cwd = None if remote else (request.command.cwd or mounts.working_directory())
        cwd = start_directory(request.command.workdir, launcher_cwd, home, remote)
        plan = mount_plan(request, home, cwd, remote)
        images = _judge_images(request, plan, remote, backend)
        env = start_environment(env, cwd, launcher_cwd)
        prep = backend.prepare(request)
        timeline.tsc_khz = prep.tsc_khz
        # --timeout counts from the launcher's start (as `timeout sandbox run` would), across retries.
        started = timeline.host.get("launcher_start", monotonic_boottime())
        timeout = request.command.timeout
        timeout_at = time.monotonic() + timeout - (monotonic_boottime() - started) if timeout else None
        rundir = stack.enter_context(runtime.runtime_dir())
        confinement = _confine(stack, request, walls if backend.confined_here else None, rundir, plan)
        x11 = _display(stack, request, confinement)
        cspec = command_spec(request, tty_mask(request.command.tty), plan, home, cwd, env, x11)
        att = _network(stack, request, rundir, timeline)
        nic = None
        net_wired: Callable[[], None] = lambda: None
        if att is not None:
            cspec = replace(cspec, net=att.guest)
            nic = NetDevice(att.kind, att.fd, att.guest.mac)
            wait = att.wait

            def wired() -> None:
                wait()
                timeline.stamp_host("net_attached", monotonic_boottime())

            net_wired = wired
        boot = backends.boot_spec(request, prep, plan, nic, seccomp=confinement is not None and confinement.seccomp)
        overlays = tuple(m.path for m in plan.steps if m.op == protocol.MOP_OVERLAY)
        ctx = RunContext(rundir, timeline, confinement, request.verbose, hooks, overlays)
        result = backend.run(boot, ctx, Run(request, hooks, ctx, boot, cspec, timeout_at, x11, net_wired, images).once)
        if confinement is not None:
            confinement.ended(result.status)
        return result


def _judge_images(request: RunRequest, plan: mounts.Plan, remote: bool, backend: backends.Backend) -> hostfiles.Judging | None:
    """The run's image check, started now (hostfiles.py): trees of the host's, not another's, that no mount of the plan meets."""
    files = request.files
    if remote or not files.images:
        return None
    trees = hostfiles.usable_trees(hostfiles.default_trees() + files.image_trees, plan.steps, plan.homes)
    for tree in files.image_trees:
        if not any(os.path.commonpath([tree, chosen]) == chosen for chosen in trees):  # neither it nor a tree around it
            log.info("--image-tree %s: not imaged in this run: it meets a mount of the run or a home (it comes over 9p)", tree)
    if not trees:
        return None

    return hostfiles.Judging(trees, lambda ts: backend.vouched_images(ts, str(hostfiles.images_dir())))


def _walls(request: RunRequest) -> ConfinementSpec | None:
    """The walls asked for, checked against this host before anything is built (one-line errors)."""
    if request.confinement is None:
        return None
    from sandbox.confinement import walls

    return walls.resolve(request.confinement)


def _confine(stack: contextlib.ExitStack, request: RunRequest, spec: ConfinementSpec | None, rundir: Path, plan: mounts.Plan) -> Confinement | None:
    """The walls around QEMU, for the run's length (none for a backend with walls of its own, or --no-confine)."""
    if spec is None:
        return None
    from sandbox.confinement import walls

    return stack.enter_context(walls.Confinement(spec, request.command.argv, rundir, [share for _, share in plan.shares]))


def _display(stack: contextlib.ExitStack, request: RunRequest, confinement: Confinement | None) -> X11Session | None:
    if request.x11 is None:
        return None
    from sandbox.features.x11 import X11Session

    session = stack.enter_context(X11Session.create(request.x11))
    label = confinement.process_label if confinement is not None else None
    session.start(f"sandbox: {' '.join(request.command.argv)} [{label or 'unlabelled'}]")
    return session


def _network(stack: contextlib.ExitStack, request: RunRequest, rundir: Path, timeline: Timeline) -> Attachment | None:
    if request.net.mode == "none":
        return None
    from sandbox.net import attachment

    timeline.stamp_host("net_attach", monotonic_boottime())
    return stack.enter_context(attachment.attach(request.net, rundir))


def exit_status(result: RunResult) -> int:
    return result.status if 0 <= result.status <= 255 else EXIT_LAUNCHER


def prepare(request: RunRequest) -> str:
    """`sandbox prepare`: what this request's first run would make, made now; a line saying what is there."""
    env = dict(request.command.env) if request.command.env is not None else dict(os.environ)
    home = user_home(env)
    cwd = start_directory(request.command.workdir, request.command.cwd, home, remote=False)
    plan = mount_plan(request, home, cwd)
    with backends.open_backend(request) as backend:
        prep = backend.prepare(request)
        # The NIC's kind shapes a template; its descriptor and MAC do not.
        kind = request.net.nic_kind
        boot = backends.boot_spec(request, prep, plan, NetDevice(kind, 0, "") if kind is not None else None, seccomp=True)
        there = backend.ready(request, boot)
        if there is not None:
            return there
        result = run(request)
        if result.status != 0:
            raise SandboxError(f"the first run's boot ran `{' '.join(request.command.argv)}`, which exited with status {result.status}")
        there = backend.ready(request, boot)
        if there is None:
            how = "another launcher was building it" if result.timeline.start == "cold" else "see -v for why"
            raise SandboxError(f"nothing was made ({how})")
        return there.replace(" ready:", " built:", 1)
