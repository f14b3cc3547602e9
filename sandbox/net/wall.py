"""--net user's wall: passt may reach the world, but no address the host owns.

passt turns the guest's connections into the host's own sockets, so
without a wall a guest reaches every service listening on any of the
host's addresses (a database on 0.0.0.0, a dev server, a container API).
Firewall rules would need root; this works for every user.  passt runs
under a seccomp filter (installed before its exec, so it cannot be shed)
that hands each `connect`, `sendto` with an address, `sendmsg` and
`sendmmsg` to the launcher (SECCOMP_RET_USER_NOTIF).  The launcher reads
the destination from passt's memory, asks the kernel's routing table
whether it is an address of this host (local, broadcast, multicast, or
unspecified, which means loopback), and either lets the call go on or
fails it with EACCES (passt then drops the guest's packet: its client
times out, as behind a firewall that drops).  io_uring, the x32 ABI and foreign architectures,
which would bypass the filter, are refused outright.

Why it holds: passt is single-threaded, and its own seccomp filter admits
no clone, so nothing can change the address between our check and the
kernel's re-read of it (TOCTOU).  If the launcher dies, the listener goes
with it and every such call fails (ENOSYS): closed, not open.  Reading
passt's memory needs ptrace rights over it: root has them; a normal user
execs passt inside a user namespace of their own (whose root is the user's
own id, the only one it maps), which keeps passt's /proc files theirs and
makes them its owner even after passt marks itself non-dumpable.

The one exception is DNS: queries the guest sends to passt's resolver
address are forwarded to the host's own resolvers (/etc/resolv.conf),
which may be a local service (127.0.0.53, say); their port 53 stays
reachable.

Hand-written (the standard library has no seccomp, and libseccomp's
Python binding is not packaged for pip): the filter is a few BPF
instructions, the notification structures three fixed layouts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)

# x86-64 system call numbers and seccomp's ABI (linux/seccomp.h, linux/filter.h).
SYS_SECCOMP, SYS_PIDFD_GETFD = 317, 438
NR_CONNECT, NR_SENDTO, NR_SENDMSG, NR_SENDMMSG, NR_IO_URING_SETUP = 42, 44, 46, 307, 425
X32_SYSCALL_BIT = 0x40000000
AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
RET_KILL_PROCESS, RET_USER_NOTIF, RET_ALLOW, RET_ERRNO = 0x80000000, 0x7FC00000, 0x7FFF0000, 0x00050000
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWUSER = 0x10000000
# ioctls on the listener: _IOWR('!', 0, struct seccomp_notif), _IOWR('!', 1, resp), _IOW('!', 2, __u64)
NOTIF_RECV, NOTIF_SEND, NOTIF_ID_VALID = 0xC0502100, 0xC0182101, 0x40082102
USER_NOTIF_FLAG_CONTINUE = 1
NOTIF = struct.Struct("<QII iI Q 6Q")  # id, pid, flags; seccomp_data: nr, arch, ip, args[6]
RESP = struct.Struct("<QqiI")  # id, val, error, flags

# BPF (classic): ld abs, jeq, jge, ret.
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_OFF_NR, _OFF_ARCH, _OFF_ARG4_LO, _OFF_ARG4_HI = 0, 4, 16 + 8 * 4, 16 + 8 * 4 + 4

MAX_SOCKADDR = 128  # sizeof(struct sockaddr_storage)
MAX_MMSG = 1024  # UIO_MAXIOV: sendmmsg takes no more
MSGHDR = struct.Struct("<QI4xQQQQi4x")  # name, namelen, iov, iovlen, control, controllen, flags
MMSGHDR_SIZE = MSGHDR.size + 8  # msg_len, padded


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def bpf_program() -> bytes:
    """The filter: the calls that name a destination go to the supervisor; nothing can bypass them."""
    errno_enosys = RET_ERRNO | errno.ENOSYS
    prog = [
        _insn(_LD_W_ABS, _OFF_ARCH),
        _insn(_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        _insn(_RET_K, RET_KILL_PROCESS),  # i386 or another ABI: its call numbers mean other things
        _insn(_LD_W_ABS, _OFF_NR),
        _insn(_JGE_K, X32_SYSCALL_BIT, 0, 1),
        _insn(_RET_K, errno_enosys),  # x32: the same calls under other numbers
        _insn(_JEQ_K, NR_CONNECT, 5, 0),
        _insn(_JEQ_K, NR_SENDMSG, 4, 0),
        _insn(_JEQ_K, NR_SENDMMSG, 3, 0),
        _insn(_JEQ_K, NR_IO_URING_SETUP, 3, 0),
        _insn(_JEQ_K, NR_SENDTO, 4, 0),
        _insn(_RET_K, RET_ALLOW),
        _insn(_RET_K, RET_USER_NOTIF),  # connect, sendmsg, sendmmsg
        _insn(_RET_K, errno_enosys),  # io_uring would submit connects unseen
        _insn(_RET_K, RET_ALLOW),  # (not reached)
        # sendto: only with a destination address (args[4] != NULL) is it a question.
        _insn(_LD_W_ABS, _OFF_ARG4_LO),
        _insn(_JEQ_K, 0, 0, 2),
        _insn(_LD_W_ABS, _OFF_ARG4_HI),
        _insn(_JEQ_K, 0, 1, 0),
        _insn(_RET_K, RET_USER_NOTIF),
        _insn(_RET_K, RET_ALLOW),
    ]
    return b"".join(prog)


# ---- what may pass (pure) -------------------------------------------------


@dataclass(frozen=True)
class Destination:
    """Where a call sends: an IP address and port (scope: an IPv6 link-local's interface)."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    scope: int = 0


def parse_sockaddr(raw: bytes) -> Destination | int | None:
    """A sockaddr as the guest's packets name it: a Destination, None for AF_UNSPEC, else its family (int)."""
    if len(raw) < 2:
        return None
    family = struct.unpack_from("<H", raw)[0]
    if family == socket.AF_UNSPEC:
        return None  # connect(AF_UNSPEC) dissolves an association: no destination
    if family == socket.AF_INET and len(raw) >= 8:
        port = struct.unpack_from(">H", raw, 2)[0]
        return Destination(ipaddress.IPv4Address(raw[4:8]), port)
    if family == socket.AF_INET6 and len(raw) >= 24:
        port = struct.unpack_from(">H", raw, 2)[0]
        addr = ipaddress.IPv6Address(raw[8:24])
        scope = struct.unpack_from("<I", raw, 24)[0] if len(raw) >= 28 else 0
        return Destination(addr, port, scope)
    return int(family)


NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def effective(dest: Destination) -> Destination:
    """The IPv4 address behind an IPv4-mapped or NAT64 IPv6 one: the host's own v4 addresses hide there too."""
    addr = dest.address
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return Destination(addr.ipv4_mapped, dest.port)
        if addr in NAT64:
            return Destination(ipaddress.IPv4Address(addr.packed[12:]), dest.port)
    return dest


def allowed(
    dest: Destination | int | None,
    hosts_own: Callable[[Destination], bool],
    resolvers: frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address] = frozenset(),
) -> bool:
    """Whether a call to `dest` may go on: not to this host (but DNS to its resolvers), and only IP or no address."""
    if dest is None:
        return True
    if isinstance(dest, int):
        # AF_UNIX (abstract sockets are per network namespace: the host's
        # X server, D-Bus, ...), AF_PACKET and the rest: passt needs none.
        return False
    dest = effective(dest)
    if dest.address.is_unspecified:
        return False  # 0.0.0.0 and :: are this host's loopback
    if dest.port == 53 and dest.address in resolvers:
        return True
    return not hosts_own(dest)


