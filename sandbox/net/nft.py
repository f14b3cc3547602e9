"""nftables rules for a virtual network: NAT, the host's walls, and per-guest anti-spoofing.

Rulesets are text built by pure functions and loaded with `nft -f -` (an
argv, no shell): one table per family per network, so that destroying a
network is deleting its tables and nothing else on the host is touched.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass

from sandbox.net.addresses import IPv4Network, IPv6Network
from sandbox.net.links import NetworkError


def table_name(network: str) -> str:
    # Network names are [a-z0-9-]: replacing '-' keeps them distinct.
    return "sandbox_" + network.replace("-", "_")


def network_ruleset(network: str, bridge: str, ipv4: IPv4Network, ipv6: IPv6Network, nat66: bool) -> str:
    """The tables of one network, replacing any earlier version of them."""
    t = table_name(network)
    nat66_rule = f'        ip6 saddr {ipv6} oifname != "{bridge}" masquerade\n' if nat66 else ""
    return f"""table inet {t}
delete table inet {t}
table inet {t} {{
    chain input {{
        type filter hook input priority filter - 1; policy accept;
        iifname "{bridge}" jump from_guests
    }}
    # What guests may ask of the host itself (any of its addresses): DHCP,
    # DNS and neighbour discovery; replies to what the host started.
    chain from_guests {{
        ct state established,related accept
        udp dport {{ 53, 67 }} accept
        tcp dport 53 accept
        icmpv6 type {{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert }} accept
        counter drop
    }}
    chain forward {{
        type filter hook forward priority filter - 1; policy accept;
        iifname "{bridge}" accept
        oifname "{bridge}" ct state established,related accept
        # IPv6 is routed: guests are reachable, firewall permitting.
        oifname "{bridge}" meta nfproto ipv6 accept
        oifname "{bridge}" counter drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {ipv4} oifname != "{bridge}" masquerade
{nat66_rule}    }}
}}
table bridge {t}
delete table bridge {t}
table bridge {t} {{
    set ports {{ type ifname; }}
    set macs {{ type ifname . ether_addr; }}
    set addrs4 {{ type ifname . ipv4_addr; }}
    set addrs6 {{ type ifname . ipv6_addr; }}
    # A guest sends only as its own MAC and addresses (libvirt's clean-traffic).
    chain prerouting {{
        type filter hook prerouting priority -300; policy accept;
        iifname != @ports accept
        iifname . ether saddr != @macs counter drop
        ether type arp iifname . arp saddr ether != @macs counter drop
        ether type arp iifname . arp saddr ip != @addrs4 counter drop
        ether type ip ip saddr 0.0.0.0 udp dport 67 accept
        ether type ip iifname . ip saddr != @addrs4 counter drop
        ether type ip6 ip6 saddr :: accept
        ether type ip6 iifname . ip6 saddr != @addrs6 counter drop
        ether type != {{ ip, ip6, arp }} counter drop
    }}
}}
"""


def delete_ruleset(network: str) -> str:
    t = table_name(network)
    # Declaring first makes deleting a table that is not there a no-op.
    return f"table inet {t}\ndelete table inet {t}\ntable bridge {t}\ndelete table bridge {t}\n"


@dataclass(frozen=True)
class GuestPort:
    """One guest's tap and the addresses it may send from."""

    tap: str
    mac: str
    ipv4: ipaddress.IPv4Address
    ipv6: tuple[ipaddress.IPv6Address, ...]  # link-local and SLAAC


def _elements(g: GuestPort) -> list[tuple[str, str]]:
    tap = f'"{g.tap}"'
    out = [("ports", tap), ("macs", f"{tap} . {g.mac}"), ("addrs4", f"{tap} . {g.ipv4}")]
    out += [("addrs6", f"{tap} . {a}") for a in g.ipv6]
    return out


def guest_ruleset(network: str, add: list[GuestPort] = [], remove: list[GuestPort] = []) -> str:  # noqa: B006 - never mutated
    """Let guests' ports in (`add`) and forget them (`remove`)."""
    t = table_name(network)
    lines = [f"delete element bridge {t} {s} {{ {e} }}" for g in remove for s, e in _elements(g)]
    lines += [f"add element bridge {t} {s} {{ {e} }}" for g in add for s, e in _elements(g)]
    return "\n".join(lines) + "\n"


def apply(ruleset: str) -> None:
    """Load `ruleset` atomically (all or nothing)."""
    nft = shutil.which("nft") or "/usr/sbin/nft"
    try:
        proc = subprocess.run([nft, "-f", "-"], input=ruleset, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise NetworkError("nft not found (apt-get install nftables)") from None
    if proc.returncode != 0:
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        raise NetworkError(f"nftables refused the rules: {lines[0] if lines else proc.returncode}")


def tables() -> set[str]:
    """Names of the host's nftables tables, as 'family name'."""
    nft = shutil.which("nft") or "/usr/sbin/nft"
    proc = subprocess.run([nft, "list", "tables"], capture_output=True, text=True, check=False)
    return {line.removeprefix("table ").strip() for line in proc.stdout.splitlines() if line.startswith("table ")}
