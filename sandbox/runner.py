"""`sandbox run`: prepare the VM, start it, relay the command's I/O, and collect its status."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Callable
from contextlib import AbstractContextManager

from . import cache, config, diagnostics, host, initramfs, kernel, mounts, protocol, runtime
from .errors import EXIT_LAUNCHER, BootStallError, MachineError, SandboxError, TimeoutExpired, UsageError
from .guestinit import init_binary
from .libvirt import connect_uri
from .qemu import argv as qemuargv
from .qemu import template
from .backend import Guest
from .qemu.backend import BootSpec, DirectGuest, WarmStart, template_argv
from .timings import Timeline, monotonic_boottime

if TYPE_CHECKING:
    from .net.attachment import NetRequest
    from .confinement.walls import Confinement
    from .x11 import X11Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """Everything `sandbox run` was asked to do."""

    argv: tuple[str, ...]
    kernel: Path | None = None
    accel: str | None = None  # None: the user's default (config.accel)
    qemu: str | None = None
    machine: str = "auto"  # auto | microvm | q35
    memory_mb: int = 512
    cpus: int = 1
    timeout: float | None = None
    boot_timeout: float | None = None  # None: chosen by accelerator
    boot_retries: int = 1
    tty: bool | None = None  # None: when stdin is a terminal
    closed_stdio: int = 0  # bit 1 << fd: fd 0, 1 or 2 was closed when the launcher started, so it is for the command too
    shares: tuple[mounts.Share, ...] = ()
    home: Path | None = None  # --home DIR: a read-write share shown as $HOME
    tmpfs: tuple[tuple[str, str], ...] = ()
    private: tuple[str, ...] = ()
    hide: tuple[str, ...] = ()
    unhide: tuple[str, ...] = ()
    verbose: int = 0
    kernel_append: str = ""
    pvh: bool = True
    tb_size_mb: int = 24  # MiB; the trade-off is measured in benchmarks/README.md
    cpu_model: str | None = None
    crypto_selftests: bool = False
    tracefs: bool = False
    confinement: Confinement | None = None
    x11: X11Session | None = None
    env: tuple[tuple[str, str], ...] | None = None  # None: this process's environment
    cwd: str | None = None
    workdir: str | None = None  # --workdir: where the command starts (a guest path; relative: to where it would start)
    warm: bool = True  # restore from a template when one fits (--cold: never)
    on_started: Callable[[Started], None] | None = None  # told each time a QEMU runs the guest
    keyboard: bool = False  # a virtio keyboard for `sandbox send-key`
    monitor_socket: Path | None = None  # a QMP socket for other commands (send-key), bound here
    exec_socket: Path | None = None  # where `sandbox exec` reaches this run (sandbox/execs.py)
    net: str = "none"  # --net: none | user | nat[=NAME] | bridge=BRIDGE (sandbox/net)
    mac: str | None = None
    connect: str | None = None  # --connect URI: libvirtd runs the guest (sandbox/libvirt)

    def __post_init__(self) -> None:
        if not self.argv:
            raise UsageError("no command given (usage: sandbox run [OPTIONS] -- CMD [ARGS...])")


@dataclass(frozen=True)
class Started:
    """A machine runs the guest (for `sandbox list` and `info`)."""

    qemu_pid: int | None  # None: QEMU is libvirtd's, perhaps on another host
    accel: str
    kernel: str
    memory_mb: int
    cpus: int
    start: str  # warm or cold
    label: str
    shares: tuple[str, ...]
    x11_display: int | None = None  # the nested X server (Xephyr) on the host
    x11_auth: str = ""
    network: str = "none"
    machine: str = ""  # the backend's name for it, where it has one (a libvirt domain)


@dataclass
class RunResult:
    """How a run ended."""

    status: int
    timeline: Timeline = field(default_factory=Timeline)
    qemu_peak_rss_kb: int | None = None


def launcher_start_time() -> float:
    """When this process started, on the CLOCK_BOOTTIME scale (interpreter start-up included)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return monotonic_boottime()


