"""--net end to end: real guests on networks of namespaces the tests build (tests/netlab.py).

Never the host's own interfaces: the launcher runs inside the lab's "host"
namespace (or its "lan" one, for --net bridge), with its network
definitions in a directory of the test's own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SANDBOX, Nobody, popen, run_sandbox, run_tracked
from sandbox.core.process import start_ticks
import netlab

pytestmark = pytest.mark.vm

# (busybox 1.35's wget crashes with -T: timeout(1) bounds it instead)
WGET = "timeout 5 busybox wget -q -O -"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[netlab.Lab]:
    why = netlab.available()
    if why is not None:
        pytest.fail(f"the network tests {why} (setup.sh installs the tools; run as root)")
    lab = netlab.Lab(str(os.getpid()), tmp_path_factory.mktemp("netlab"))
    try:
        lab.setup()
        yield lab
    finally:
        netdir = lab.workdir / "networks"
        for definition in sorted(netdir.glob("*.json")):
            subprocess.run(lab.ns(lab.host, *SANDBOX, "net", "destroy", definition.stem), env=_env(lab), capture_output=True)
        for pidfile in netdir.glob("run/*/dnsmasq.pid"):  # a destroy that failed: the daemon still goes
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
        lab.teardown()


def _env(lab: netlab.Lab) -> dict[str, str]:
    return dict(os.environ, SANDBOX_NETWORK_DIR=str(lab.workdir / "networks"))


def sandbox_in(lab: netlab.Lab, ns: str, *args: str, input: bytes | None = None, timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
    """`sandbox ARGS...` inside the lab's namespace `ns`."""
    return run_tracked(lab.ns(ns, *SANDBOX, *args), input=input, timeout=timeout, env=_env(lab))


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


