"""Runs as root inside a guest, on the guest kernel's own cgroup v2 tree:
drives sandbox.confinement.cgroups as the launcher would on a v2-only host.

Prints one line per fact for the host-side test to check.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sandbox.confinement import cgroups


def main() -> int:
    subprocess.run(["mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"], check=True)
    print("own", Path("/proc/self/cgroup").read_text().strip())
    group = cgroups.create("check", cgroups.Limits(memory_mb=64, cpu_weight=50, cpu_quota=0.5, pids=8))
    if group is None:
        print("created none")
        return 1
    d = group.dirs[0]
    print("version", group.version)
    print("dir", d)
    for name in ("memory.max", "pids.max", "cpu.weight", "cpu.max"):
        print(name, (d / name).read_text().strip())
    # A process joins in its child before exec, as QEMU does; then it
    # forks until refused: pids.max (8) leaves room for itself and 7 more.
    child = (
        "import os, sys, time\n"
        "print(open('/proc/self/cgroup').read().strip(), flush=True)\n"
        "n = 0\n"
        "for _ in range(20):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as e:\n"
        "        print('refused', e.strerror, flush=True)\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
        "print(n, flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child],
        preexec_fn=group.join,
        start_new_session=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    print("member", proc.stdout.readline().decode().strip())
    print("fork", proc.stdout.readline().decode().strip())
    print("forked", proc.stdout.readline().decode().strip())
    print("pids.current", (d / "pids.current").read_text().strip())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(100):  # the killed children leave the group as they are reaped
        if (d / "pids.current").read_text().strip() == "0":
            break
        time.sleep(0.05)
    group.remove()
    print("removed", not d.exists())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