def host_resolvers(text: str) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The name servers of a resolv.conf (what passt forwards the guest's DNS queries to)."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):
                found.add(ipaddress.ip_address(words[1].split("%")[0]))
    return frozenset(found)


# Route types (linux/rtnetlink.h) that deliver to this host itself.
RTN_LOCAL, RTN_BROADCAST, RTN_ANYCAST, RTN_MULTICAST = 2, 3, 4, 5
HOST_ROUTE_TYPES = frozenset({RTN_LOCAL, RTN_BROADCAST, RTN_ANYCAST, RTN_MULTICAST})


NLMSG = struct.Struct("<IHHII")  # len, type, flags, seq, pid
RTMSG = struct.Struct("<BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
RTM_NEWROUTE, RTM_GETROUTE, NLMSG_ERROR, NLM_F_REQUEST = 24, 26, 2, 1
RTA_DST, RTA_OIF = 1, 4


def _rta(kind: int, data: bytes) -> bytes:
    raw = struct.pack("<HH", 4 + len(data), kind) + data
    return raw + bytes(-len(raw) % 4)


def route_request(dest: Destination, seq: int) -> bytes:
    """`ip route get DEST` as a netlink message (pure)."""
    family = socket.AF_INET if dest.address.version == 4 else socket.AF_INET6
    body = RTMSG.pack(family, dest.address.max_prefixlen, 0, 0, 0, 0, 0, 0, 0) + _rta(RTA_DST, dest.address.packed)
    if dest.scope:
        body += _rta(RTA_OIF, struct.pack("<I", dest.scope))
    return NLMSG.pack(NLMSG.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0) + body


def route_type(reply: bytes, seq: int) -> int | None:
    """The route type (RTN_*) in the kernel's answer to `route_request`, None for no route (pure)."""
    if len(reply) < NLMSG.size + RTMSG.size:
        return None
    length, kind, _flags, got_seq, _pid = NLMSG.unpack_from(reply)
    if kind != RTM_NEWROUTE or got_seq != seq or length > len(reply):
        return None
    return int(RTMSG.unpack_from(reply, NLMSG.size)[7])


class Routes:
    """Asks the kernel's routing table, per destination, whether it is this host (the answer is never stale).

    By hand over a netlink socket: pyroute2, which the other modes use,
    takes ~0.3 s to import, and this is on every `--net user` run.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.settimeout(2.0)
        self.seq = 0

    def hosts_own(self, dest: Destination) -> bool:
        self.seq += 1
        self.sock.send(route_request(dest, self.seq))
        while True:
            reply = self.sock.recv(65536)
            if len(reply) >= NLMSG.size and NLMSG.unpack_from(reply)[3] == self.seq:
                break  # (an answer to an earlier, timed-out question is skipped)
        return route_type(reply, self.seq) in HOST_ROUTE_TYPES

    def close(self) -> None:
        self.sock.close()


# ---- in passt's process, between fork and exec ------------------------------


def _seccomp_listener() -> int:
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    prog = bpf_program()
    fprog = Fprog(len(prog) // 8, prog)
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    fd = _libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, ctypes.byref(fprog))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER)")
    return int(fd)


def child_setup(report: int, ack: int, own_userns: bool) -> None:
    """In passt's process before exec: the filter, its listener handed over, then (non-root) a user namespace.

    The launcher takes the listener with pidfd_getfd while this waits: a
    sendmsg with SCM_RIGHTS would itself be held by the new filter.  The
    user namespace comes last: entering it makes this process non-dumpable
    to the launcher until the exec.
    """
    fd = _seccomp_listener()
    os.write(report, f"{os.getpid()} {fd}\n".encode())
    os.read(ack, 1)
    os.close(fd)
    os.close(report)
    os.close(ack)
    if own_userns:
        uid, gid = os.getuid(), os.getgid()
        if _libc.unshare(CLONE_NEWUSER) != 0:  # os.unshare is Python 3.12's
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
        # Its root is the user: /proc/PID/mem of a non-dumpable process
        # belongs to its namespace's root, and must be the launcher's to open.
        for name, text in (("uid_map", f"0 {uid} 1\n"), ("setgroups", "deny"), ("gid_map", f"0 {gid} 1\n")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


# ---- the supervisor, in the launcher ----------------------------------------


def take_listener(report: int, ack: int, timeout: float = 10.0) -> int:
    """The listener of the child that reports on `report` (pid and fd number), copied into this process."""
    ready, _, _ = select.select([report], [], [], timeout)
    if not ready:
        raise OSError(errno.ETIMEDOUT, "passt's network wall was never set up")
    line = os.read(report, 64).decode()
    pid, fd = (int(x) for x in line.split())
    pidfd = os.pidfd_open(pid)
    try:
        ours = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if ours < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        os.set_inheritable(ours, False)
        return int(ours)
    finally:
        os.close(pidfd)
        os.write(ack, b"1")


def _read_mem(pid: int, addr: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        return os.pread(mem.fileno(), size, addr)


def destinations(nr: int, args: tuple[int, ...], read: Callable[[int, int], bytes]) -> list[Destination | int | None]:
    """Where a held call sends, read from the caller's memory (bounded: it is untrusted)."""
    if nr in (NR_CONNECT, NR_SENDTO):
        addr, size = (args[1], args[2]) if nr == NR_CONNECT else (args[4], args[5])
        return [parse_sockaddr(read(addr, min(size, MAX_SOCKADDR)))]
    if nr == NR_SENDMSG:
        headers = [read(args[1], MSGHDR.size)]
    elif nr == NR_SENDMMSG:
        count = min(args[2], MAX_MMSG)
        table = read(args[1], count * MMSGHDR_SIZE)
        headers = [table[i * MMSGHDR_SIZE : i * MMSGHDR_SIZE + MSGHDR.size] for i in range(len(table) // MMSGHDR_SIZE)]
    else:
        return [socket.AF_PACKET]  # a call the filter never holds: refuse
    out: list[Destination | int | None] = []
    for raw in headers:
        if len(raw) < MSGHDR.size:
            out.append(socket.AF_PACKET)
            continue
        name, namelen = MSGHDR.unpack(raw)[:2]
        out.append(parse_sockaddr(read(name, min(namelen, MAX_SOCKADDR))) if name and namelen else None)
    return out


class Wall:
    """Serves one passt's held calls from a thread of the launcher until closed."""

    def __init__(self, listener: int, resolvers: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> None:
        self.listener = listener
        self.resolvers = frozenset(resolvers)
        self.refused: list[str] = []  # the host's own destinations asked for, in order, each once
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="sandbox-netwall", daemon=True)
        self._thread.start()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        for fd in (self.listener, self._stop_r, self._stop_w):
            os.close(fd)
        if self.refused:
            shown = ", ".join(self.refused[:3]) + (f" and {len(self.refused) - 3} more" if len(self.refused) > 3 else "")
            log.warning("--net user: this host's own %s refused (--net user,host allows the host)", shown)

    def _serve(self) -> None:
        routes: Routes | None = None
        try:
            routes = Routes()
            poller = select.poll()
            poller.register(self.listener, select.POLLIN)
            poller.register(self._stop_r, select.POLLIN)
            while True:
                events = dict(poller.poll())
                if self._stop_r in events:
                    return
                if events.get(self.listener, 0) & (select.POLLHUP | select.POLLERR):
                    return  # passt is gone
                self._answer_one(routes)
        except Exception as exc:  # noqa: BLE001 - the wall fails closed: passt's calls then fail with ENOSYS
            log.warning("--net user: the network wall stopped (%s); passt can reach nothing more", exc)
        finally:
            if routes is not None:
                routes.close()

    def _answer_one(self, routes: Routes) -> None:
        buf = bytearray(NOTIF.size)
        if _ioctl(self.listener, NOTIF_RECV, buf) != 0:
            return  # the caller went away meanwhile (ENOENT), or a signal
        notif_id, pid, _flags, nr, _arch, _ip, *args = NOTIF.unpack(buf)
        dests: list[Destination | int | None] = []
        try:
            dests = destinations(nr, tuple(args), lambda addr, size: _read_mem(pid, addr, size))
            ok = all(allowed(d, routes.hosts_own, self.resolvers) for d in dests)
        except (OSError, ValueError, struct.error) as exc:
            log.debug("--net user: cannot read the destination of a call (%d): %s", nr, exc)
            ok = False
        # The caller must still be waiting for this answer: its memory was
        # read by pid, and a pid can be reused.
        if _ioctl(self.listener, NOTIF_ID_VALID, bytearray(struct.pack("<Q", notif_id))) != 0:
            return
        if not ok:
            log.debug("--net user: refused a call (%d) to %s", nr, dests)
            for d in dests:
                if isinstance(d, Destination):
                    where = f"[{d.address}]:{d.port}" if d.address.version == 6 else f"{d.address}:{d.port}"
                    if where not in self.refused:
                        self.refused.append(where)
        resp = RESP.pack(notif_id, 0, 0 if ok else -errno.EACCES, USER_NOTIF_FLAG_CONTINUE if ok else 0)
        _ioctl(self.listener, NOTIF_SEND, bytearray(resp))


def _ioctl(fd: int, request: int, buf: bytearray) -> int:
    arg = (ctypes.c_char * len(buf)).from_buffer(buf)
    if _libc.ioctl(fd, ctypes.c_ulong(request), arg) != 0:
        return ctypes.get_errno() or -1
    return 0