def kernel_cmdline(
    accel: str, tsc_khz: int | None, crypto_selftests: bool, verbose: int, extra: str, tracefs: bool = False
) -> str:
    """The guest kernel's command line; each knob's effect is in benchmarks/README.md."""
    args = [
        "console=ttyS0",
        "panic=-1",  # a panic resets, and -no-reboot turns that into QEMU's exit
        "8250.nr_uarts=1",
        "i8042.noaux",
        "i8042.nokbd",
        "i8042.nopnp",
        "noreplace-smp",
        "nowatchdog",
        "audit=0",
    ]
    if verbose < 2:
        args.append("quiet")
    if accel == "tcg" and tsc_khz:
        # Calibrating the TSC against a busy host hangs the boot; the host's
        # rate is exact under TCG, whose guest TSC is the host's.
        args.append(f"tsc_early_khz={tsc_khz}")
        args.append("tsc=reliable")
    if not crypto_selftests:
        args.append("cryptomgr.notests")
    if not tracefs:
        # Its ~10,000 event files cost 80 ms and 9 MiB of inodes at boot,
        # and tracing is a debugging interface the sandboxed command has
        # no use for: one less thing in the guest kernel to attack.
        args.append("initcall_blacklist=tracer_init_tracefs")
    if extra:
        args.append(extra)
    return " ".join(args)


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


def tty_mask(force: bool | None) -> int:
    """Which of the command's stdin/stdout/stderr get the guest pty.

    `-t` with a pipe on stdin gives the pty to the output only: the pipe's
    bytes and its EOF still reach the command exactly.
    """
    stdin_tty = _isatty(0)
    if force is False or (force is None and not stdin_tty):
        return 0
    mask = protocol.TTY_STDIN if stdin_tty else 0
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


def working_directory() -> str:
    """The launcher's cwd, which the guest shows at the same path."""
    try:
        return os.getcwd()
    except OSError as exc:
        raise UsageError(f"the working directory cannot be shown in the sandbox: {exc.strerror}") from None


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
    base = (home if has_home else "/") if remote else (launcher_cwd or working_directory())
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


def mount_plan(opts: RunOptions, home: str, cwd: str, remote: bool = False) -> mounts.Plan:
    """The guest's filesystem for this run.

    On a remote libvirt host the home is an empty private tmpfs of the
    user's: the host's own copy of that path (if any) is no more ours than
    our files are there.
    """
    if remote:
        if home.startswith("/") and home != "/":
            home = os.path.normpath(home)
            private: tuple[str, ...] = (*opts.private, home)
        else:
            private = opts.private
        return mounts.plan(home, cwd, tmpfs=opts.tmpfs, private=private, hide=opts.hide, unhide=opts.unhide, local=False)
    real_home = os.path.realpath(home) if home.startswith("/") else home
    shares = list(opts.shares)
    if opts.home is not None:
        if not real_home.startswith("/") or real_home == "/":
            raise UsageError(f"--home {opts.home}: HOME ({home}) is not a directory the guest can mount over")
        shares.append(mounts.Share(opts.home, real_home, "rw"))
    return mounts.plan(
        real_home,
        cwd,
        shares=shares,
        tmpfs=opts.tmpfs,
        private=opts.private,
        hide=opts.hide,
        unhide=opts.unhide,
        homes=mounts.host_homes(),
    )