def addresses(text: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses in `ip -o addr` output."""
    return [ipaddress.ip_address(m) for m in re.findall(r"inet6? ([0-9a-f.:]+)/", text)]


@pytest.fixture(scope="module")
def routed(lab: netlab.Lab) -> str:
    """A NAT network whose /64 the upstream routes to the host."""
    out = ok(sandbox_in(lab, lab.host, "net", "create", "lab", "--ipv4", "10.213.77.0/24", "--ipv6", str(netlab.ROUTED)))
    assert "routed" in out
    return "lab"


def test_net_none_has_only_loopback() -> None:
    out = ok(run_sandbox("sh", "-c", "ls /sys/class/net; grep -c nameserver /etc/resolv.conf"))
    assert out.split() == ["lo", "1"]


def test_net_user_reaches_the_upstream_over_ipv4_and_ipv6(lab: netlab.Lab, nobody: Nobody) -> None:
    script = f"ip -o addr show dev eth0; {WGET} http://{netlab.UPSTREAM4}:{netlab.HTTP_PORT}/; echo; {WGET} http://[{netlab.UPSTREAM6}]:{netlab.HTTP_PORT}/"
    out = ok(sandbox_in(lab, lab.host, "run", "--net", "user", "--mac", "52:54:00:00:0a:01", "--", "sh", "-c", script))
    have = addresses(out)
    assert ipaddress.ip_address("10.0.2.15") in have
    # The guest autoconfigured from passt's RA: the host's /64 and its own MAC.
    assert netlab.eui64(netlab.HOST_PREFIX, "52:54:00:00:0a:01") in have
    # The server saw the host: passt turns the guest's packets into the host's own sockets.
    assert f"::ffff:{netlab.HOST4}" in out and str(lab.host6) in out.splitlines()[-1]
    # Anyone may use it: the same as nobody (QEMU and passt then share the user's namespaces).
    proc = run_tracked(
        lab.ns(lab.host, *nobody.prefix, *SANDBOX, "run", "--cold", "--net", "user", "--", "sh", "-c", f"{WGET} http://[{netlab.UPSTREAM6}]:{netlab.HTTP_PORT}/"),
        env=nobody.env(), cwd="/", timeout=240,
    )  # fmt: skip
    assert ok(proc).strip() == str(lab.host6)


HOST_SERVICE_PORT = 8081


@pytest.fixture(scope="module")
def host_service(lab: netlab.Lab) -> int:
    """A server on every address of the lab's host (0.0.0.0 and ::), as a database or dev server would listen."""
    lab.daemon(lab.host, sys.executable, "-c", netlab.HTTP_SERVER, str(HOST_SERVICE_PORT))
    lab.wait_for(lambda: f":{HOST_SERVICE_PORT}" in lab.sh(lab.host, "ss", "-ltn").stdout, "the host's service")
    return HOST_SERVICE_PORT


def _reach(port: int, *targets: str) -> str:
    """A guest script: for each target, 'TARGET ok' when it answered, 'TARGET no' otherwise."""
    return "; ".join(f'if {WGET} http://{t}:{port}/ >/dev/null 2>&1; then echo "{t} ok"; else echo "{t} no"; fi' for t in targets)


@pytest.mark.parametrize("who", ["root", "nobody"])
def test_net_user_walls_off_every_address_of_the_host(lab: netlab.Lab, host_service: int, nobody: Nobody, who: str) -> None:
    host_targets = [netlab.HOST4, f"[{lab.host6}]", f"[::ffff:{netlab.HOST4}]", "10.0.2.2", "0.0.0.0"]
    script = _reach(host_service, *host_targets) + "; " + _reach(netlab.HTTP_PORT, netlab.UPSTREAM4, f"[{netlab.UPSTREAM6}]")
    prefix = [] if who == "root" else nobody.prefix
    proc = run_tracked(lab.ns(lab.host, *prefix, *SANDBOX, "run", "--net", "user", "--", "sh", "-c", script),
                       env=_env(lab) if who == "root" else nobody.env(), cwd="/", timeout=240)  # fmt: skip
    lines = ok(proc).splitlines()
    assert lines == [f"{t} no" for t in host_targets] + [f"{netlab.UPSTREAM4} ok", f"[{netlab.UPSTREAM6}] ok"]
    # One line says what was refused, and how to allow it.
    notice = [ln for ln in proc.stderr.decode().splitlines() if "--net user:" in ln]
    assert len(notice) == 1 and f"{netlab.HOST4}:{host_service}" in notice[0] and "--net user,host" in notice[0], proc.stderr


def test_net_user_host_opens_the_host_on_purpose(lab: netlab.Lab, host_service: int) -> None:
    # 10.0.2.2 is then the host's loopback, as slirp's gateway is.
    targets = [netlab.HOST4, f"[{lab.host6}]", "10.0.2.2"]
    out = ok(sandbox_in(lab, lab.host, "run", "--net", "user,host", "--", "sh", "-c", _reach(host_service, *targets)))
    assert out.splitlines() == [f"{t} ok" for t in targets]


def test_passt_goes_with_a_killed_launcher(lab: netlab.Lab) -> None:
    p = popen(lab.ns(lab.host, *SANDBOX, "run", "--net", "user", "--", "sh", "-c", "echo ready; exec sleep 100"),
              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(lab))  # fmt: skip
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    children = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
    passt = [int(c) for c in children if Path(f"/proc/{c}/comm").read_text().startswith("passt")]  # passt.avx2 too
    assert len(passt) == 1
    p.send_signal(signal.SIGKILL)
    p.wait()
    # Its socket's other end closed with QEMU and the launcher: passt quits (--one-off).
    lab.wait_for(lambda: not Path(f"/proc/{passt[0]}").exists() or "Z" in Path(f"/proc/{passt[0]}/stat").read_text().split()[2], "passt to go", 20)
    # The launcher's runtime dir is the next run's to reclaim.
    ok(sandbox_in(lab, lab.host, "run", "--net", "user", "--", "true"))
    assert not list(Path("/run/sandbox").glob(f"run-{p.pid}-*"))


def test_net_nat_nats_ipv4_routes_ipv6_and_walls_off_the_host(lab: netlab.Lab, routed: str) -> None:
    mac = "52:54:00:00:0b:01"
    # Something of the host's own that the guest must not reach, on its upstream and bridge addresses.
    lab.daemon(lab.host, "python3", "-c", netlab.HTTP_SERVER, "9999")
    lab.wait_for(lambda: ":9999" in lab.sh(lab.host, "ss", "-ltn").stdout, "host service")
    script = "; ".join([
        "ip -o addr show dev eth0",
        f"echo v4=$({WGET} http://{netlab.UPSTREAM4}:{netlab.HTTP_PORT}/)",
        f"echo v6=$({WGET} http://[{netlab.UPSTREAM6}]:{netlab.HTTP_PORT}/)",
        f"echo host=$({WGET} http://{netlab.HOST4}:9999/ >/dev/null 2>&1 && echo reached || echo refused)",
        f"echo bridge=$({WGET} http://10.213.77.1:9999/ >/dev/null 2>&1 && echo reached || echo refused)",
        # Another guest's address, then another MAC: the bridge drops what it sends.
        "ip addr add 10.213.77.200/24 dev eth0 && ip route replace default via 10.213.77.1 src 10.213.77.200",
        f"echo spoofed_ip=$({WGET} http://{netlab.UPSTREAM4}:{netlab.HTTP_PORT}/ >/dev/null 2>&1 && echo reached || echo dropped)",
        "ip route replace default via 10.213.77.1 src 10.213.77.2 && ip link set eth0 address 52:54:00:00:0b:99",
        f"echo spoofed_mac=$({WGET} http://{netlab.UPSTREAM4}:{netlab.HTTP_PORT}/ >/dev/null 2>&1 && echo reached || echo dropped)",
    ])  # fmt: skip
    out = ok(sandbox_in(lab, lab.host, "run", "--net", f"nat={routed}", "--mac", mac, "--", "sh", "-c", script))
    slaac = netlab.eui64(netlab.ROUTED, mac)
    assert slaac in addresses(out)  # the prefix plus the EUI-64 of its MAC
    assert ipaddress.ip_address("10.213.77.2") in addresses(out)
    assert f"v4=::ffff:{netlab.HOST4}" in out  # NAT'd: the server saw the host
    assert f"v6={slaac}" in out  # routed: the server saw the guest itself
    assert "host=refused" in out and "bridge=refused" in out
    assert "spoofed_ip=dropped" in out and "spoofed_mac=dropped" in out
    counters = lab.sh(lab.host, "nft", "list", "chain", "bridge", "sandbox_lab", "prerouting").stdout
    assert re.search(r"iifname \. ether saddr != @macs counter packets [1-9]", counters), counters
    assert re.search(r"iifname \. ip saddr != @addrs4 counter packets [1-9]", counters), counters
    # The service is there for the host itself: the wall is what stopped the guest.
    assert lab.sh(lab.host, "python3", "-c", f"import urllib.request;urllib.request.urlopen('http://{netlab.HOST4}:9999/')").returncode == 0
    # Forwarding is on, and the host still takes its upstream's RAs (accept_ra=2).
    assert lab.sh(lab.host, "cat", "/proc/sys/net/ipv6/conf/all/forwarding").stdout.strip() == "1"
    assert lab.sh(lab.host, "cat", "/proc/sys/net/ipv6/conf/h0/accept_ra").stdout.strip() == "2"


def test_upstream_connects_back_and_guests_reach_each_other(lab: netlab.Lab, routed: str) -> None:
    serve = "mkdir /tmp/w && echo hello-from-a > /tmp/w/index.html && busybox httpd -p 7000 -h /tmp/w && ip -o addr show dev eth0 && echo ready && cat >/dev/null"
    a = popen(lab.ns(lab.host, *SANDBOX, "run", "--net", f"nat={routed}", "--mac", "52:54:00:00:0c:01", "--", "sh", "-c", serve),
              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(lab))  # fmt: skip
    try:
        assert a.stdout is not None and a.stdin is not None
        lines: list[str] = []
        while not lines or lines[-1] != "ready":
            line = a.stdout.readline().decode()
            assert line, a.stderr.read().decode() if a.stderr else ""
            lines.append(line.strip())
        have = addresses("\n".join(lines))
        a4 = next(x for x in have if x.version == 4)
        a6 = netlab.eui64(netlab.ROUTED, "52:54:00:00:0c:01")
        assert a6 in have
        fetch = f"import urllib.request;print(urllib.request.urlopen('http://[{a6}]:7000/', timeout=5).read().decode())"
        assert lab.sh(lab.up, "python3", "-c", fetch).stdout.strip() == "hello-from-a"
        out = ok(sandbox_in(lab, lab.host, "run", "--net", f"nat={routed}", "--", "sh", "-c",
                            f"{WGET} http://{a4}:7000/; {WGET} http://[{a6}]:7000/"))  # fmt: skip
        assert out.split() == ["hello-from-a", "hello-from-a"]
        a.stdin.close()
        assert a.wait(60) == 0
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()


def _set_elements(lab: netlab.Lab, network: str) -> str:
    return lab.sh(lab.host, "nft", "list", "set", "bridge", f"sandbox_{network}", "ports").stdout


def test_a_killed_launcher_is_cleaned_up_and_destroy_leaves_nothing(lab: netlab.Lab) -> None:
    ok(sandbox_in(lab, lab.host, "net", "create", "gone"))
    state = lab.workdir / "networks" / "run" / "gone"
    victim = popen(lab.ns(lab.host, *SANDBOX, "run", "--net", "nat=gone", "--", "sleep", "120"),
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(lab))  # fmt: skip
    try:
        lab.wait_for(lambda: any((state / "guests").glob("*.json")) and "sbxtap" in lab.sh(lab.host, "ip", "-br", "link").stdout, "the guest's lease", 120)
        lease = json.loads(next((state / "guests").glob("*.json")).read_text())
        assert f'"{lease["tap"]}"' in _set_elements(lab, "gone")
        refused = sandbox_in(lab, lab.host, "net", "destroy", "gone")
        assert refused.returncode == 125 and b"in use by 1 sandbox" in refused.stderr
        info = json.loads(ok(sandbox_in(lab, lab.host, "net", "info", "gone", "--json")))
        assert info["active"] and info["bridge"] == "sbx-gone" and [s["mac"] for s in info["sandboxes"]] == [lease["mac"]]
        assert re.search(r"^gone +sbx-gone +10\.213\.\d+\.0/24 +fd[0-9a-f:]+/64 +active +1$", ok(sandbox_in(lab, lab.host, "net", "list")), re.M)
        taken = sandbox_in(lab, lab.host, "run", "--net", "nat=gone", "--mac", lease["mac"], "--", "true")
        assert taken.returncode == 125 and f"--mac {lease['mac']}: a sandbox on network gone already uses it".encode() in taken.stderr
        time.sleep(1)  # let the command start: a kill in the middle of the run
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    # QEMU dies with its launcher; the tap goes with the last descriptor.
    lab.wait_for(lambda: "sbxtap" not in lab.sh(lab.host, "ip", "-br", "link").stdout, "the tap to go", 20)
    # The next run on the network reclaims the dead launcher's lease and rules.
    ok(sandbox_in(lab, lab.host, "run", "--net", "nat=gone", "--", "true"))
    assert not list((state / "guests").glob("*.json"))
    assert "sbxtap" not in _set_elements(lab, "gone")
    dnsmasq = int((state / "dnsmasq.pid").read_text())
    out = ok(sandbox_in(lab, lab.host, "net", "destroy", "gone"))
    assert f"dnsmasq {dnsmasq}" in out and "bridge sbx-gone" in out
    assert "sbx-gone" not in lab.sh(lab.host, "ip", "-br", "link").stdout
    assert "sandbox_gone" not in lab.sh(lab.host, "nft", "list", "tables").stdout
    assert start_ticks(dnsmasq) is None  # gone (or a zombie this machine's PID 1 has yet to reap: its sockets are free)
    assert not state.exists() and not (lab.workdir / "networks" / "gone.json").exists()


def test_nat66_gives_a_ula_network_outbound_ipv6(lab: netlab.Lab) -> None:
    out = ok(sandbox_in(lab, lab.host, "net", "create", "ula", "--nat66"))
    assert "ULA" in out
    got = ok(sandbox_in(lab, lab.host, "run", "--net", "nat=ula", "--", "sh", "-c", f"{WGET} http://[{netlab.UPSTREAM6}]:{netlab.HTTP_PORT}/"))
    assert got.strip() == str(lab.host6)  # masqueraded behind the host's own IPv6 address
    ok(sandbox_in(lab, lab.host, "net", "destroy", "ula"))


def test_net_bridge_takes_the_lans_ra_prefix_and_dhcp(lab: netlab.Lab) -> None:
    mac = "52:54:00:00:0d:01"
    script = f"ip -o addr show dev eth0; {WGET} http://{netlab.LAN_ROUTER4}:{netlab.HTTP_PORT}/"
    out = ok(sandbox_in(lab, lab.lan, "run", "--net", "bridge=brlan", "--mac", mac, "--", "sh", "-c", script))
    have = addresses(out)
    assert netlab.eui64(netlab.LAN_PREFIX, mac) in have
    v4 = next(x for x in have if x.version == 4)
    assert v4 in ipaddress.ip_network("203.0.113.0/24")  # from the LAN's DHCP server
    assert out.splitlines()[-1] == f"::ffff:{v4}"  # on the LAN itself: no NAT


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run", "--net", "nat=nope", "--", "true"), "no network nope (sandbox net create nope"),
        (("run", "--net", "bridge=nosuchbr", "--", "true"), "this host has no bridge nosuchbr"),
        (("run", "--net", "wifi", "--", "true"), "--net wifi: not one of none, user, user,host, nat[=NAME], bridge=BRIDGE"),
        (("run", "--net", "user", "--mac", "01:00:5e:00:00:01", "--", "true"), "a multicast address cannot be a guest's"),
        (("net", "create", "clash", "--ipv6", str(netlab.HOST_PREFIX)), "overlaps 2001:db8:1::/64 on h0"),
        (("net", "create", "clash", "--ipv4", "198.51.100.0/25"), "--ipv4 198.51.100.0/25 overlaps 198.51.100.0/24 on h0"),
        (("net", "create", "public", "--ipv4", "8.8.8.0/24"), "--ipv4 8.8.8.0/24: NAT'd guests need a private range"),
        (("net", "create", "wide", "--ipv6", "2001:db8:9::/48"), "needs a /64"),
        (("net", "info", "nope"), "no network nope"),
    ],
)
def test_bad_network_input_gets_one_line(lab: netlab.Lab, args: tuple[str, ...], message: str) -> None:
    proc = sandbox_in(lab, lab.host, *args)
    err = proc.stderr.decode()
    assert proc.returncode == 125, err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_net_nat_needs_root(nobody: Nobody) -> None:
    proc = nobody.run("run", "--net", "nat", "--", "true")
    assert proc.returncode == 125
    assert proc.stderr.decode().strip() == "sandbox: --net nat needs root (it makes a bridge, taps and firewall rules); --net user works for anyone"


