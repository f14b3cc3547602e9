"""--net user: passt, the unprivileged user-mode network, over a socket QEMU gets as a descriptor.

The guest's packets become the host's own sockets (so anyone can use it,
and nothing reaches the guest: no port is forwarded), IPv4 and IPv6.
passt runs as the launcher's child, sandboxes itself (and drops to
`nobody` when started as root), and quits when its socket's other end
closes: with QEMU, or with a launcher killed before QEMU ran.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sandbox.core import process
from sandbox.core.process import set_parent_death_signal
from sandbox.net import wall
from sandbox.net.links import NetworkError, has_default_route

# What the guest sees (QEMU's slirp numbers, which users know).
GUEST_IPV4 = "10.0.2.15"
PREFIX_LEN = 24
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"  # passt forwards queries sent here to the host's resolver
# passt's own (what its DHCP and RAs would announce): 40 times fewer frames
# than Ethernet's 1500 for the guest to make and passt to take apart.
MTU = 65520


def argv(passt: str, fd: int, ipv4: bool, ipv6: bool, host: bool = False) -> list[str]:
    """passt in the foreground on descriptor `fd`, for one guest, forwarding no ports.

    `host` (--net user,host): the gateway address reaches the host's own
    loopback, as slirp's 10.0.2.2 does; otherwise it is nothing.
    """
    args = [passt, "--foreground", "--quiet", "--one-off", "--fd", str(fd), "-t", "none", "-u", "none"]
    if not host:
        args.append("--no-map-gw")
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
def start(rundir: Path, host: bool = False) -> Iterator[Passt]:
    """A running passt and the socket QEMU talks to it through; walled off from the host unless `host`."""
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
        child_fds: list[int] = []
        setup: Callable[[], None] | None = None
        taken: list[int | BaseException] = []
        taker = None
        if not host:
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
            ack_r, ack_w = os.pipe2(os.O_CLOEXEC)
            child_fds = [report_w, ack_r]
            for fd in (report_r, ack_w):
                stack.callback(os.close, fd)
            own_userns = os.geteuid() != 0

            def setup() -> None:
                wall.child_setup(report_w, ack_r, own_userns)
                set_parent_death_signal()  # a new user namespace clears it

            def take() -> None:
                try:
                    taken.append(wall.take_listener(report_r, ack_w))
                except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                    taken.append(exc)

            # Popen waits for the exec, and the child waits for us to have
            # taken its listener: the taking happens in a thread.
            taker = threading.Thread(target=take, name="sandbox-netwall-take", daemon=True)
            taker.start()
        try:
            proc = process.spawn(argv(binary, ours.fileno(), ipv4, ipv6, host), rundir / "passt.log", (ours.fileno(),), preexec=setup)
        finally:
            for fd in child_fds:
                os.close(fd)
        stack.callback(lambda: process.stop(proc, timeout=2.0))
        if taker is not None:
            taker.join(10)
            got = taken[0] if taken else NetworkError("--net user: passt's network wall was never set up")
            if isinstance(got, BaseException):
                raise NetworkError(f"--net user: cannot wall passt off from the host ({got})")
            resolvers = wall.host_resolvers(_read("/etc/resolv.conf"))
            stack.callback(wall.Wall(got, resolvers).close)
        ours.close()
        yield Passt(theirs.fileno(), ipv4, ipv6)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read(1 << 16)
    except OSError:
        return ""