def command_spec(opts: RunOptions, tty: int, plan: mounts.Plan, home: str, cwd: str, env: dict[str, str]) -> protocol.CommandSpec:
    """The guest command: this user, environment and directory."""
    x11_display = opts.x11.display if opts.x11 is not None else None
    env = dict(env)
    if x11_display is not None:
        env["DISPLAY"] = f":{x11_display}"
        env.pop("XAUTHORITY", None)  # the real desktop's cookie never enters
    uid, gid = os.getuid(), os.getgid()
    umask = os.umask(0)
    os.umask(umask)
    rows, cols = _winsize(0 if _isatty(0) else 1) if tty else (0, 0)
    return protocol.CommandSpec(
        argv=opts.x11.guest_argv(opts.argv) if opts.x11 is not None else opts.argv,
        env=tuple(env.items()),
        cwd=cwd,
        home=home,
        uid=uid,
        gid=gid,
        groups=tuple(g for g in os.getgroups() if g != gid),
        umask=umask,
        tty=tty,
        rows=rows,
        cols=cols,
        rlimits=host_rlimits(),
        mounts=plan.steps,
        x11_display=x11_display,
        x11_xpra=opts.x11 is not None and opts.x11.mode == "xpra",
        entropy=os.urandom(64),
        realtime_ns=time.time_ns(),
        closed=opts.closed_stdio,
    )


@dataclass(frozen=True)
class Prepared:
    """The boot inputs that do not change between attempts."""

    accel: str
    qemu: host.QemuInfo
    machine: str
    kernel_image: Path
    pvh: bool  # kernel_image is the extracted ELF
    initrd: Path
    cmdline: str
    tsc_khz: int | None


def prepare(opts: RunOptions) -> Prepared:
    """Resolve the kernel, QEMU and initramfs (all cached after the first run)."""
    accel, warning = host.choose_accel(config.accel(opts.accel))
    if warning and host.show_accel_notice(opts.verbose):
        log.warning("%s", warning)
    qemu = host.qemu_info(opts.qemu)
    machine = opts.machine
    if machine == "auto":
        machine = "microvm" if qemu.microvm else "q35"
    elif machine == "microvm" and not qemu.microvm:
        raise UsageError(f"{qemu.path} has no microvm machine")
    kern = kernel.find_kernel(opts.kernel)
    kernel.ensure_readable(kern.image)
    pvh_image = kernel.pvh_image(kern) if opts.pvh else None
    image = pvh_image or kern.image
    init = init_binary()
    initrd = initramfs.cached(kern, init, initramfs.wanted_modules(machine, opts.keyboard, net=opts.net != "none"))
    for stale in cache.prune_boot_images([p for p in (pvh_image, initrd, init) if p is not None]):
        log.info("removed unused cache entry %s", stale)
    tsc = host.tsc_khz() if accel == "tcg" else None
    cmdline = kernel_cmdline(accel, tsc, opts.crypto_selftests, opts.verbose, opts.kernel_append, opts.tracefs)
    return Prepared(accel, qemu, machine, image, pvh_image is not None, initrd, cmdline, tsc)


def boot_spec(opts: RunOptions, prep: Prepared, plan: mounts.Plan, net: qemuargv.NetDevice | None = None) -> BootSpec:
    """The machine for this run (the same for every attempt)."""
    confinement = opts.confinement
    return BootSpec(
        qemu=prep.qemu.path,
        accel=prep.accel,
        machine=prep.machine,
        kernel_image=prep.kernel_image,
        pvh=prep.pvh,
        initrd=prep.initrd,
        cmdline=prep.cmdline,
        memory_mb=opts.memory_mb,
        cpus=opts.cpus,
        tb_size_mb=opts.tb_size_mb if prep.accel == "tcg" else None,
        cpu_model=opts.cpu_model,
        seccomp=confinement is not None and confinement.seccomp and prep.qemu.seccomp,
        x11=opts.x11 is not None,
        shares=tuple(qemuargv.Share(tag, share.host, readonly=not share.writable) for tag, share in plan.shares),
        keyboard=opts.keyboard,
        net=net,
    )


# A restore resumes in well under a second; one that makes no progress for
# this long is broken, and the run boots cold instead.
WARM_PROGRESS_TIMEOUT = 8.0


