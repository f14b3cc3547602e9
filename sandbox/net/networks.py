"""Named virtual networks (--net nat=NAME): definitions, activation, guests' leases, destruction.

A network is a bridge with the network's first IPv4 address and ::1 of
its /64, nftables tables (NAT, the host's walls, anti-spoofing) and one
dnsmasq (DHCP, DNS, router advertisements).  Its definition is a small
JSON file; what is running is checked, and brought up again, on each use.
Each sandbox on it holds a lease (a file naming the launcher's pid), so
that a launcher killed with SIGKILL is found out and cleaned up after by
the next user of the network.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sandbox.core.process import start_ticks, stop_pid
from sandbox.core.errors import UsageError
from sandbox.net import addresses, links, nft
from sandbox.net.addresses import IPv4Network, IPv6Network
from sandbox.net.links import NetworkError

log = logging.getLogger(__name__)

NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,10}")
DEFAULT = "default"
BRIDGE_PREFIX = "sbx-"


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UsageError(f"network name {name!r}: use 1-11 of a-z, 0-9 and '-' (the bridge is {BRIDGE_PREFIX}NAME)")
    return name


def networks_dir() -> Path:
    """Definitions (NAME.json); SANDBOX_NETWORK_DIR moves them (and the state) elsewhere."""
    override = os.environ.get("SANDBOX_NETWORK_DIR")
    return Path(override) if override else Path("/var/lib/sandbox/networks")


def state_root() -> Path:
    """What running networks keep, each in a directory of its own (gone with a reboot, as they are)."""
    override = os.environ.get("SANDBOX_NETWORK_DIR")
    return Path(override) / "run" if override else Path("/run/sandbox/networks")


def state_dir(name: str) -> Path:
    """What a running network keeps: dnsmasq's files, the guests' leases."""
    return state_root() / name


@dataclass(frozen=True)
class Network:
    name: str
    ipv4: IPv4Network
    ipv6: IPv6Network
    nat66: bool = False

    @property
    def bridge(self) -> str:
        return BRIDGE_PREFIX + self.name

    @property
    def gateway4(self) -> ipaddress.IPv4Address:
        return addresses.gateway(self.ipv4)

    @property
    def router6(self) -> ipaddress.IPv6Address:
        return addresses.router_address(self.ipv6)

    @property
    def ipv6_routed(self) -> bool:
        """A global prefix is routed; a ULA one (fc00::/7) reaches out only through NAT66."""
        return not self.ipv6.subnet_of(IPv6Network("fc00::/7"))

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "ipv4": str(self.ipv4), "ipv6": str(self.ipv6), "nat66": self.nat66}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Network:
        d = json.loads(text)
        return cls(check_name(d["name"]), IPv4Network(d["ipv4"]), IPv6Network(d["ipv6"]), bool(d.get("nat66", False)))


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"{what} needs root (it makes a bridge, taps and firewall rules); --net user works for anyone")


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """One lock for every network change on this host (they are rare and quick)."""
    d = networks_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load(name: str) -> Network | None:
    try:
        return Network.from_json((networks_dir() / f"{name}.json").read_text())
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise NetworkError(f"network {name}: its definition {networks_dir() / (name + '.json')} is damaged ({exc})") from None


def all_networks() -> list[Network]:
    d = networks_dir()
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.json")):
        with contextlib.suppress(NetworkError, UsageError):
            n = load(p.stem)
            if n is not None:
                out.append(n)
    return out


def create(name: str, ipv4: str | None = None, ipv6: str | None = None, nat66: bool = False) -> Network:
    """Define a network (not yet running: that happens on first use); errors on a clash."""
    require_root("sandbox net create")
    check_name(name)
    v4 = addresses.parse_ipv4_net(ipv4) if ipv4 else None
    v6 = addresses.parse_ipv6_prefix(ipv6) if ipv6 else None
    with locked():
        if load(name) is not None:
            raise UsageError(f"network {name} already exists (sandbox net info {name})")
        return _define(name, v4, v6, nat66)


def _define(name: str, v4: IPv4Network | None, v6: IPv6Network | None, nat66: bool) -> Network:
    with links.netlink() as ipr:
        routes = links.host_routes(ipr)
    others = all_networks()
    taken: list[addresses.Network] = [n.ipv4 for n in others] + [n.ipv6 for n in others]
    for cand, flag in ((v4, "--ipv4"), (v6, "--ipv6")):
        if cand is None:
            continue
        hit = addresses.clash(cand, routes)
        if hit is not None:
            raise UsageError(f"{flag} {cand} overlaps {hit.network} on {hit.dev}, which this host already routes")
        for n in others:
            if cand.overlaps(n.ipv4 if cand.version == 4 else n.ipv6):
                raise UsageError(f"{flag} {cand} overlaps network {n.name}")
    if v4 is None:
        v4 = addresses.pick_ipv4(taken, routes)
    if v6 is None:
        v6 = addresses.ula_prefix(os.urandom(5))
    net = Network(name, v4, v6, nat66)
    d = networks_dir()
    tmp = d / f".{name}.json.tmp"
    tmp.write_text(net.to_json())
    tmp.rename(d / f"{name}.json")
    log.info("network %s defined: %s, %s", name, v4, v6)
    return net


def get_or_create(name: str) -> Network:
    """The network `name`; `default` is defined on first use, any other name must exist."""
    check_name(name)
    net = load(name)
    if net is not None:
        return net
    if name != DEFAULT:
        raise UsageError(f"no network {name} (sandbox net create {name}, or --net nat for the default one)")
    with locked():
        return load(name) or _define(name, None, None, False)


# ---- running ------------------------------------------------------------------


def _dnsmasq_pid(name: str) -> int | None:
    try:
        pid = int((state_dir(name) / "dnsmasq.pid").read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    return pid if comm == "dnsmasq" else None


def _stop_dnsmasq(name: str) -> int | None:
    """End the network's dnsmasq (and wait until its sockets are free); its pid, if it ran."""
    pid = _dnsmasq_pid(name)
    if pid is None:
        return None
    stop_pid(pid)
    return pid


