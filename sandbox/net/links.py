"""Links, addresses and routes through netlink (pyroute2), and taps through /dev/net/tun.

pyroute2 is imported only here and only when a network needs it: its
import alone costs ~0.4 s on a slow host.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox.core.errors import SandboxError
from sandbox.net.addresses import Route

if TYPE_CHECKING:
    from pyroute2 import IPRoute

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16


class NetworkError(SandboxError):
    """A network could not be set up or torn down."""


@contextlib.contextmanager
def netlink() -> Iterator[IPRoute]:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise NetworkError(f"netlink: {os.strerror(exc.code) if exc.code > 0 else exc}") from None


def open_tap(pattern: str = "sbxtap%d") -> tuple[int, str]:
    """A new tap (the kernel picks the name from `pattern`) and its queue's descriptor.

    The tap is not persistent: it disappears when the last descriptor (the
    launcher's and QEMU's) is closed, so a killed launcher leaves none.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack(f"{IFNAMSIZ}sH", pattern.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        out = fcntl.ioctl(fd, TUNSETIFF, ifr + bytes(40 - len(ifr)))
    except OSError as exc:
        os.close(fd)
        raise NetworkError(f"cannot create a tap: {exc.strerror}") from None
    name = out[:IFNAMSIZ].split(b"\0", 1)[0].decode()
    return fd, name


def index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def ifindex(name: str) -> int | None:
    """The link's index in this network namespace (not /sys, which may be another namespace's)."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def exists(name: str) -> bool:
    return ifindex(name) is not None


def set_ipv6_conf(name: str, key: str, value: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        Path(f"/proc/sys/net/ipv6/conf/{name}/{key}").write_text(value)


def ensure_bridge(ipr: IPRoute, name: str, addresses: list[tuple[str, int]]) -> int:
    """The bridge `name` with `addresses`, up (made when missing); its index."""
    idx = index(ipr, name)
    if idx is None:
        ipr.link("add", ifname=name, kind="bridge", br_forward_delay=0, br_stp_state=0)
        idx = index(ipr, name)
        if idx is None:
            raise NetworkError(f"bridge {name} vanished after it was made")
    # Its addresses are ours to give: no duplicate detection to wait for
    # before dnsmasq can send router advertisements from them.
    set_ipv6_conf(name, "accept_dad", "0")
    set_ipv6_conf(name, "accept_ra", "0")
    have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx)}
    for addr, plen in addresses:
        if (addr, plen) not in have:
            ipr.addr("add", index=idx, address=addr, prefixlen=plen)
    ipr.link("set", index=idx, state="up")
    return idx


def attach_to_bridge(ipr: IPRoute, tap: str, bridge: str) -> None:
    idx, br = index(ipr, tap), index(ipr, bridge)
    if idx is None:
        raise NetworkError(f"tap {tap} vanished")
    if br is None:
        raise NetworkError(f"no bridge {bridge} on this host")
    ipr.link("set", index=idx, master=br, state="up")


def delete(ipr: IPRoute, name: str) -> bool:
    idx = index(ipr, name)
    if idx is None:
        return False
    ipr.link("del", index=idx)
    return True


def is_bridge(ipr: IPRoute, name: str) -> bool:
    idx = index(ipr, name)
    if idx is None:
        return False
    link = ipr.get_links(idx)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge"


def _route(msg: Any, names: dict[int, str]) -> Route | None:
    dst = msg.get_attr("RTA_DST")
    family = msg["family"]
    if dst is None:
        dst = "0.0.0.0" if family == 2 else "::"
    try:
        net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
    except ValueError:
        return None
    return Route(net, names.get(msg.get_attr("RTA_OIF") or 0, "?"))


def host_routes(ipr: IPRoute) -> list[Route]:
    """The main table's routes and the host's own addresses' networks, both families."""
    names = {l["index"]: l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
    out: list[Route] = []
    for family in (2, 10):
        for msg in ipr.get_routes(family=family, table=254):
            r = _route(msg, names)
            if r is not None and not (r.network.version == 6 and r.network.is_link_local):
                out.append(r)
        for a in ipr.get_addr(family=family):
            addr = a.get_attr("IFA_ADDRESS")
            net = ipaddress.ip_network(f"{addr}/{a['prefixlen']}", strict=False)
            if not net.is_loopback and not net.is_link_local:
                out.append(Route(net, names.get(a["index"], "?")))
    return out


def has_default_route(family: int) -> bool:
    """A default route in the main table, read from /proc (no netlink import)."""
    if family == 10:
        try:
            text = Path("/proc/net/ipv6_route").read_text()
        except OSError:
            return False
        return any(line.startswith("00000000000000000000000000000000 00 ") and not line.rstrip().endswith(" lo") for line in text.splitlines())
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(len(f := line.split()) > 7 and f[1] == "00000000" and f[7] == "00000000" for line in lines)
