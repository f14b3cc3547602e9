"""A small network of namespaces for the --net tests: never the host's real interfaces.

    upstream ns ──veth── host ns            (sandbox run --net user|nat runs here)
        │  198.51.100.1/24, 2001:db8:1::1/64, radvd, an HTTP server
        └──veth── lan ns: bridge brlan      (sandbox run --net bridge=brlan)
           203.0.113.1/24, 2001:db8:2::1/64, radvd, DHCP (dnsmasq)

The routed /64 of the host's virtual network (ROUTED) is routed to the
host's SLAAC address, as a site's router would.  Addresses are from the
documentation ranges.  Each lab's namespaces carry the creating pid, so
labs of concurrent test runs never meet.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST_MAC = "02:00:00:00:01:02"
UPSTREAM4 = "198.51.100.1"
HOST4 = "198.51.100.2"
UPSTREAM6 = "2001:db8:1::1"
HOST_PREFIX = ipaddress.IPv6Network("2001:db8:1::/64")
LAN_PREFIX = ipaddress.IPv6Network("2001:db8:2::/64")
LAN_ROUTER4 = "203.0.113.1"
ROUTED = ipaddress.IPv6Network("2001:db8:5::/64")  # the NAT network's /64, routed to the host
HTTP_PORT = 8080

# Answers every GET with the client's address: the test sees what the server saw.
HTTP_SERVER = r"""
import http.server, socket, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.client_address[0].encode()
        if self.path.startswith("/bytes/"):
            body = b"x" * int(self.path[7:])
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
S(("::", int(sys.argv[1])), H).serve_forever()
"""


def run(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, input=input)


def eui64(prefix: ipaddress.IPv6Network, mac: str) -> ipaddress.IPv6Address:
    b = [int(x, 16) for x in mac.split(":")]
    b[0] ^= 2
    return ipaddress.IPv6Address(int(prefix.network_address) | int.from_bytes(bytes(b[:3] + [0xFF, 0xFE] + b[3:]), "big"))


@dataclass
class Lab:
    tag: str
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def up(self) -> str:
        return f"sbup{self.tag}"

    @property
    def host(self) -> str:
        return f"sbhost{self.tag}"

    @property
    def lan(self) -> str:
        return f"sblan{self.tag}"

    @property
    def host6(self) -> ipaddress.IPv6Address:
        return eui64(HOST_PREFIX, HOST_MAC)

    def ns(self, ns: str, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{ns}", "--", *argv]

    def sh(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*self.ns(ns, *argv), check=check)

    def daemon(self, ns: str, *argv: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(self.ns(ns, *argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def radvd(self, ns: str, ifname: str, prefix: ipaddress.IPv6Network) -> None:
        conf = self.workdir / f"radvd-{ns}-{ifname}.conf"
        conf.write_text(
            f"interface {ifname} {{\n AdvSendAdvert on;\n MinRtrAdvInterval 3;\n MaxRtrAdvInterval 10;\n"
            f" AdvDefaultLifetime 1800;\n prefix {prefix} {{ AdvOnLink on; AdvAutonomous on; }};\n}};\n"
        )
        self.daemon(ns, "radvd", "--nodaemon", "-C", str(conf), "-p", str(self.workdir / f"radvd-{ns}-{ifname}.pid"), "-m", "stderr")

    def setup(self) -> None:
        for ns in (self.up, self.host, self.lan):
            run("ip", "netns", "add", ns)
            self.sh(ns, "ip", "link", "set", "lo", "up")
        # upstream <-> host
        run("ip", "-n", self.up, "link", "add", "u0", "type", "veth", "peer", "name", "h0", "netns", self.host)
        run("ip", "-n", self.host, "link", "set", "h0", "address", HOST_MAC)
        self.sh(self.up, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", "net.ipv4.ip_forward=1")
        run("ip", "-n", self.up, "addr", "add", f"{UPSTREAM4}/24", "dev", "u0")
        run("ip", "-n", self.up, "addr", "add", f"{UPSTREAM6}/64", "dev", "u0", "nodad")
        run("ip", "-n", self.up, "link", "set", "u0", "up")
        run("ip", "-n", self.host, "addr", "add", f"{HOST4}/24", "dev", "h0")
        run("ip", "-n", self.host, "link", "set", "h0", "up")
        run("ip", "-n", self.host, "route", "add", "default", "via", UPSTREAM4)
        run("ip", "-n", self.up, "-6", "route", "add", str(ROUTED), "via", str(self.host6))
        # upstream <-> lan (a bridge with the upstream's router and DHCP on it)
        run("ip", "-n", self.up, "link", "add", "u1", "type", "veth", "peer", "name", "l0", "netns", self.lan)
        run("ip", "-n", self.up, "addr", "add", f"{LAN_ROUTER4}/24", "dev", "u1")
        run("ip", "-n", self.up, "addr", "add", f"{LAN_PREFIX.network_address + 1}/64", "dev", "u1", "nodad")
        run("ip", "-n", self.up, "link", "set", "u1", "up")
        run("ip", "-n", self.lan, "link", "add", "brlan", "type", "bridge", "forward_delay", "0")
        run("ip", "-n", self.lan, "link", "set", "l0", "master", "brlan", "up")
        run("ip", "-n", self.lan, "link", "set", "brlan", "up")
        self.radvd(self.up, "u0", HOST_PREFIX)
        self.radvd(self.up, "u1", LAN_PREFIX)
        self.daemon(
            self.up, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--interface=u1", "--bind-interfaces",
            "--dhcp-range=203.0.113.50,203.0.113.99,255.255.255.0,1h", f"--dhcp-leasefile={self.workdir / 'lan.leases'}",
            f"--pid-file={self.workdir / 'lan-dnsmasq.pid'}", "--dhcp-option=option:router,203.0.113.1",
        )  # fmt: skip
        self.daemon(self.up, sys.executable, "-c", HTTP_SERVER, str(HTTP_PORT))
        self.wait_for(lambda: str(self.host6) in self.sh(self.host, "ip", "-6", "addr", "show", "dev", "h0", "-tentative").stdout, "host SLAAC")
        self.wait_for(lambda: "default" in self.sh(self.host, "ip", "-6", "route", "show", "default").stdout, "host IPv6 default route")
        self.wait_for(lambda: self.sh(self.up, "ss", "-ltn").stdout.count(f":{HTTP_PORT}") > 0, "HTTP server")

    def wait_for(self, cond: object, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():  # type: ignore[operator]
                return
            time.sleep(0.1)
        raise TimeoutError(f"lab: {what} not ready within {timeout} s")

    def teardown(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for ns in (self.up, self.host, self.lan):
            run("ip", "netns", "del", ns, check=False)


def available() -> str | None:
    """Why the lab cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nsenter", "radvd", "dnsmasq", "passt", "nft", "ss"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None
