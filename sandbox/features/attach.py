"""`sandbox attach PID`: adopt a QEMU someone launched by hand, described from its command line and marked tainted."""

from __future__ import annotations

import os
import pwd
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.features import registry
from sandbox.core import sizes
from sandbox.core.process import start_ticks, status_fields
from sandbox.core.errors import UsageError
from sandbox.core import unixsock


@dataclass(frozen=True)
class Described:
    """What a QEMU command line says about its machine."""

    name: str | None = None
    machine: str = ""
    memory_mb: int = 128  # QEMU's default
    cpus: int = 1
    kernel: str = ""
    accel: str = ""
    monitor: str | None = None  # a QMP server on a UNIX socket
    disks: tuple[str, ...] = ()
    shares: tuple[str, ...] = ()
    network: tuple[str, ...] = ()
    sandboxed: bool = False  # -sandbox on
    taint_flags: tuple[str, ...] = field(default=())


def _opts(value: str) -> tuple[str, dict[str, str]]:
    """QEMU's "first,key=value,..." syntax (",," is a comma); the first item if it has no '='."""
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    parts.append(cur)
    first = "" if "=" in parts[0] else parts.pop(0)
    pairs = [p.partition("=") for p in parts if p]
    return first, {k: v if sep else "on" for k, sep, v in pairs}


def describe(argv: list[str]) -> Described:
    """The machine a QEMU argv asks for (a pure function of the argv)."""
    args: list[tuple[str, str]] = []
    i = 1
    while i < len(argv):
        opt = argv[i]
        if opt.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            args.append((opt.lstrip("-"), argv[i + 1]))
            i += 2
        else:
            args.append((opt.lstrip("-"), ""))
            i += 1
    d: dict[str, object] = {}
    chardev_paths: dict[str, str] = {}
    control_chardevs: list[str] = []
    disks: list[str] = []
    shares: list[str] = []
    network: list[str] = []
    for opt, value in args:
        first, kv = _opts(value) if value else ("", {})
        if opt == "name":
            d["name"] = kv.get("guest", first) or None
        elif opt in ("machine", "M"):
            d["machine"] = first or kv.get("type", "")
            if "accel" in kv:
                d["accel"] = kv["accel"]
        elif opt == "accel":
            d["accel"] = first
        elif opt == "enable-kvm":
            d["accel"] = "kvm"
        elif opt == "m":
            d["memory_mb"] = sizes.parse_mb(first or kv.get("size", "128")) or 0
        elif opt == "smp":
            d["cpus"] = int(first or kv.get("cpus", "1"))
        elif opt == "kernel":
            d["kernel"] = value
        elif opt == "qmp" and first.startswith("unix:"):
            d["monitor"] = first[5:]
        elif opt == "chardev" and first == "socket" and "path" in kv and kv.get("server") in ("on", "true", "yes"):
            chardev_paths[kv.get("id", "")] = kv["path"]
        elif opt == "mon" and kv.get("mode") == "control":
            control_chardevs.append(kv.get("chardev", first))
        elif opt == "drive":
            disks.append(kv.get("file", "(no file)"))
        elif opt in ("hda", "hdb", "hdc", "hdd", "cdrom"):
            disks.append(value)
        elif opt == "fsdev" and "path" in kv:
            shares.append(f"{kv['path']} ({'read-only' if kv.get('readonly') in ('on', 'true') else 'read-write'})")
        elif opt == "virtfs" and "path" in kv:
            shares.append(f"{kv['path']} ({'read-only' if kv.get('readonly') in ('on', 'true') else 'read-write'})")
        elif opt in ("netdev", "nic", "net"):
            network.append(first or value)
        elif opt == "sandbox":
            d["sandboxed"] = first == "on"
    if "monitor" not in d:
        for chardev in control_chardevs:
            if chardev in chardev_paths:
                d["monitor"] = chardev_paths[chardev]
                break
    return Described(**d, disks=tuple(disks), shares=tuple(shares), network=tuple(network))  # type: ignore[arg-type]


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def taint_reasons(pid: int, desc: Described) -> tuple[str, ...]:
    """Why this QEMU is not held to our walls, in the manner of libvirt's taint flags."""
    reasons = ["externally launched", "custom monitor"]
    st = status_fields(pid)
    if st.get("Uid", "").split()[:1] == ["0"]:
        reasons.append("runs as root")
    own_ns = all(os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}") for ns in ("mnt", "pid"))
    if st.get("Seccomp", "0").strip() == "0" or not desc.sandboxed or not own_ns:
        reasons.append("unconfined")
    return tuple(reasons)


def check_monitor(path: str) -> None:
    """The QMP socket answers (the same client as for our own QEMUs)."""
    from sandbox.backends.direct.monitor import Monitor

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unixsock.connect(sock, path)
    except OSError as exc:
        sock.close()
        raise UsageError(f"its monitor {path} does not answer ({exc.strerror})") from None
    monitor = Monitor(sock)
    try:
        if not monitor.connect(5.0):
            raise UsageError(f"its monitor {path} does not speak QMP")
    finally:
        monitor.close()
        sock.close()


def attach(pid: int, name: str | None) -> registry.Entry:
    """Adopt QEMU process `pid` as a sandbox; a one-line UsageError if it is not a QEMU with a usable monitor."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        argv = [a.decode("utf-8", "surrogateescape") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    except FileNotFoundError:
        raise UsageError(f"no process {pid}") from None
    except PermissionError:
        raise UsageError(f"process {pid} is not yours to attach") from None
    if not Path(exe.removesuffix(" (deleted)")).name.startswith("qemu-system"):
        raise UsageError(f"process {pid} is not QEMU ({exe})")
    desc = describe(argv)
    if desc.monitor is None:
        raise UsageError(f"QEMU {pid} has no QMP monitor on a UNIX socket (-qmp unix:PATH,server=on or -chardev socket,path=...,server=on with -mon mode=control)")
    monitor = desc.monitor if os.path.isabs(desc.monitor) else os.path.join(os.readlink(f"/proc/{pid}/cwd"), desc.monitor)
    check_monitor(monitor)
    started = start_ticks(pid)
    if started is None:
        raise UsageError(f"no process {pid}")
    for other in registry.entries():
        r = other.record()
        if r.qemu_pid == pid and other.running():
            how = "attached as" if r.attached else "the QEMU of"
            raise UsageError(f"QEMU {pid} is already {how} sandbox {other.name!r}")
    record = registry.Record(
        name=registry.check_name(name if name is not None else desc.name or f"qemu-{pid}"),
        uuid=str(uuid.uuid4()),
        argv=tuple(argv),
        created=time.time(),
        launcher_pid=pid,
        detached=False,  # not one of ours run in the background: `attached` says what it is
        keep=False,
        user=_user(int(status_fields(pid).get("Uid", "0").split()[0])),
        qemu_pid=pid,
        accel=desc.accel or "tcg",
        kernel=desc.kernel,
        memory_mb=desc.memory_mb,
        cpus=desc.cpus,
        shares=desc.shares,
        network=", ".join(desc.network) or "none",
        start="attached",
        taint=taint_reasons(pid, desc),
        keyboard=True,  # its own keyboard, whatever it is
        attached=True,
        monitor=monitor,
        qemu_started=started,
        machine=desc.machine,
        disks=desc.disks,
    )
    return registry.add_attached(record)
