"""libvirt's walls around each QEMU process, put up by the launcher itself.

sVirt label (unique MCS pair), DAC (an unprivileged uid when started as
root), namespaces, seccomp (QEMU's -sandbox), cgroups, a scrubbed
environment, and an audit trail.  The VM is the first wall; these make what
a guest gains by exploiting QEMU worthless.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pwd
import random
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.plan import mounts
from sandbox.core import runtime
from sandbox.core.errors import ConfinementError, UsageError
from sandbox.plan.request import ConfinementOptions
from sandbox.core.process import ignore, set_name, set_parent_death_signal
from sandbox.core.signals import FORWARDED
from sandbox.confinement import audit, cgroups, idmap, libselinux, mcs, reservations

log = logging.getLogger(__name__)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8

_libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def _mount(src: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    if _libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None, flags, data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    name: str


def resolve_user(name: str | None) -> Identity | None:
    """The uid/gid QEMU runs as: only when started as root (default `nobody`)."""
    if os.geteuid() != 0:
        return None
    name = name or "nobody"
    if name == "root":
        return None
    try:
        pw = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
    except KeyError:
        raise UsageError(f"--qemu-user {name}: no such user") from None
    if pw.pw_uid == 0:
        return None
    return Identity(pw.pw_uid, pw.pw_gid, pw.pw_name)


PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
# NOROOT(+LOCKED): exec as uid 0 grants nothing; NO_SETUID_FIXUP(+LOCKED):
# a uid change keeps the capabilities we chose to keep.
SECURE_NOROOT_NOFIXUP = 0x1 | 0x2 | 0x4 | 0x8
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2
CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID = 0, 1, 2, 3, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
SYS_CAPSET = 126  # x86-64

# QEMU as `nobody` on the host: a sandbox started by root runs its command
# as root, which reads every file; QEMU serves those reads over 9p.  This
# lets it read and search everything and nothing more: no writes, no
# ownership, and the root it exports is read-only.
READ_ONLY_CAPS = (CAP_DAC_READ_SEARCH,)
# QEMU as root of its own user namespace, for read-write shares (idmap.py):
# what root's writes on the host rely on (write any file, keep setuid bits
# on a write, chown, chmod and utimes of others' files).  They count only
# for the idmapped shares and root, whose files map into its namespace.
SHARE_CAPS = (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID)


def keep_capabilities(caps: tuple[int, ...]) -> None:
    """After the switch to QEMU's uid, keep only `caps`, across exec (bounding set too).

    Needs SECURE_NOROOT_NOFIXUP set before the uid change, so that the change
    keeps the capabilities this then narrows down.
    """

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    # The bounding set too, so that nothing QEMU execs could ever regain more.
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last_cap + 1):
        if cap not in caps and _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    bits = 0
    for cap in caps:
        bits |= 1 << cap  # all below 32
    data = (Data * 2)(Data(bits, bits, bits), Data(0, 0, 0))
    hdr = Header(_LINUX_CAPABILITY_VERSION_3, 0)
    if _libc.syscall(SYS_CAPSET, ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    for cap in caps:
        if _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAP_AMBIENT)")


@dataclass(frozen=True)
class ConfinementSpec:
    """The walls a run gets, resolved and checked from what the user asked (ConfinementOptions)."""

    selinux: bool = False
    static_label: str | None = None
    show_label: bool = False
    user: Identity | None = None  # QEMU's uid/gid when started as root
    namespaces: bool = True
    seccomp: bool = True
    limits: cgroups.Limits = field(default_factory=cgroups.Limits)
    strict_limits: bool = True


class Confinement:
    """The walls for one run: put up on entry, taken down (with the audit's stop record) on exit.

    The runner enters it for the run's length; the direct backend's QEMU
    calls its hooks (preexec in the child, started once spawned).
    """

    def __init__(self, spec: ConfinementSpec, argv: tuple[str, ...], rundir: Path, shares: list[mounts.Share]) -> None:
        self.spec = spec
        self.argv = argv
        self.rundir = rundir
        self.shares = tuple(f"{s.host} -> {s.guest} ({s.mode})" for s in shares)
        self._share_list = shares
        self.process_label: str | None = None
        self.file_label: str | None = None
        self.qemu_pid: int | None = None
        self._status: int | None = None  # the run's, for the stop record
        self._reservation: mcs.Reservation | None = None
        self._cgroup: cgroups.Cgroup | None = None
        self._stack = ExitStack()
        self._started = 0.0
        self._hidden: str | None = None
        self._run = ""
        # Idmapped views of the trees QEMU exports (see idmap.py): host path ->
        # (detached mount fd, mount point relative to the runtime dir).
        self._views: dict[str, tuple[int, str]] = {}
        self._userns: int | None = None
        self._ids: reservations.Reservation | None = None  # the host id range of QEMU's user namespace
        self._host_id: int | None = None  # QEMU's uid and gid on the host in that namespace

    @property
    def limits(self) -> cgroups.Limits:
        return self.spec.limits

    @property
    def seccomp(self) -> bool:
        return self.spec.seccomp

    def ended(self, status: int | None) -> None:
        """The run's exit status, for the stop record written when the walls come down."""
        self._status = status

    # ---- before QEMU ---------------------------------------------------

    def __enter__(self) -> Confinement:
        try:
            self._prepare()
        except BaseException:
            self._finish()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish()

    def _prepare(self) -> None:
        """Allocate the label, make the cgroup, and hand the runtime dir to QEMU's uid."""
        rundir, shares = self.rundir, self._share_list
        writable = [s.host for s in shares if s.writable]
        if writable and self.spec.user is not None:
            self._idmap_views(rundir, shares)
        self._hidden = str(runtime.runtime_base())
        if self.spec.selinux:
            self._allocate_label()
        if self.spec.show_label:
            log.warning("label %s", self.process_label or "none (SELinux is not in use)")
        self._cgroup = cgroups.create(f"sandbox-{os.getpid()}-{rundir.name}", self.spec.limits, strict=self.spec.strict_limits)
        if self.qemu_ids is not None:
            os.chown(rundir, *self.qemu_ids)
        if self.file_label:
            self._stack.enter_context(libselinux.relabelled(rundir, self.file_label))
            for path in writable:
                self._stack.enter_context(libselinux.relabelled(path, self.file_label))

    def _idmap_views(self, rundir: Path, shares: list[mounts.Share]) -> None:
        """Let QEMU act on read-write shares as root acts on the host, from a user namespace of its own (idmap.py)."""
        assert self.spec.user is not None

        def draw(rng: random.Random) -> str:
            return f"ids-{rng.randrange(idmap.ID_SLOTS)}"

        self._ids = reservations.reserve_random(runtime.runtime_base() / "ids", draw, "id range for QEMU's user namespace")
        self._stack.callback(self._ids.release)
        base = idmap.slot_base(int(self._ids.name.removeprefix("ids-")))
        id_map = idmap.shifted_map(base)
        self._userns = idmap.make_userns(id_map, id_map)
        self._stack.callback(os.close, self._userns)
        self._host_id = base
        trees = [("/", False)] + [(str(s.host), s.writable) for s in shares]
        for i, (path, writable) in enumerate(trees):
            if path in self._views:
                continue
            try:
                fd = idmap.idmapped_clone(path, self._userns, readonly=not writable)
            except OSError as exc:
                raise ConfinementError(
                    f"cannot share {path} read-write with QEMU as an unprivileged user: its filesystem has no idmapped mounts "
                    f"({os.strerror(exc.errno or 0)}); --qemu-user root runs QEMU as root instead"
                ) from None
            self._stack.callback(os.close, fd)
            name = f"view{i}"
            (rundir / name).mkdir(mode=0o700)
            self._views[path] = (fd, name)

    @property
    def qemu_ids(self) -> tuple[int, int] | None:
        """QEMU's uid and gid on the host (None: the launcher's own)."""
        if self._host_id is not None:
            return self._host_id, self._host_id
        return (self.spec.user.uid, self.spec.user.gid) if self.spec.user is not None else None

    def export_path(self, host: Path) -> Path:
        """The path QEMU exports for host directory `host` (relative to its cwd when idmapped)."""
        view = self._views.get(str(host))
        return Path(view[1]) if view else host

    def _allocate_label(self) -> None:
        if self.spec.static_label:
            ctx = mcs.Context.parse(self.spec.static_label)
            self.process_label = str(ctx)
            self.file_label = str(mcs.Context(ctx.user, "object_r", "svirt_image_t", ctx.level))
            pair = re.fullmatch(r"s0:c(\d+),c(\d+)", ctx.level)
            if pair:  # a fixed pair still may not be shared with a live sandbox
                self._reservation = mcs.reserve_static(runtime.runtime_base() / "mcs", (int(pair[1]), int(pair[2])))
            return
        self._reservation = mcs.reserve(runtime.runtime_base() / "mcs")
        proc, image = mcs.sandbox_contexts(self._reservation.pair)
        self.process_label, self.file_label = str(proc), str(image)

    # ---- in the forked child, before exec ----------------------------------

    def preexec(self) -> None:
        """Runs in the child between fork and exec; raises to abort the exec."""
        if self._cgroup is not None:
            self._cgroup.join()
        if self.spec.namespaces:
            _unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWPID)
            self._become_pid1()
            # Our mounts stay ours, and QEMU (and through it the 9p export)
            # sees no other sandbox's runtime dir; our own is our cwd already.
            _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
            for fd, name in self._views.values():
                idmap.attach(fd, name)  # relative to our cwd, the runtime dir
            if self._hidden and os.path.isdir(self._hidden):
                _mount("tmpfs", self._hidden, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=755")
        user = self.spec.user
        if user is not None:
            # In its own user namespace (read-write shares) QEMU is root
            # there and a reserved unprivileged id on the host; otherwise
            # it is `nobody` (--qemu-user) on the host.
            uid, gid = (0, 0) if self._userns is not None else (user.uid, user.gid)
            if self._userns is not None:
                idmap.join_userns(self._userns)
            if _libc.prctl(PR_SET_SECUREBITS, SECURE_NOROOT_NOFIXUP, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECUREBITS)")
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            keep_capabilities(SHARE_CAPS if self._userns is not None else READ_ONLY_CAPS)
        # Credential changes clear the parent-death signal: set it again.
        parent = os.getppid()
        set_parent_death_signal()
        if os.getppid() != parent:
            os._exit(1)
        if self.process_label:
            libselinux.set_exec_label(self.process_label)

    def _become_pid1(self) -> None:
        """Fork into the new PID namespace; the parent stays as a reaper that relays status.

        unshare(CLONE_NEWPID) moves only future children, so QEMU must be
        one.  The middle process closes every fd (so the launcher sees the
        exec happen), waits, and exits as QEMU did.
        """
        child = os.fork()
        if child == 0:
            set_parent_death_signal()
            return
        os.closerange(3, 65536)
        set_name("sandbox-reaper")
        # Stop requests go to QEMU itself (QMP, or a signal to its pid);
        # a stray signal for the launcher's name must not end the VM here.
        ignore(FORWARDED)
        _, status = os.waitpid(child, 0)
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))

    # ---- while QEMU runs ------------------------------------------------------

    def started(self, pid: int, rundir: Path) -> None:
        """QEMU was spawned as `pid` (the PID-namespace reaper when namespaces are on)."""
        self._started = time.time()
        self._run = rundir.name
        self.qemu_pid = find_qemu(pid) if self.spec.namespaces else pid
        self._audit(
            "start",
            user=_username(os.getuid()),
            uid=os.getuid(),
            label=self.process_label,
            qemu_pid=self.qemu_pid,
            qemu_uid=self.qemu_ids[0] if self.qemu_ids else os.getuid(),
            run=rundir.name,
            command=audit.summarize_argv(self.argv),
            shares=["/ (read-only)", *self.shares],
            rundir=str(rundir),
        )

    def served(self, command: dict[str, object], client_pid: int) -> None:
        """A pooled QEMU (started for no command yet) was handed to a run of `command` (summarized), launched as `client_pid`."""
        self._audit("serve", user=_username(os.getuid()), label=self.process_label, qemu_pid=self.qemu_pid, run=self._run,
                    command=command, launcher_pid=client_pid)  # fmt: skip

    # ---- after QEMU ---------------------------------------------------------

    def _finish(self) -> None:
        """Release everything, restore labels, and write the stop record."""
        try:
            self._stack.close()
        finally:
            if self._cgroup is not None:
                self._cgroup.remove()
                self._cgroup = None
            if self._reservation is not None:
                self._reservation.release()
                self._reservation = None
            if self._started:
                self._audit(
                    "stop",
                    user=_username(os.getuid()),
                    label=self.process_label,
                    qemu_pid=self.qemu_pid,
                    run=self._run,
                    exit_status=self._status,
                    duration_s=round(time.time() - self._started, 3),
                )
                self._started = 0.0

    def oom_killed(self) -> bool:
        """Whether the host's OOM killer struck inside QEMU's cgroup."""
        return self._cgroup is not None and self._cgroup.oom_kills() > 0

    def _audit(self, event: str, **fields: object) -> None:
        try:
            audit.record(event, **fields)
        except OSError as exc:
            log.warning("cannot write the audit log %s: %s", audit.log_path(), exc.strerror)