class WarmStartFailed(SandboxError):
    """The restored guest ended or stalled before the command started."""

    def __init__(self, message: str, template_broken: bool, stalled: bool = False) -> None:
        super().__init__(message)
        self.template_broken = template_broken
        self.stalled = stalled  # no progress (perhaps a busy host), rather than a guest that failed


def boot_once(
    opts: RunOptions,
    boot: BootSpec,
    rundir: Path,
    timeline: Timeline,
    attempt: int,
    cspec: protocol.CommandSpec,
    timeout_at: float | None,
    warm: WarmStart | None = None,
    builder: template.Builder | None = None,
    net_wired: Callable[[], None] = lambda: None,
    make_guest: Callable[[], AbstractContextManager[Guest]] | None = None,
) -> RunResult:
    """One boot (or restore) of the VM; raises BootStallError if it stalls before the command starts.

    `make_guest` gives another backend's guest (a context manager
    implementing backend.Guest); by default QEMU runs here (DirectGuest).
    """
    confinement = opts.confinement
    boot_timeout = opts.boot_timeout or (20.0 if boot.accel == "tcg" else 10.0)
    if warm is not None:
        boot_timeout = min(boot_timeout, WARM_PROGRESS_TIMEOUT)
    if make_guest is None:
        make_guest = lambda: DirectGuest(  # noqa: E731
            boot, rundir, timeline, confinement, opts.verbose, warm=warm, builder=builder, monitor_socket=opts.monitor_socket
        )
    with contextlib.ExitStack() as stack, make_guest() as guest:
        # Done while QEMU starts (on the other core), not before: the
        # relay's import, the exec socket, the encoded spec.
        from .relay import End, Relay

        execs = None
        if opts.exec_socket is not None:
            from .execs import ExecBridge

            execs = ExecBridge(opts.exec_socket)
            stack.callback(execs.close)
        spec_message = protocol.encode_spec(cspec)
        guest.wait_built(boot_timeout, attempt)
        if opts.on_started is not None:  # after the restore was set going: off its critical path
            machine, label = guest.host_identity()
            opts.on_started(Started(
                (guest.pids() or (None,))[-1], boot.accel, str(boot.kernel_image), boot.memory_mb, boot.cpus, timeline.start,
                label,
                ("/ (read-only)",) + tuple(f"{s.path} ({'read-only' if s.readonly else 'read-write'})" for s in boot.shares),
                *(opts.x11.xtest_target() if opts.x11 is not None else (None, "")),
                network=_describe_net(cspec.net),
                machine=machine,
            ))  # fmt: skip
        net_wired()  # the host's side of the network, set up meanwhile, before the guest's first packet
        relay = Relay(
            guest,
            console_log=rundir / "console.log",
            timeline=timeline,
            spec_message=spec_message,
            tty=cspec.tty,
            verbose=opts.verbose,
            boot_timeout=boot_timeout,
            timeout_at=timeout_at,
            x11=opts.x11,
            execs=execs,
        )
        outcome = relay.run()
        host_oom = outcome.status is None and confinement is not None and confinement.oom_killed()
        if host_oom:
            # The limit is the user's: a cold boot would meet it too, and the template is fine.
            raise MachineError(diagnostics.host_oom(opts.memory_mb, confinement.limits.memory_mb))  # type: ignore[union-attr]
        if (warm is not None or builder is not None) and not outcome.started and outcome.end in (End.STALL, End.DIED) and not _killed(outcome.machine_status):
            # Nothing of the command ran and no input was read: boot cold instead.
            why = outcome.fatal or ("it made no progress" if outcome.end is End.STALL else "the guest stopped")
            if outcome.end is End.DIED and outcome.fatal is None:
                panic = _panic_line(rundir / "console.log")
                why = f"guest kernel panic: {panic}" if panic else why
            log.info("%s log tail:\n%s", "restore" if warm is not None else "template build", guest.failure("").log_tail)
            what = "the restored guest" if warm is not None else "the guest building the warm-start template"
            raise WarmStartFailed(f"{what} failed before the command started ({why})", outcome.fatal is None, outcome.end is End.STALL)
        if outcome.end is End.STALL:
            failure = guest.failure("")
            raise BootStallError(f"guest boot made no progress for {boot_timeout:g} s (attempt {attempt})", failure.argv, failure.log_tail)
        if outcome.end is End.TIMEOUT:
            raise TimeoutExpired("the command timed out; the VM was killed")
        if outcome.fatal is not None:
            raise SandboxError(f"cannot set up the sandbox: {outcome.fatal}{guest.explain(outcome.fatal)}")
        if outcome.status is None:
            panic = _panic_line(rundir / "console.log")
            raise guest.failure(f"guest kernel panic ({panic})" if panic else "guest stopped before reporting a status")
        if outcome.exec_failed is not None:
            log.warning("%s", diagnostics.exec_failure(outcome.exec_failed, cspec.argv[0], cspec.cwd))
        if outcome.oom_kills:
            log.warning("%s", diagnostics.guest_oom(outcome.oom_kills, outcome.status, opts.memory_mb))
        if outcome.looked_up is not None and outcome.status != 0:
            log.warning("%s", diagnostics.no_network(outcome.looked_up))
        return RunResult(outcome.status, timeline, outcome.qemu_peak_rss_kb)