ACTIVATE = "import sys; from sandbox.net import networks; [networks.activate(networks.get_or_create(n)) for n in sys.argv[1:]]"


@pytest.mark.parametrize("before", [("0", "0"), ("1", "0")])
def test_destroying_the_last_network_gives_the_host_its_forwarding_back(tmp_path: Path, before: tuple[str, str]) -> None:
    """Two networks brought up in a namespace of the test's own, then destroyed: forwarding is as it was, after the last only."""
    why = netlab.available()
    if why is not None:
        pytest.fail(f"the network tests {why} (setup.sh installs the tools; run as root)")
    ns = f"sbfwd{os.getpid()}{before[0]}"
    env = dict(os.environ, SANDBOX_NETWORK_DIR=str(tmp_path / "networks"), PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    sysctls = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")

    def in_ns(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", *argv], capture_output=True, text=True, env=env, timeout=120)

    def forwarding() -> tuple[str, str]:
        out = in_ns("sysctl", "-n", *sysctls).stdout.split()
        return out[0], out[1]

    netlab.run("ip", "netns", "add", ns)
    try:
        in_ns("ip", "link", "set", "lo", "up")
        assert in_ns("sysctl", "-qw", f"{sysctls[0]}={before[0]}", f"{sysctls[1]}={before[1]}").returncode == 0
        for name, v4 in (("fwa", "10.213.91.0/24"), ("fwb", "10.213.92.0/24")):
            assert in_ns(*SANDBOX, "net", "create", name, "--ipv4", v4).returncode == 0
        up = in_ns(sys.executable, "-c", ACTIVATE, "fwa", "fwb")
        assert up.returncode == 0, up.stderr
        assert forwarding() == ("1", "1")
        out = in_ns(*SANDBOX, "net", "destroy", "fwa")
        assert out.returncode == 0 and "forwarding" not in out.stdout, out
        assert forwarding() == ("1", "1")  # fwb still routes its guests
        out = in_ns(*SANDBOX, "net", "destroy", "fwb")
        assert out.returncode == 0, out.stderr
        assert forwarding() == before
        changed = ", ".join(f"{k}={v}" for k, v in zip(sysctls, before) if v != "1")
        assert f"removed forwarding ({changed}, as before the first network)" in out.stdout.splitlines(), out.stdout
    finally:
        for pidfile in (tmp_path / "networks").glob("run/*/dnsmasq.pid"):
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
        netlab.run("ip", "netns", "del", ns, check=False)
