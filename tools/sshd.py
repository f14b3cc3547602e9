#!/usr/bin/env python3
"""A private sshd on 127.0.0.1, key-only, for reaching a libvirtd over qemu+ssh:// in tests and benchmarks.

    tools/sshd.py WORKDIR PORT [--mount-ns-of PID]

Generates in WORKDIR a host key, a client key pair (authorized for root
alone), the client's known_hosts with the host key in it, an ssh_config
that uses that file and nothing of ~/.ssh (ssh reads the passwd entry's
home, never $HOME), an `ssh` wrapper that passes it, and the sshd_config;
prints the libvirt URI that reaches this sshd's host, one line, and runs
`sshd -D` until SIGTERM.  Nothing of the system's sshd is touched: its
own config, keys and pid file, loopback only, root login by key only, no
passwords, no forwarding; only the privilege-separation directory sshd
insists on (/run/sshd) is made when missing, and removed again.

--mount-ns-of PID runs sshd in that process's mount namespace (a
tools/libvirtd.py --private daemon's): the sessions' `virt-ssh-helper
qemu:///system` then reaches that daemon at /run/libvirt/libvirt-sock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

PRIVSEP = Path("/run/sshd")


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sandbox-test", "-f", str(path)], check=True, stdin=subprocess.DEVNULL)


def write_files(work: Path, port: int) -> str:
    """Keys and configs in `work`; the libvirt URI for them."""
    keygen(work / "host_ed25519")
    keygen(work / "id_ed25519")
    (work / "authorized_keys").write_text((work / "id_ed25519.pub").read_text())
    host_key = (work / "host_ed25519.pub").read_text().split()[:2]
    (work / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    (work / "ssh_config").write_text(
        "Host *\n"
        f"  UserKnownHostsFile {work}/known_hosts\n"
        "  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n"
        "  IdentitiesOnly yes\n"
        "  BatchMode yes\n"
    )
    wrapper = work / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec ssh -F {work}/ssh_config "$@"\n')
    wrapper.chmod(0o755)
    (work / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:{port}\n"
        f"HostKey {work}/host_ed25519\n"
        f"PidFile {work}/sshd.pid\n"
        f"AuthorizedKeysFile {work}/authorized_keys\n"
        "AllowUsers root\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        # The files sit in a temp dir under /tmp, whose mode StrictModes rejects.
        "StrictModes no\n"
        "AllowTcpForwarding no\n"
        "AllowAgentForwarding no\n"
        "X11Forwarding no\n"
        "PermitTunnel no\n"
        "LogLevel ERROR\n"
    )
    return f"qemu+ssh://root@127.0.0.1:{port}/system?keyfile={work}/id_ed25519&command={wrapper}&no_tty=1"


def main() -> int:
    args = sys.argv[1:]
    if len(args) not in (2, 4) or (len(args) == 4 and args[2] != "--mount-ns-of"):
        sys.exit(__doc__)
    work, port = Path(args[0]), int(args[1])
    uri = write_files(work, port)
    made = not PRIVSEP.exists()
    if made:
        PRIVSEP.mkdir(mode=0o755)
    enter = ["nsenter", f"--mount=/proc/{args[3]}/ns/mnt"] if len(args) == 4 else []
    log = open(work / "sshd.log", "ab")
    sshd = subprocess.Popen([*enter, "/usr/sbin/sshd", "-D", "-e", "-f", str(work / "sshd_config")], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    signal.signal(signal.SIGTERM, lambda _s, _f: sshd.terminate())
    print(uri, flush=True)
    try:
        while True:
            try:
                return sshd.wait()
            except InterruptedError:
                continue
    finally:
        if made:
            try:
                PRIVSEP.rmdir()
            except OSError:
                pass  # another sshd uses it now


if __name__ == "__main__":
    sys.exit(main())