def _describe_net(net: protocol.GuestNet | None) -> str:
    if net is None:
        return "none"
    ipv4 = f", {net.ipv4}" if net.ipv4 and net.ipv4 != "dhcp" else ""
    return f"{net.mode}, MAC {net.mac}{ipv4}"


def template_store(opts: RunOptions, prep: Prepared, boot: BootSpec) -> template.Store | None:
    """Where this run's template lives, or None when this run boots cold whatever there is."""
    if not opts.warm or opts.verbose >= 2:  # -vv asks for the boot log: there must be a boot
        return None
    identities = {
        "qemu": f"{cache.file_identity(Path(prep.qemu.path))}:{prep.qemu.version}",
        "kernel": cache.file_identity(prep.kernel_image),
        "initrd": cache.file_identity(prep.initrd),
    }
    try:
        store = template.Store(template.key(template_argv(boot), identities))
        for stale in template.prune(store.key):
            log.info("removed unused template %s", stale)
    except (OSError, SandboxError) as exc:
        log.info("warm start unavailable: %s", exc)
        return None
    return store


def _restore_inputs(store: template.Store, memory_mb: int) -> WarmStart | None:
    found = store.load(memory_mb << 20)
    if found is None:
        return None
    try:
        state_fd = os.open(found.state, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        store.invalidate(f"cannot read its device state: {exc.strerror}")
        return None
    try:
        return WarmStart(template.RestoreRam(found, store.root), state_fd)
    except OSError as exc:
        os.close(state_fd)
        log.info("warm start unavailable: %s", exc)
        return None


def _boot(
    opts: RunOptions,
    prep: Prepared,
    boot: BootSpec,
    rundir: Path,
    timeline: Timeline,
    cspec: protocol.CommandSpec,
    timeout_at: float | None,
    net_wired: Callable[[], None] = lambda: None,
) -> RunResult:
    """Warm when a template fits, else cold (building the template on the way); a stalled boot is retried."""
    store = template_store(opts, prep, boot)
    if store is not None:
        warm = _restore_inputs(store, opts.memory_mb)
        if warm is not None:
            timeline.start = "warm"
            try:
                return boot_once(opts, boot, rundir, timeline, 1, cspec, timeout_at, warm=warm, net_wired=net_wired)
            except (WarmStartFailed, template.TemplateError) as exc:
                log.warning("%s; booting cold", exc)
                if not isinstance(exc, WarmStartFailed) or exc.template_broken:
                    store.invalidate("its guest failed")
                timeline.new_boot()
            finally:
                warm.ram.close()
                os.close(warm.state_fd)
    builder = template.Builder.try_start(store, opts.memory_mb << 20, prep.qemu.version) if store is not None else None
    if builder is not None:
        timeline.start = "cold, building the template"
        try:
            return boot_once(opts, boot, rundir, timeline, 1, cspec, timeout_at, builder=builder, net_wired=net_wired)
        except (WarmStartFailed, BootStallError) as exc:
            # Whatever broke the build, this run still gets its plain cold
            # boot: nothing of the command ran and no input was read.
            log.warning("%s; booting cold without a template", exc)
            if isinstance(exc, WarmStartFailed) and not exc.stalled:
                assert store is not None
                store.mark_failed(str(exc))
            timeline.new_boot()
        finally:
            builder.close()
    timeline.start = "cold"
    for attempt in range(1, opts.boot_retries + 2):
        try:
            return boot_once(opts, boot, rundir, timeline, attempt, cspec, timeout_at, net_wired=net_wired)
        except BootStallError as exc:
            if attempt > opts.boot_retries:
                raise
            log.warning("%s; retrying", exc)
            timeline.new_boot()
    raise SandboxError("unreachable")  # pragma: no cover


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
            return line.split("Kernel panic - not syncing:", 1)[1].strip()
    return None


def run(opts: RunOptions) -> RunResult:
    """Run the command in a fresh VM and return how it ended."""
    timeline = Timeline()
    timeline.stamp_host("launcher_start", launcher_start_time())
    env = dict(opts.env) if opts.env is not None else dict(os.environ)
    home = user_home(env)
    net_request = None
    if opts.net != "none" or opts.mac is not None:  # sandbox.net costs ~10 ms to import
        from .net import attachment

        net_request = attachment.parse(opts.net, opts.mac)
    backend = None
    opts = replace(opts, connect=connect_uri(opts.connect, dict(os.environ)))
    if opts.connect:
        from .libvirt.backend import LibvirtBackend, check_options

        check_options(opts.connect, opts.x11 is not None, opts.net, bool(opts.shares or opts.home), opts.keyboard)
        backend = LibvirtBackend(opts.connect)
    try:
        # A remote host's guest never looks at our working directory: any will do, even one deleted.
        remote = backend is not None and backend.remote
        launcher_cwd = None if remote else (opts.cwd or working_directory())
        cwd = start_directory(opts.workdir, launcher_cwd, home, remote)
        plan = mount_plan(opts, home, cwd, remote)
        cspec = command_spec(opts, tty_mask(opts.tty), plan, home, cwd, start_environment(env, cwd, launcher_cwd))
        return _run(opts, timeline, plan, cspec, net_request, backend)
    finally:
        if backend is not None:
            backend.close()


def _run(
    opts: RunOptions, timeline: Timeline, plan: mounts.Plan, cspec: protocol.CommandSpec, net_request: NetRequest | None, backend: Any
) -> RunResult:
    if backend is None:
        prep = prepare(opts)
    else:
        on_host = backend.prepare(opts.accel, opts.machine, opts.kernel, opts.pvh)
        cmdline = kernel_cmdline(on_host.accel, on_host.tsc_khz, opts.crypto_selftests, opts.verbose, opts.kernel_append, opts.tracefs)
        prep = Prepared(on_host.accel, on_host.qemu, on_host.machine, on_host.kernel_image, on_host.pvh, on_host.initrd, cmdline, on_host.tsc_khz)
    timeline.tsc_khz = prep.tsc_khz
    # --timeout counts from the launcher's start (as `timeout sandbox run` would), across retries.
    started = timeline.host.get("launcher_start", monotonic_boottime())
    timeout_at = time.monotonic() + opts.timeout - (monotonic_boottime() - started) if opts.timeout else None
    with runtime.runtime_dir() as rundir, contextlib.ExitStack() as stack:
        label = None
        if opts.confinement is not None and backend is None:  # libvirt puts up its own walls
            stack.enter_context(opts.confinement.around(rundir, [share for _, share in plan.shares]))
            label = opts.confinement.process_label
        if opts.x11 is not None:
            stack.callback(opts.x11.close)
            opts.x11.start(f"sandbox: {' '.join(opts.argv)} [{label or 'unlabelled'}]")
        nic = None
        net_wired: Callable[[], None] = lambda: None
        att = None
        if net_request is not None:
            from .net import attachment

            timeline.stamp_host("net_attach", monotonic_boottime())
            att = stack.enter_context(attachment.attach(net_request, rundir))
        if att is not None:
            cspec = replace(cspec, net=att.guest)
            nic = qemuargv.NetDevice(att.kind, att.fd, att.guest.mac)

            def wired() -> None:
                att.wait()
                timeline.stamp_host("net_attached", monotonic_boottime())

            net_wired = wired

        boot = boot_spec(opts, prep, plan, nic)
        if backend is not None:
            timeline.start = "cold, libvirt"
            overlays = tuple(m.path for m in plan.steps if m.op == protocol.MOP_OVERLAY)
            guest = lambda: backend.guest(boot, rundir, timeline, opts.confinement, opts.verbose, overlays)  # noqa: E731
            result = boot_once(opts, boot, rundir, timeline, 1, cspec, timeout_at, make_guest=guest)
        else:
            result = _boot(opts, prep, boot, rundir, timeline, cspec, timeout_at, net_wired)
        if opts.confinement is not None:
            opts.confinement.exit_status = result.status
        return result


def exit_status(result: RunResult) -> int:
    return result.status if 0 <= result.status <= 255 else EXIT_LAUNCHER


def prepare_host(opts: RunOptions) -> str:
    """--connect: put this run's kernel and initramfs on the libvirt host now; what is there, in a line."""
    from .libvirt.backend import LibvirtBackend

    uri = connect_uri(opts.connect, dict(os.environ))
    assert uri is not None
    backend = LibvirtBackend(uri)
    try:
        on_host = backend.prepare(opts.accel, opts.machine, opts.kernel, opts.pvh)
    finally:
        backend.close()
    where = "remote host, its own kernel" if backend.remote else "this host"
    return f"libvirt {uri} ({where}): kernel {on_host.kernel_image}, initramfs {on_host.initrd}, {on_host.machine}, {on_host.accel}"


def prepare_template(opts: RunOptions) -> tuple[template.Template, bool]:
    """The template `opts` would restore from, built now if there is none; (template, whether it was built)."""
    env = dict(opts.env) if opts.env is not None else dict(os.environ)
    home = user_home(env)
    cwd = start_directory(opts.workdir, opts.cwd, home, remote=False)
    prep = prepare(opts)
    from .net import attachment

    req = attachment.parse(opts.net, opts.mac)
    # The NIC's kind shapes the template; template_argv makes its descriptor and MAC constant.
    nic = qemuargv.NetDevice(req.nic_kind, 0, "") if req.nic_kind is not None else None
    boot = boot_spec(opts, prep, mount_plan(opts, home, cwd), nic)
    store = template_store(opts, prep, boot)
    if store is None:
        raise UsageError("warm start is off for these options (--cold, or -vv which shows a whole boot)")
    found = store.load(opts.memory_mb << 20)
    if found is not None:
        return found, False
    result = run(opts)
    if result.status != 0:
        raise SandboxError(f"the template's boot ran `{' '.join(opts.argv)}`, which exited with status {result.status}")
    found = store.load(opts.memory_mb << 20)
    if found is None:
        how = "another launcher was building it" if result.timeline.start == "cold" else "see -v for why"
        raise SandboxError(f"no template was made ({how})")
    return found, True

