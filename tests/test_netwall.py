"""--net user's wall (sandbox/net/wall.py) without a VM: the pure parts, and a real process under the real filter."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from sandbox.net import wall

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def sockaddr_in(addr: str, port: int) -> bytes:
    return struct.pack("<H", socket.AF_INET) + struct.pack(">H", port) + socket.inet_aton(addr) + bytes(8)


def sockaddr_in6(addr: str, port: int, scope: int = 0) -> bytes:
    return struct.pack("<H", socket.AF_INET6) + struct.pack(">HI", port, 0) + socket.inet_pton(socket.AF_INET6, addr) + struct.pack("<I", scope)


def test_sockaddrs_are_read_as_the_kernel_reads_them() -> None:
    assert wall.parse_sockaddr(sockaddr_in("192.0.2.7", 80)) == wall.Destination(V4("192.0.2.7"), 80)
    assert wall.parse_sockaddr(sockaddr_in6("fe80::1", 443, 3)) == wall.Destination(V6("fe80::1"), 443, 3)
    assert wall.parse_sockaddr(struct.pack("<H", socket.AF_UNSPEC) + bytes(14)) is None
    assert wall.parse_sockaddr(struct.pack("<H", socket.AF_UNIX) + b"\0X11-unix/X0") == socket.AF_UNIX
    # Truncated: an IP family without its address is no destination of ours.
    assert wall.parse_sockaddr(struct.pack("<H", socket.AF_INET) + b"\0\x50") == socket.AF_INET
    assert wall.parse_sockaddr(b"") is None


@pytest.mark.parametrize(
    "address, expected",
    [("::ffff:127.0.0.1", V4("127.0.0.1")), ("64:ff9b::c000:207", V4("192.0.2.7")), ("2001:db8::1", V6("2001:db8::1"))],
)
def test_ipv4_hidden_in_ipv6_is_judged_as_ipv4(address: str, expected: object) -> None:
    assert wall.effective(wall.Destination(V6(address), 1)).address == expected


def test_what_may_pass() -> None:
    own = {V4("192.0.2.2"), V4("127.0.0.1"), V6("::1")}

    def hosts_own(d: wall.Destination) -> bool:
        return d.address in own

    resolver = frozenset({V4("127.0.0.53")})
    dest = wall.Destination
    assert wall.allowed(dest(V4("198.51.100.1"), 80), hosts_own)
    assert not wall.allowed(dest(V4("192.0.2.2"), 80), hosts_own)
    assert not wall.allowed(dest(V6("::ffff:127.0.0.1"), 80), hosts_own)
    assert not wall.allowed(dest(V4("0.0.0.0"), 80), hosts_own)  # means loopback
    assert not wall.allowed(dest(V6("::"), 80), hosts_own)
    assert not wall.allowed(socket.AF_UNIX, hosts_own)
    assert wall.allowed(None, hosts_own)  # AF_UNSPEC, or no address at all
    # DNS to the host's own resolvers, and only their port 53.
    assert wall.allowed(dest(V4("127.0.0.53"), 53), lambda d: True, resolver)
    assert not wall.allowed(dest(V4("127.0.0.53"), 80), lambda d: True, resolver)


def test_resolvers_come_from_resolv_conf() -> None:
    text = "# c\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver bogus\nsearch example.com\n"
    assert wall.host_resolvers(text) == {V4("127.0.0.53"), V6("fe80::1")}


def _memory(blocks: dict[int, bytes]) -> object:
    def read(addr: int, size: int) -> bytes:
        for base, data in blocks.items():
            if base <= addr < base + len(data):
                return data[addr - base : addr - base + size]
        raise OSError(errno.EFAULT, "bad address")

    return read


def test_destinations_of_each_held_call_are_read_bounded() -> None:
    name_a, name_b = sockaddr_in("192.0.2.2", 53), sockaddr_in6("2001:db8::9", 80)
    hdr_a = wall.MSGHDR.pack(0x1000, len(name_a), 0, 0, 0, 0, 0)
    hdr_none = wall.MSGHDR.pack(0, 0, 0, 0, 0, 0, 0)
    hdr_b = wall.MSGHDR.pack(0x2000, 1 << 30, 0, 0, 0, 0, 0)  # a huge namelen: read as at most 128 bytes
    table = b"".join(h + bytes(8) for h in (hdr_a, hdr_none, hdr_b))
    mem = _memory({0x1000: name_a, 0x2000: name_b, 0x3000: hdr_a, 0x4000: table})
    assert wall.destinations(wall.NR_CONNECT, (3, 0x1000, 16, 0, 0, 0), mem) == [wall.parse_sockaddr(name_a)]  # type: ignore[arg-type]
    assert wall.destinations(wall.NR_SENDTO, (3, 0, 0, 0, 0x2000, 28), mem) == [wall.parse_sockaddr(name_b)]  # type: ignore[arg-type]
    assert wall.destinations(wall.NR_SENDMSG, (3, 0x3000, 0, 0, 0, 0), mem) == [wall.parse_sockaddr(name_a)]  # type: ignore[arg-type]
    # sendmmsg with a vlen far beyond its table: only what is there is read.
    found = wall.destinations(wall.NR_SENDMMSG, (3, 0x4000, 1 << 40, 0, 0, 0), mem)  # type: ignore[arg-type]
    assert found == [wall.parse_sockaddr(name_a), None, wall.parse_sockaddr(name_b)]
    with pytest.raises(OSError):
        wall.destinations(wall.NR_CONNECT, (3, 0x9999, 16, 0, 0, 0), mem)  # type: ignore[arg-type]


# A process under the real filter, answered by a real Wall: each line of
# its stdin is an action, each line of its stdout the errno it met (0: ok).
CHILD = r"""
import ctypes, errno, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
def attempt(f):
    try:
        f(); return 0
    except OSError as e:
        return e.errno
