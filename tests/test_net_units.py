"""The pure parts of --net: addresses, option parsing, QEMU's NIC, nftables and daemon command lines."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest

from sandbox.wire import protocol
from sandbox.core.errors import UsageError
from sandbox.net import addresses, attachment, nft, passt
from sandbox.net.addresses import IPv4Network, IPv6Network, Route
from sandbox.net.networks import Network, check_name, dnsmasq_argv
from sandbox.backends.direct import argv as qemuargv
from sandbox.backends.base import BootSpec, NetDevice
from sandbox.net.request import parse_net
from sandbox.plan.request import NetRequest
from sandbox.backends.direct.guest import template_argv


def test_eui64_and_slaac_follow_rfc_4291() -> None:
    # RFC 4291 appendix A: flip the universal/local bit, insert ff:fe.
    assert addresses.eui64("52:54:00:12:34:56") == 0x505400FFFE123456
    assert str(addresses.slaac_address(IPv6Network("2001:db8:5::/64"), "52:54:00:12:34:56")) == "2001:db8:5:0:5054:ff:fe12:3456"
    assert str(addresses.link_local("02:00:00:00:01:02")) == "fe80::ff:fe00:102"
    with pytest.raises(ValueError):
        addresses.slaac_address(IPv6Network("2001:db8::/48"), "52:54:00:12:34:56")


def test_macs_are_qemus_unicast_and_checked() -> None:
    assert addresses.random_mac(b"\x01\x02\x03") == "52:54:00:01:02:03"
    assert addresses.parse_mac("52-54-00-AB-CD-EF") == "52:54:00:ab:cd:ef"
    for bad in ("01:00:5e:00:00:01", "00:00:00:00:00:00", "52:54:00:12:34", "zz:54:00:12:34:56"):
        with pytest.raises(UsageError, match="--mac"):
            addresses.parse_mac(bad)


def test_ula_prefix_is_a_fd00_slash_64() -> None:
    p = addresses.ula_prefix(b"\xab\xcd\xef\x01\x23")
    assert str(p) == "fdab:cdef:123::/64"
    assert p.subnet_of(IPv6Network("fd00::/8"))


@pytest.mark.parametrize(
    ("text", "message"),
    [("2001:db8::/48", "needs a /64"), ("2001:db8::1/64", "host bits"), ("10.0.0.0/24", "not an IPv6"), ("fe80::/64", "not a prefix"), ("x", "not an IPv6")],
)
def test_bad_ipv6_prefixes_get_one_line(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        addresses.parse_ipv6_prefix(text)


def test_ipv4_networks_must_be_private_and_not_tiny() -> None:
    assert addresses.parse_ipv4_net("192.168.50.0/24") == IPv4Network("192.168.50.0/24")
    for bad, message in (("8.8.8.0/24", "private"), ("10.0.0.0/30", "between 8 and 29"), ("10.0.0.1/24", "host bits")):
        with pytest.raises(UsageError, match=message):
            addresses.parse_ipv4_net(bad)


def test_clash_with_host_routes_ignores_default_routes() -> None:
    routes = [Route(IPv4Network("0.0.0.0/0"), "eth0"), Route(IPv4Network("10.213.0.0/23"), "eth1"), Route(IPv6Network("2001:db8:1::/64"), "eth0")]
    assert addresses.clash(IPv4Network("10.213.1.0/24"), routes) == routes[1]
    assert addresses.clash(IPv4Network("10.213.2.0/24"), routes) is None
    assert addresses.clash(IPv6Network("2001:db8:1::/64"), routes) == routes[2]
    # The first free automatic /24 skips both the routes and other networks.
    assert addresses.pick_ipv4([IPv4Network("10.213.2.0/24")], routes) == IPv4Network("10.213.3.0/24")


def test_guest_addresses_skip_the_gateway_and_taken_ones() -> None:
    net = IPv4Network("10.213.0.0/29")
    assert str(addresses.gateway(net)) == "10.213.0.1"
    taken = {ipaddress.IPv4Address("10.213.0.2")}
    assert str(addresses.guest_ipv4(net, taken)) == "10.213.0.3"
    full = {ipaddress.IPv4Address(f"10.213.0.{i}") for i in range(2, 7)}
    with pytest.raises(UsageError, match="no free address"):
        addresses.guest_ipv4(net, full)


def test_net_option_parsing() -> None:
    assert parse_net("none") == NetRequest("none")
    assert parse_net("nat") == NetRequest("nat", "default")
    assert parse_net("nat=lab-1", "52:54:00:00:00:09") == NetRequest("nat", "lab-1", "52:54:00:00:00:09")
    assert parse_net("bridge=br0").label == "bridge=br0"
    for bad, message in (("wifi", "not one of"), ("user=x", "takes no name"), ("bridge", "bridge= needs"), ("nat=Bad_Name", "network name")):
        with pytest.raises(UsageError, match=message):
            parse_net(bad)
    with pytest.raises(UsageError, match="--mac needs a network"):
        parse_net("none", "52:54:00:00:00:01")
    assert check_name("a-b1") == "a-b1"


def test_guest_net_record_in_the_spec() -> None:
    net = protocol.GuestNet("nat=default", "52:54:00:00:00:01", "10.213.0.2/24", "10.213.0.1", 1, ("10.213.0.1",), ("lab",), 5000)
    spec = protocol.CommandSpec(argv=("true",), env=(), cwd="/", home="/", uid=0, gid=0, net=net)
    body = protocol.encode_spec(spec).split(b"\n", 1)[1]
    records = body.split(b"\0")
    assert b"n52:54:00:00:00:01 10.213.0.2/24 10.213.0.1 1 5000 0 nat=default" in records
    assert b"d10.213.0.1" in records and b"slab" in records
    bridge = protocol.GuestNet("bridge=br0", "52:54:00:00:00:01", "dhcp", None, 2)
    assert bridge.encode() == "52:54:00:00:00:01 dhcp - 2 10000 0 bridge=br0"


def _spec(machine: str, net: NetDevice | None) -> qemuargv.MachineSpec:
    return qemuargv.MachineSpec(qemu="qemu", accel="tcg", machine=machine, kernel=Path("k"), initrd=Path("i"), cmdline="", net=net)


def test_nic_backends_come_as_descriptors() -> None:
    tap = qemuargv.build_argv(_spec("microvm", NetDevice("tap", 7, "52:54:00:00:00:01")))
    i = tap.index("-netdev")
    assert tap[i + 1] == "tap,id=net0,fd=7"
    assert tap[i + 2 : i + 4] == ["-device", "virtio-net-device,netdev=net0,mac=52:54:00:00:00:01,status=off"]
    stream = qemuargv.build_argv(_spec("q35", NetDevice("stream", 9, "52:54:00:00:00:02")))
    i = stream.index("-netdev")
    assert stream[i + 1] == "stream,id=net0,server=off,addr.type=fd,addr.str=9"
    assert stream[i + 3] == "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:02,status=off,romfile="
    assert "-netdev" not in qemuargv.build_argv(_spec("microvm", None))


def test_template_key_keeps_the_nic_kind_not_its_mac_or_descriptor() -> None:
    def boot(net: NetDevice | None) -> BootSpec:
        return BootSpec("qemu", "tcg", "microvm", Path("k"), True, Path("i"), "", 512, 1, 24, None, True, False, (), net=net)

    a = template_argv(boot(NetDevice("tap", 7, "52:54:00:00:00:01")))
    b = template_argv(boot(NetDevice("tap", 11, "52:54:00:aa:bb:cc")))
    assert a == b
    assert a != template_argv(boot(NetDevice("stream", 7, "52:54:00:00:00:01")))
    assert a != template_argv(boot(None))


def test_passt_forwards_nothing_and_does_not_map_the_gateway_to_the_host() -> None:
    argv = passt.argv("/usr/bin/passt", 5, ipv4=True, ipv6=True)
    assert argv[:2] == ["/usr/bin/passt", "--foreground"]
    assert argv[argv.index("--fd") + 1] == "5"
    assert argv[argv.index("-t") + 1] == "none" and argv[argv.index("-u") + 1] == "none"
    assert "--no-map-gw" in argv and "--one-off" in argv
    assert "--ipv4-only" in passt.argv("p", 5, ipv4=True, ipv6=False)
    assert "--ipv6-only" in passt.argv("p", 5, ipv4=False, ipv6=True)


NET = Network("lab", IPv4Network("10.213.7.0/24"), IPv6Network("2001:db8:5::/64"))


def test_dnsmasq_serves_only_its_bridge() -> None:
    argv = dnsmasq_argv(NET, Path("/run/x"))
    assert "--interface=sbx-lab" in argv and "--bind-interfaces" in argv and "--except-interface=lo" in argv
    assert "--dhcp-range=10.213.7.2,10.213.7.254,255.255.255.0,1h" in argv
    assert "--dhcp-range=2001:db8:5::,ra-only,64,1h" in argv and "--enable-ra" in argv
    assert "--conf-file=/dev/null" in argv  # never the host's dnsmasq.conf
    assert NET.ipv6_routed and not Network("u", NET.ipv4, IPv6Network("fd12:3456:789a::/64")).ipv6_routed


def test_nft_tables_are_per_network_and_guests_are_set_elements() -> None:
    text = nft.network_ruleset("lab-1", "sbx-lab-1", NET.ipv4, NET.ipv6, nat66=False)
    assert "table inet sandbox_lab_1 {" in text and "table bridge sandbox_lab_1 {" in text
    assert "ip saddr 10.213.7.0/24 oifname != \"sbx-lab-1\" masquerade" in text
    assert "ip6 saddr" not in text.split("chain postrouting")[1].split("}")[0]
    assert "ip6 saddr 2001:db8:5::/64 oifname" in nft.network_ruleset("lab-1", "sbx-lab-1", NET.ipv4, NET.ipv6, nat66=True)
    port = nft.GuestPort("sbxtap3", "52:54:00:00:00:01", ipaddress.IPv4Address("10.213.7.2"), (ipaddress.IPv6Address("fe80::1"),))
    add = nft.guest_ruleset("lab-1", add=[port])
    assert 'add element bridge sandbox_lab_1 macs { "sbxtap3" . 52:54:00:00:00:01 }' in add
    assert 'add element bridge sandbox_lab_1 addrs6 { "sbxtap3" . fe80::1 }' in add
    assert nft.guest_ruleset("lab-1", remove=[port]).count("delete element") == 4


def test_nft_accepts_the_rulesets() -> None:
    if shutil.which("nft") is None:
        pytest.fail("needs nft (setup.sh installs nftables)")
    # -c: parse and check against the kernel without changing anything.
    text = nft.network_ruleset("lab", "sbx-lab", NET.ipv4, NET.ipv6, nat66=True)
    port = nft.GuestPort("sbxtap0", "52:54:00:00:00:01", ipaddress.IPv4Address("10.213.7.2"), (ipaddress.IPv6Address("fe80::1"),))
    text += nft.guest_ruleset("lab", add=[port])
    proc = subprocess.run(["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
