"""Pure address arithmetic: MACs, SLAAC addresses, prefixes, and clashes with the host's routes."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from sandbox.core.errors import UsageError

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# QEMU's OUI, as libvirt and QEMU itself use for guests (locally administered).
MAC_PREFIX = (0x52, 0x54, 0x00)
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def random_mac(random: bytes) -> str:
    """A guest MAC in QEMU's range from three random bytes."""
    if len(random) < 3:
        raise ValueError("need 3 random bytes")
    return ":".join(f"{b:02x}" for b in MAC_PREFIX + tuple(random[:3]))


def parse_mac(text: str) -> str:
    """A MAC the guest may use: six hex pairs, unicast, not all zero (lower case)."""
    mac = text.strip().lower().replace("-", ":")
    if not _MAC.fullmatch(mac):
        raise UsageError(f"--mac {text}: not a MAC address (six hex pairs, e.g. 52:54:00:12:34:56)")
    first = int(mac[:2], 16)
    if first & 1:
        raise UsageError(f"--mac {text}: a multicast address cannot be a guest's")
    if mac == "00:00:00:00:00:00":
        raise UsageError(f"--mac {text}: the zero address cannot be a guest's")
    return mac


def eui64(mac: str) -> int:
    """The modified EUI-64 interface identifier of `mac` (RFC 4291, appendix A)."""
    b = [int(x, 16) for x in mac.split(":")]
    b[0] ^= 0x02
    ident = bytes(b[:3] + [0xFF, 0xFE] + b[3:])
    return int.from_bytes(ident, "big")


def slaac_address(prefix: IPv6Network, mac: str) -> ipaddress.IPv6Address:
    """The address a guest with `mac` forms from a /64 by SLAAC (EUI-64, as Linux does by default)."""
    if prefix.prefixlen != 64:
        raise ValueError("SLAAC needs a /64")
    return ipaddress.IPv6Address(int(prefix.network_address) | eui64(mac))


def link_local(mac: str) -> ipaddress.IPv6Address:
    return slaac_address(IPv6Network("fe80::/64"), mac)


def ula_prefix(random: bytes) -> IPv6Network:
    """A unique local /64 (RFC 4193): fd00::/8, a 40-bit random global ID, subnet 0."""
    if len(random) < 5:
        raise ValueError("need 5 random bytes")
    value = (0xFD << 120) | (int.from_bytes(random[:5], "big") << 80)
    return IPv6Network((value, 64))


def _network(text: str, flag: str, version: int) -> Network:
    kind = "an IPv6 prefix" if version == 6 else "an IPv4 network"
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise UsageError(f"{flag} {text}: not {kind} ({exc})") from None
    if net.version != version:
        raise UsageError(f"{flag} {text}: not {kind}")
    return net


def parse_ipv6_prefix(text: str) -> IPv6Network:
    """A /64 for a virtual network; anything else is a clear error."""
    net = _network(text, "--ipv6", 6)
    assert isinstance(net, IPv6Network)
    if net.prefixlen != 64:
        raise UsageError(f"--ipv6 {text}: a virtual network needs a /64 (SLAAC forms addresses only in a /64)")
    if net.is_link_local or net.is_multicast or net.is_loopback:
        raise UsageError(f"--ipv6 {text}: not a prefix guests can use")
    return net


def parse_ipv4_net(text: str) -> IPv4Network:
    """A private IPv4 network of at least 4 addresses (the bridge takes the first host address)."""
    net = _network(text, "--ipv4", 4)
    assert isinstance(net, IPv4Network)
    if not 8 <= net.prefixlen <= 29:
        raise UsageError(f"--ipv4 {text}: the prefix length must be between 8 and 29")
    if not net.is_private:
        raise UsageError(f"--ipv4 {text}: NAT'd guests need a private range (RFC 1918)")
    return net


@dataclass(frozen=True)
class Route:
    """A route or address of the host's, for clash checks."""

    network: Network
    dev: str


def clash(candidate: Network, routes: Iterable[Route], ignore_dev: str | None = None) -> Route | None:
    """The first host route that overlaps `candidate` (default routes never count)."""
    for r in routes:
        if r.network.version != candidate.version or r.network.prefixlen == 0 or r.dev == ignore_dev:
            continue
        if candidate.overlaps(r.network):
            return r
    return None


# Where automatic IPv4 networks come from: 10.213.0.0/24, 10.213.1.0/24, ...
AUTO_IPV4 = IPv4Network("10.213.0.0/16")


def pick_ipv4(taken: Iterable[Network], routes: Iterable[Route]) -> IPv4Network:
    """The first /24 of AUTO_IPV4 that clashes with no route and no other network."""
    routes = list(routes)
    taken = list(taken)
    for sub in AUTO_IPV4.subnets(new_prefix=24):
        if clash(sub, routes) is None and not any(sub.overlaps(t) for t in taken if t.version == 4):
            return sub
    raise UsageError(f"no free /24 left in {AUTO_IPV4}: give one with --ipv4")


def gateway(net: IPv4Network) -> ipaddress.IPv4Address:
    """The bridge's (host's) address: the network's first host address."""
    return net.network_address + 1


def guest_ipv4(net: IPv4Network, taken: Iterable[ipaddress.IPv4Address]) -> ipaddress.IPv4Address:
    """The lowest guest address not in `taken` (the gateway and broadcast excluded)."""
    used = set(taken) | {gateway(net)}
    for host in net.hosts():
        if host not in used:
            return host
    raise UsageError(f"the network {net} has no free address left")


def router_address(prefix: IPv6Network) -> ipaddress.IPv6Address:
    """The bridge's address in the network's /64: ::1."""
    return prefix.network_address + 1