def dnsmasq_argv(net: Network, state: Path, dnsmasq: str = "dnsmasq") -> list[str]:
    """dnsmasq for one network: DHCP, DNS and RAs on its bridge only."""
    first = net.gateway4 + 1
    last = net.ipv4.broadcast_address - 1
    return [
        dnsmasq,
        "--conf-file=/dev/null",
        f"--pid-file={state / 'dnsmasq.pid'}",
        f"--log-facility={state / 'dnsmasq.log'}",
        "--user=nobody",
        "--group=nogroup",
        f"--interface={net.bridge}",
        "--bind-interfaces",
        "--except-interface=lo",
        "--strict-order",
        "--dhcp-authoritative",
        f"--dhcp-range={first},{last},{net.ipv4.netmask},1h",
        f"--dhcp-hostsdir={state / 'hosts'}",
        f"--dhcp-leasefile={state / 'dnsmasq.leases'}",
        "--enable-ra",
        f"--dhcp-range={net.ipv6.network_address},ra-only,64,1h",
        f"--ra-param={net.bridge},10,1800",
    ]


def _upstream_accept_ra(bridges: set[str]) -> None:
    """Keep the host's own autoconfiguration working once it forwards.

    With forwarding on, Linux ignores router advertisements on interfaces
    with accept_ra=1: a host that got its address and default route by
    SLAAC would lose them when they expire.  accept_ra=2 accepts them
    anyway (what libvirt asks of the administrator).
    """
    for conf in Path("/proc/sys/net/ipv6/conf").iterdir():
        if conf.name in ("all", "default", "lo") or conf.name in bridges or conf.name.startswith(("sbxtap", BRIDGE_PREFIX)):
            continue
        with contextlib.suppress(OSError):
            if (conf / "accept_ra").read_text().strip() == "1":
                (conf / "accept_ra").write_text("2")
                log.info("accept_ra=2 on %s: it keeps taking router advertisements while the host forwards", conf.name)


FORWARDING = {"net.ipv4.ip_forward": "/proc/sys/net/ipv4/ip_forward", "net.ipv6.conf.all.forwarding": "/proc/sys/net/ipv6/conf/all/forwarding"}


def _forwarding_before() -> Path:
    """The host's forwarding settings from before the first network came up (restored after the last goes)."""
    return state_root() / "forwarding-before.json"


def _forwarding() -> None:
    _upstream_accept_ra({n.bridge for n in all_networks()})
    before = {}
    for name, path in FORWARDING.items():
        with contextlib.suppress(OSError):
            before[name] = Path(path).read_text().strip()
    record = _forwarding_before()
    if not record.exists():  # the first network to come up: what the host had is still there
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(before))
    for name, path in FORWARDING.items():
        with contextlib.suppress(OSError):
            if before.get(name) != "1":
                Path(path).write_text("1")