def _username(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def find_qemu(reaper: int, timeout: float = 2.0) -> int:
    """The QEMU process under the PID-namespace reaper (its only child)."""
    deadline = time.monotonic() + timeout
    path = Path(f"/proc/{reaper}/task/{reaper}/children")
    while time.monotonic() < deadline:
        try:
            kids = path.read_text().split()
        except OSError:
            return reaper
        if kids:
            return int(kids[0])
        time.sleep(0.001)
    return reaper


def resolve(opts: ConfinementOptions) -> ConfinementSpec:
    """The walls `sandbox run` asked for, checked against this host (one-line errors)."""
    mode = opts.security
    if opts.label and not opts.label.startswith("static:"):
        raise UsageError("--label takes static:LABEL")
    selinux_on = libselinux.enabled()
    if mode == "selinux" and not selinux_on:
        raise ConfinementError("--security selinux: SELinux is not enabled on this host")
    use_selinux = mode == "selinux" or (mode == "auto" and selinux_on)
    if opts.label and not use_selinux:
        raise ConfinementError("--label needs SELinux, which is not in use here")
    root = os.geteuid() == 0
    if opts.qemu_user is not None and not root:
        # Accepted, it would read as if QEMU ran as that user.
        raise UsageError(f"--qemu-user {opts.qemu_user}: only a sandbox started as root changes QEMU's user (here QEMU runs as you)")
    if not root:
        log.info("started as a normal user: QEMU keeps your uid and shares your namespaces")
    return ConfinementSpec(
        selinux=use_selinux,
        static_label=opts.label.removeprefix("static:") if opts.label else None,
        show_label=opts.show_label,
        user=resolve_user(opts.qemu_user),
        namespaces=root,
        limits=cgroups.Limits(opts.memory_limit, opts.cpu_weight, opts.cpu_quota, opts.pids_limit),
        strict_limits=opts.limits == "strict",
    )