def connect(family, addr):
    s = socket.socket(family, socket.SOCK_STREAM); s.settimeout(2)
    try: return attempt(lambda: s.connect(addr))
    finally: s.close()
def udp(family, addr, how):
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if how == "sendto": return attempt(lambda: s.sendto(b"x", addr))
        return attempt(lambda: s.sendmsg([b"x"], [], 0, addr))
    finally: s.close()
def raw(nr):
    r = libc.syscall(nr, 0, 0, 0, 0, 0, 0)
    return ctypes.get_errno() if r < 0 else 0
for line in sys.stdin:
    kind, _, arg = line.strip().partition(" ")
    if kind == "tcp4": r = connect(socket.AF_INET, (arg.split()[0], int(arg.split()[1])))
    elif kind == "tcp6": r = connect(socket.AF_INET6, (arg.split()[0], int(arg.split()[1])))
    elif kind in ("sendto", "sendmsg"): r = udp(socket.AF_INET, (arg, 9), kind)
    elif kind == "unix": r = connect(socket.AF_UNIX, "\0" + arg)
    elif kind == "syscall": r = raw(int(arg, 0))
    print(r, flush=True)
"""


class Filtered:
    """A child under the wall's filter and the Wall answering it."""

    def __init__(self) -> None:
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        ack_r, ack_w = os.pipe2(os.O_CLOEXEC)
        taken: list[int] = []
        taker = threading.Thread(target=lambda: taken.append(wall.take_listener(report_r, ack_w)))
        taker.start()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=(report_w, ack_r),
            preexec_fn=lambda: wall.child_setup(report_w, ack_r, own_userns=False),
        )  # fmt: skip
        for fd in (report_w, ack_r):
            os.close(fd)
        taker.join(10)
        for fd in (report_r, ack_w):
            os.close(fd)
        self.wall: wall.Wall | None = wall.Wall(taken[0], [])

    def ask(self, action: str) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(action + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close_wall(self) -> None:
        if self.wall is not None:
            self.wall.close()
            self.wall = None

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.close_wall()


@pytest.fixture
def filtered() -> Iterator[Filtered]:
    f = Filtered()
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP server on every address of this host (the kind the wall keeps the guest from)."""
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 0))
    s.listen()
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def _own_addresses() -> list[str]:
    out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    return [w.split("/")[0] for line in out.splitlines() for i, w in enumerate(line.split()) if i > 0 and line.split()[i - 1] in ("inet", "inet6")]


def test_a_filtered_process_reaches_none_of_the_hosts_addresses(filtered: Filtered, listener: int) -> None:
    addresses = [a for a in _own_addresses() if not a.startswith("fe80")]
    assert "127.0.0.1" in addresses and len(addresses) >= 3
    for addr in addresses:
        assert filtered.ask(f"tcp{6 if ':' in addr else 4} {addr} {listener}") == errno.EACCES, addr
    for addr in ("0.0.0.0", "127.9.9.9"):
        assert filtered.ask(f"tcp4 {addr} {listener}") == errno.EACCES, addr
    assert filtered.ask(f"tcp6 ::ffff:127.0.0.1 {listener}") == errno.EACCES
    # Datagrams too, whichever call sends them, and abstract UNIX sockets.
    assert filtered.ask("sendto 127.0.0.1") == errno.EACCES
    assert filtered.ask("sendmsg 127.0.0.1") == errno.EACCES
    assert filtered.ask("unix some-abstract-socket") == errno.EACCES
    # What would bypass the filter is refused outright: io_uring, the x32 ABI's connect.
    assert filtered.ask(f"syscall {wall.NR_IO_URING_SETUP}") == errno.ENOSYS
    assert filtered.ask(f"syscall {wall.X32_SYSCALL_BIT | wall.NR_CONNECT}") == errno.ENOSYS


def test_other_destinations_pass(filtered: Filtered) -> None:
    # Not this host's: the call goes on (whatever the network then says).
    assert filtered.ask("sendto 198.51.100.77") not in (errno.EACCES, errno.ENOSYS)


def test_without_its_supervisor_the_wall_fails_closed(filtered: Filtered, listener: int) -> None:
    assert filtered.ask("sendto 198.51.100.77") != errno.ENOSYS
    filtered.close_wall()
    assert filtered.ask(f"tcp4 127.0.0.1 {listener}") == errno.ENOSYS
    assert filtered.ask("sendto 198.51.100.77") == errno.ENOSYS


@pytest.mark.parametrize("address", ["127.0.0.1", "127.3.4.5", "::1", "198.51.100.77", "2001:db8::77", "255.255.255.255", "224.0.0.1"])
def test_the_routing_question_agrees_with_ip_route_get(address: str) -> None:
    proc = subprocess.run(["ip", "route", "get", address], capture_output=True, text=True, check=False)
    words = proc.stdout.split()
    own = bool(words) and words[0] in ("local", "broadcast", "multicast", "anycast")
    routes = wall.Routes()
    try:
        assert routes.hosts_own(wall.Destination(ipaddress.ip_address(address), 80)) == own, proc.stdout
    finally:
        routes.close()