def _restore_forwarding(leaving: str) -> list[str]:
    """After the last running network went: forwarding as the host had it; what was set back, for the user."""
    record = _forwarding_before()
    if any(state_dir(n.name).exists() for n in all_networks() if n.name != leaving) or not record.exists():
        return []
    try:
        before = json.loads(record.read_text())
    except (OSError, ValueError):
        before = {}
    restored = []
    for name, value in before.items():
        path = FORWARDING.get(name)
        with contextlib.suppress(OSError):
            if path is not None and value in ("0", "1") and Path(path).read_text().strip() != value:
                Path(path).write_text(value)
                restored.append(f"{name}={value}")
    record.unlink(missing_ok=True)
    return [f"forwarding ({', '.join(restored)}, as before the first network)"] if restored else []


def _marker(net: Network) -> str:
    """What says the network is up as defined: the bridge's ifindex ties it to this boot and netns."""
    ifindex = links.ifindex(net.bridge)
    return f"{ifindex} {net.to_json()}" if ifindex is not None else ""


def is_active(net: Network) -> bool:
    try:
        marker = (state_dir(net.name) / "active").read_text()
    except OSError:
        return False
    return marker == _marker(net) != "" and _dnsmasq_pid(net.name) is not None


def activate(net: Network) -> None:
    """Bring the network up (bridge, rules, forwarding, dnsmasq) unless it already is."""
    if is_active(net):
        return
    with locked():
        if is_active(net):
            return
        state = state_dir(net.name)
        (state / "hosts").mkdir(parents=True, exist_ok=True)
        (state / "guests").mkdir(exist_ok=True)
        with links.netlink() as ipr:
            for r in links.host_routes(ipr):
                if r.dev != net.bridge and r.network.prefixlen and (
                    (r.network.version == 4 and r.network.overlaps(net.ipv4)) or (r.network.version == 6 and r.network.overlaps(net.ipv6))
                ):
                    raise NetworkError(f"network {net.name}: {r.network} on {r.dev} now overlaps its range; destroy and re-create it")
            links.ensure_bridge(ipr, net.bridge, [(str(net.gateway4), net.ipv4.prefixlen), (str(net.router6), 64)])
        nft.apply(nft.network_ruleset(net.name, net.bridge, net.ipv4, net.ipv6, net.nat66))
        _forwarding()
        _stop_dnsmasq(net.name)
        dnsmasq = shutil.which("dnsmasq", path="/usr/sbin:/usr/bin:/sbin:/bin")
        if dnsmasq is None:
            raise NetworkError("dnsmasq not found (apt-get install dnsmasq-base)")
        # It forks into the background and outlives this launcher: it
        # belongs to the network, not to one sandbox.
        proc = subprocess.run(
            dnsmasq_argv(net, state, dnsmasq), stdin=subprocess.DEVNULL, capture_output=True, text=True, start_new_session=True, check=False
        )
        if proc.returncode != 0:
            raise NetworkError(f"dnsmasq for network {net.name} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        (state / "active").write_text(_marker(net))
        log.info("network %s is up on %s", net.name, net.bridge)


def deactivate(net: Network) -> list[str]:
    """Take everything of the network down; what was removed, for the user."""
    removed = []
    pid = _stop_dnsmasq(net.name)
    if pid is not None:
        removed.append(f"dnsmasq {pid}")
    if f"inet {nft.table_name(net.name)}" in nft.tables() or f"bridge {nft.table_name(net.name)}" in nft.tables():
        nft.apply(nft.delete_ruleset(net.name))
        removed.append(f"nftables tables {nft.table_name(net.name)}")
    if links.exists(net.bridge):
        with links.netlink() as ipr:
            links.delete(ipr, net.bridge)
        removed.append(f"bridge {net.bridge}")
    shutil.rmtree(state_dir(net.name), ignore_errors=True)
    return removed


# ---- guests ---------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    ticks = start_ticks(pid)
    return None if ticks is None else str(ticks)


@dataclass(frozen=True)
class Lease:
    """One sandbox on a network."""

    pid: int
    started: str
    tap: str
    mac: str
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address

    def alive(self) -> bool:
        return _start_time(self.pid) == self.started

    def port(self) -> nft.GuestPort:
        return nft.GuestPort(self.tap, self.mac, self.ipv4, (addresses.link_local(self.mac), self.ipv6))

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "started": self.started, "tap": self.tap, "mac": self.mac, "ipv4": str(self.ipv4), "ipv6": str(self.ipv6)})

    @classmethod
    def from_json(cls, text: str) -> Lease:
        d = json.loads(text)
        return cls(int(d["pid"]), str(d["started"]), d["tap"], d["mac"], ipaddress.IPv4Address(d["ipv4"]), ipaddress.IPv6Address(d["ipv6"]))


