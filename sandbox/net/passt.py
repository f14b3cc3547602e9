"""--net user: passt, the unprivileged user-mode network, over a socket QEMU gets as a descriptor.

The guest's packets become the host's own sockets (so anyone can use it,
and nothing reaches the guest: no port is forwarded), IPv4 and IPv6.
passt runs as the launcher's child, sandboxes itself (and drops to
`nobody` when started as root), and quits when its socket's other end
closes: with QEMU, or with a launcher killed before QEMU ran.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..process import set_parent_death_signal
from .links import NetworkError, has_default_route

# What the guest sees (QEMU's slirp numbers, which users know).
GUEST_IPV4 = "10.0.2.15"
PREFIX_LEN = 24
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"  # passt forwards queries sent here to the host's resolver
# passt's own (what its DHCP and RAs would announce): 40 times fewer frames
# than Ethernet's 1500 for the guest to make and passt to take apart.
MTU = 65520


def argv(passt: str, fd: int, ipv4: bool, ipv6: bool) -> list[str]:
    """passt in the foreground on descriptor `fd`, for one guest, forwarding no ports."""
    args = [passt, "--foreground", "--quiet", "--one-off", "--fd", str(fd), "--no-map-gw", "-t", "none", "-u", "none"]
    if ipv4:
        args += ["--address", GUEST_IPV4, "--netmask", str(PREFIX_LEN), "--gateway", GATEWAY, "--dns-forward", DNS]
    else:
        args.append("--ipv6-only")
    if not ipv6:
        args.append("--ipv4-only")
    return args


@dataclass(frozen=True)
class Passt:
    fd: int  # QEMU's end
    ipv4: bool
    ipv6: bool


@contextlib.contextmanager
def start(rundir: Path) -> Iterator[Passt]:
    """A running passt and the socket QEMU talks to it through."""
    ipv4, ipv6 = has_default_route(2), has_default_route(10)
    if not ipv4 and not ipv6:
        raise NetworkError("--net user: this host has no default route (neither IPv4 nor IPv6)")
    binary = shutil.which("passt", path="/usr/bin:/usr/sbin:/bin:/sbin")
    if binary is None:
        raise NetworkError("--net user needs passt (apt-get install passt)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.ExitStack() as stack:
        stack.callback(theirs.close)
        stack.callback(ours.close)
        log = open(rundir / "passt.log", "wb")
        stack.callback(log.close)
        proc = subprocess.Popen(
            argv(binary, ours.fileno(), ipv4, ipv6),
            pass_fds=(ours.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=set_parent_death_signal,
        )

        def end() -> None:
            proc.terminate()
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        stack.callback(end)
        ours.close()
        yield Passt(theirs.fileno(), ipv4, ipv6)
