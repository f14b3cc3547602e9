"""A private libvirtd for the tests: its own state, config and sockets, none of the host's.

    unshare --mount --propagation private python3 tests/libvirtd_private.py WORKDIR TCP_PORT

In its own mount namespace it binds WORKDIR/{run,lib,cache,log,etc} over
/run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and
/etc/libvirt, so that it never meets a libvirtd the host may run, and
starts virtlogd and libvirtd (listening on TCP 127.0.0.1:TCP_PORT, no
auth) as its children.  It is their reaper (PR_SET_CHILD_SUBREAPER): the
QEMUs libvirtd daemonizes are reaped at once, not by a slow PID 1.
Clients reach it as qemu+unix:///system?socket=WORKDIR/run/libvirt-sock
or qemu+tcp://127.0.0.1:TCP_PORT/system.  SIGTERM ends it all.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
MS_BIND = 4096
BINDS = {"run": "/run/libvirt", "lib": "/var/lib/libvirt", "cache": "/var/cache/libvirt", "log": "/var/log/libvirt", "etc": "/etc/libvirt"}


def main() -> int:
    work, port = Path(sys.argv[1]), sys.argv[2]
    libc = ctypes.CDLL(None, use_errno=True)
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
        f'listen_tls = 0\nlisten_tcp = 1\ntcp_port = "{port}"\nlisten_addr = "127.0.0.1"\nauth_tcp = "none"\n'
        'unix_sock_group = "root"\nunix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\n'
    )
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    log = open(work / "daemons.log", "ab")
    virtlogd = subprocess.Popen(["virtlogd"], stdout=log, stderr=log)
    for _ in range(200):
        if Path("/run/libvirt/virtlogd-sock").exists():
            break
        time.sleep(0.02)
    libvirtd = subprocess.Popen(["libvirtd", "--listen", "--pid-file", str(work / "libvirtd.pid")], stdout=log, stderr=log)
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