def leases(net: Network) -> list[Lease]:
    out = []
    for p in sorted((state_dir(net.name) / "guests").glob("*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            out.append(Lease.from_json(p.read_text()))
    return out


def _forget(net: Network, lease: Lease) -> None:
    state = state_dir(net.name)
    with contextlib.suppress(NetworkError):
        nft.apply(nft.guest_ruleset(net.name, remove=[lease.port()]))
    for p in (state / "guests" / f"{lease.ipv4}.json", state / "hosts" / str(lease.ipv4)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def reclaim(net: Network) -> int:
    """Forget the leases of launchers that are gone (killed); how many."""
    stale = [l for l in leases(net) if not l.alive()]
    for lease in stale:
        log.info("network %s: reclaiming %s of launcher %d, which is gone", net.name, lease.ipv4, lease.pid)
        _forget(net, lease)
    return len(stale)


def join(net: Network, tap: str, mac: str) -> Lease:
    """Give this launcher's guest an address and let its tap in."""
    with locked():
        reclaim(net)
        taken = {l.ipv4 for l in leases(net)}
        if any(l.mac == mac for l in leases(net)):
            raise UsageError(f"--mac {mac}: a sandbox on network {net.name} already uses it")
        ipv4 = addresses.guest_ipv4(net.ipv4, taken)
        lease = Lease(os.getpid(), _start_time(os.getpid()) or "", tap, mac, ipv4, addresses.slaac_address(net.ipv6, mac))
        state = state_dir(net.name)
        (state / "guests" / f"{ipv4}.json").write_text(lease.to_json())
        # DHCP would give this guest the same address (the init sets it itself).
        (state / "hosts" / str(ipv4)).write_text(f"{mac},{ipv4}\n")
        try:
            nft.apply(nft.guest_ruleset(net.name, add=[lease.port()]))
        except NetworkError:
            _forget(net, lease)
            raise
    return lease


def leave(net: Network, lease: Lease) -> None:
    with locked():
        _forget(net, lease)


def destroy(name: str) -> list[str]:
    """Remove the network and its definition; refused while a sandbox uses it."""
    require_root("sandbox net destroy")
    with locked():
        net = load(check_name(name))
        if net is None:
            raise UsageError(f"no network {name}")
        reclaim(net)
        users = leases(net)
        if users:
            raise UsageError(f"network {name} is in use by {len(users)} sandbox(es) (launcher pid {', '.join(str(l.pid) for l in users)})")
        removed = deactivate(net)
        (networks_dir() / f"{name}.json").unlink()
        return removed + _restore_forwarding(name)


# ---- reports ------------------------------------------------------------------------


def describe(net: Network) -> dict[str, object]:
    """What `sandbox net info` shows."""
    guests = [l for l in leases(net) if l.alive()]
    return {
        "name": net.name,
        "bridge": net.bridge,
        "ipv4": str(net.ipv4),
        "gateway4": str(net.gateway4),
        "ipv6": str(net.ipv6),
        "ipv6_mode": "routed" if net.ipv6_routed else ("ULA, NAT66" if net.nat66 else "ULA, not routed"),
        "active": is_active(net),
        "dnsmasq_pid": _dnsmasq_pid(net.name),
        "sandboxes": [{"launcher_pid": l.pid, "tap": l.tap, "mac": l.mac, "ipv4": str(l.ipv4), "ipv6": str(l.ipv6)} for l in guests],
    }


def format_list(rows: list[dict[str, object]]) -> str:
    lines = [f"{'NAME':<12} {'BRIDGE':<16} {'IPV4':<18} {'IPV6':<24} {'STATE':<8} SANDBOXES"]
    for r in rows:
        sandboxes = r["sandboxes"]
        assert isinstance(sandboxes, list)
        state = "active" if r["active"] else "inactive"
        lines.append(f"{r['name']!s:<12} {r['bridge']!s:<16} {r['ipv4']!s:<18} {r['ipv6']!s:<24} {state:<8} {len(sandboxes)}")
    return "\n".join(lines)


def format_info(d: dict[str, object]) -> str:
    lines = [f"{k + ':':<12} {d[k]}" for k in ("name", "bridge", "ipv4", "gateway4", "ipv6", "ipv6_mode", "active", "dnsmasq_pid")]
    sandboxes = d["sandboxes"]
    assert isinstance(sandboxes, list)
    lines.append(f"{'sandboxes:':<12} {len(sandboxes)}")
    for s in sandboxes:
        lines.append(f"  launcher {s['launcher_pid']}: {s['tap']} {s['mac']} {s['ipv4']} {s['ipv6']}")
    return "\n".join(lines)
