#!/usr/bin/env python3
"""virtlogd and libvirtd on a machine without systemd, under a parent that reaps their children.

    tools/libvirtd.py --ensure
        The host's own daemons (qemu:///system): unless a libvirtd answers on
        /run/libvirt/libvirt-sock, start them detached (as --background) and
        wait until one answers.  What setup.sh runs.  A socket file alone
        proves nothing: a daemon killed with its session leaves it behind.
    tools/libvirtd.py --background
        The host's own daemons, detached, without waiting.
    unshare --mount --propagation private tools/libvirtd.py --private WORKDIR TCP_PORT [--empty-boot] [--auth-sasl] [--socket-group GROUP]
        A private one for the tests: in its own mount namespace it binds
        WORKDIR/{run,lib,cache,log,etc} over /run/libvirt, /var/lib/libvirt,
        /var/cache/libvirt, /var/log/libvirt and /etc/libvirt, so that it
        never meets the host's, and listens on TCP 127.0.0.1:TCP_PORT without
        auth.  Clients: qemu+unix:///system?socket=WORKDIR/run/libvirt-sock or
        qemu+tcp://127.0.0.1:TCP_PORT/system.  --empty-boot hides /boot (a
        host with no kernel to offer); --auth-sasl asks TCP clients for SASL
        credentials (which nobody has: authentication refused);
        --socket-group lets that group's members use the UNIX socket too
        (read-write, as a libvirt group would; WORKDIR must let them reach it).

This process is the daemons' reaper (PR_SET_CHILD_SUBREAPER): the QEMUs
libvirtd daemonizes are reaped at once, not by a slow PID 1 (which cost
virsh create 2 s here).  SIGTERM ends it all.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
MS_BIND = 4096
SYSTEM_SOCKET = "/run/libvirt/libvirt-sock"
BINDS = {"run": "/run/libvirt", "lib": "/var/lib/libvirt", "cache": "/var/cache/libvirt", "log": "/var/log/libvirt", "etc": "/etc/libvirt"}


def private(work: Path, port: str, empty_boot: bool, sasl: bool, group: str, libc: ctypes.CDLL) -> None:
    if empty_boot:
        # A libvirt host without a kernel to offer (for the error's test).
        (work / "boot").mkdir(parents=True, exist_ok=True)
        if libc.mount(str(work / "boot").encode(), b"/boot", None, MS_BIND, None) != 0:
            raise OSError(ctypes.get_errno(), "bind an empty /boot")
    for sub, target in BINDS.items():
        src = work / sub
        if sub == "etc":
            shutil.copytree("/etc/libvirt", src, dirs_exist_ok=True)
        src.mkdir(parents=True, exist_ok=True)
        os.makedirs(target, exist_ok=True)
        if libc.mount(str(src).encode(), target.encode(), None, MS_BIND, None) != 0:
            raise OSError(ctypes.get_errno(), f"bind {src} on {target}")
    Path("/var/lib/libvirt/qemu").mkdir(exist_ok=True)
    Path("/etc/libvirt/libvirtd.conf").write_text(
        f'listen_tls = 0\nlisten_tcp = 1\ntcp_port = "{port}"\nlisten_addr = "127.0.0.1"\nauth_tcp = "{"sasl" if sasl else "none"}"\n'
        f'unix_sock_group = "{group}"\nunix_sock_rw_perms = "{"0770" if group != "root" else "0700"}"\nauth_unix_rw = "none"\n'
    )


def answers(path: str) -> bool:
    """Whether a daemon accepts connections on the unix socket at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def ensure() -> int:
    if answers(SYSTEM_SOCKET):
        return 0
    subprocess.run([sys.executable, os.path.abspath(__file__), "--background"], check=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if answers(SYSTEM_SOCKET):
            return 0
        time.sleep(0.2)
    sys.stderr.write(f"libvirtd did not answer on {SYSTEM_SOCKET} within 30 s: see /var/log/libvirt/daemons.log\n")
    return 1


def main() -> int:
    args = sys.argv[1:]
    if args == ["--ensure"]:
        return ensure()
    libc = ctypes.CDLL(None, use_errno=True)
    if args[:1] == ["--private"]:
        work = Path(args[1])
        group = args[args.index("--socket-group") + 1] if "--socket-group" in args else "root"
        private(work, args[2], "--empty-boot" in args, "--auth-sasl" in args, group, libc)
        daemon_args = ["--listen", "--pid-file", str(work / "libvirtd.pid")]
        logd_args = ["--pid-file", str(work / "virtlogd.pid")]
    elif args == ["--background"]:
        work = Path("/var/log/libvirt")
        work.mkdir(parents=True, exist_ok=True)
        if os.fork():
            return 0  # the caller goes on; the daemons' reaper stays
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        daemon_args, logd_args = [], []
    else:
        sys.exit(__doc__)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    log = open(work / "daemons.log", "ab")
    virtlogd = subprocess.Popen(["virtlogd", *logd_args], stdout=log, stderr=log)
    for _ in range(200):
        if Path("/run/libvirt/virtlogd-sock").exists():
            break
        time.sleep(0.02)
    libvirtd = subprocess.Popen(["libvirtd", *daemon_args], stdout=log, stderr=log)
    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        libvirtd.terminate()

    signal.signal(signal.SIGTERM, stop)
    while True:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if pid == libvirtd.pid:
            virtlogd.terminate()
            # Whatever libvirtd left (a domain's QEMU) goes with it.
            for child in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split():
                try:
                    os.kill(int(child), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not stopping:
                return 1


if __name__ == "__main__":
    sys.exit(main())
