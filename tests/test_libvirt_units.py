"""The pure parts of the libvirt backend: domain XML, the URI's source, refused options."""

from __future__ import annotations

import dataclasses

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sandbox.mounts import Share
from sandbox.net.request import NetRequest
from sandbox.request import CommandRequest, FilesRequest, MachineRequest, RunRequest, X11Request

from sandbox import protocol
from sandbox.errors import UsageError
from sandbox.libvirt import connect_uri
from sandbox.libvirt.backend import check_options
from sandbox.libvirt.domain import DomainSpec, domain_xml

SPEC = DomainSpec(
    name="sandbox-abc", uuid="8b2f5a52-5f9e-4a53-9a55-4f2c1f0e7d11", accel="tcg", machine="microvm",
    kernel="/var/lib/libvirt/images/sandbox/vmlinux", initrd="/var/lib/libvirt/images/sandbox/initrd.cpio",
    cmdline="console=ttyS0 quiet", memory_mb=384, cpus=2, tb_size_mb=24, ports=(1, 2, 3, 4, 6),
)  # fmt: skip


def test_domain_boots_the_kernel_directly_over_the_read_only_root() -> None:
    dom = ET.fromstring(domain_xml(SPEC))
    assert dom.get("type") == "qemu"  # TCG
    assert dom.findtext("name") == "sandbox-abc" and dom.findtext("uuid") == SPEC.uuid
    assert dom.find("memory").text == "384" and dom.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    assert dom.findtext("vcpu") == "2"
    assert dom.find("os/type").get("machine") == "microvm"  # type: ignore[union-attr]
    assert dom.findtext("os/kernel") == SPEC.kernel and dom.findtext("os/initrd") == SPEC.initrd
    assert dom.findtext("os/cmdline") == "console=ttyS0 quiet"
    assert dom.find("features/acpi") is not None
    assert dom.findtext("features/tcg/tb-cache") == "24"
    assert [dom.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3
    fs = dom.find("devices/filesystem")
    assert fs is not None and fs.get("accessmode") == "passthrough" and fs.find("readonly") is not None
    assert fs.find("source").get("dir") == "/" and fs.find("target").get("dir") == protocol.ROOT_TAG  # type: ignore[union-attr]
    assert fs.find("address").get("type") == "virtio-mmio"  # type: ignore[union-attr]
    assert dom.find("devices/controller[@type='usb']").get("model") == "none"  # type: ignore[union-attr]


def test_channels_keep_the_guests_port_numbers_and_names() -> None:
    dom = ET.fromstring(domain_xml(SPEC))
    channels = {
        c.find("target").get("name"): c.find("address").get("port")  # type: ignore[union-attr]
        for c in dom.iterfind("devices/channel")
    }
    assert channels == {protocol.PORT_NAMES[n]: str(n) for n in (1, 2, 3, 4, 6)}
    assert dom.find("devices/controller[@type='virtio-serial']").get("ports") == "7"  # type: ignore[union-attr]
    assert dom.find("devices/serial").get("type") == "pty"  # type: ignore[union-attr]


def test_tcg_cpu_model_and_kvm_passthrough() -> None:
    dom = ET.fromstring(domain_xml(SPEC))
    assert dom.findtext("cpu/model") == "qemu64"
    assert {f.get("name") for f in dom.iterfind("cpu/feature")} == {"ssse3", "sse4.1", "sse4.2", "popcnt", "cx16"}
    kvm = ET.fromstring(domain_xml(DomainSpec(**{**SPEC.__dict__, "accel": "kvm", "tb_size_mb": None})))
    assert kvm.get("type") == "kvm" and kvm.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    assert kvm.find("features/tcg") is None


def test_cgroup_limits_map_to_memtune_and_cputune() -> None:
    spec = DomainSpec(**{**SPEC.__dict__, "memory_limit_mb": 900, "cpu_weight": 50, "cpu_quota": 0.5})
    dom = ET.fromstring(domain_xml(spec))
    assert dom.findtext("memtune/hard_limit") == "900"
    assert dom.findtext("cputune/shares") == "50"
    assert dom.findtext("cputune/period") == "100000" and dom.findtext("cputune/quota") == "50000"
    assert ET.fromstring(domain_xml(SPEC)).find("memtune") is None


def test_connect_comes_from_the_option_then_the_environment() -> None:
    assert connect_uri("qemu:///system", {"SANDBOX_CONNECT": "qemu+ssh://b/system"}) == "qemu:///system"
    assert connect_uri(None, {"SANDBOX_CONNECT": "qemu+ssh://b/system"}) == "qemu+ssh://b/system"
    assert connect_uri(None, {}) is None and connect_uri(None, {"SANDBOX_CONNECT": ""}) is None
    # --connect '' runs QEMU here, whatever SANDBOX_CONNECT or the config file says.
    assert connect_uri("", {"SANDBOX_CONNECT": "qemu+ssh://b/system"}) is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"net": NetRequest("user")}, "--net with --connect"),
        ({"machine": MachineRequest(keyboard=True)}, "--keyboard with --connect"),
        ({"x11": X11Request("xephyr", (800, 600))}, "--x11 with --connect"),
        ({"files": FilesRequest(shares=(Share(Path("/tmp"), "/mnt"),))}, "--share/--home with --connect"),
        ({"connect": "not a uri"}, "--connect not a uri: not a libvirt URI"),
    ],
)
def test_what_connect_cannot_do_is_one_line(changes: dict[str, object], message: str) -> None:
    request = RunRequest(CommandRequest(("true",)), connect="qemu:///system")
    with pytest.raises(UsageError, match=message):
        check_options(dataclasses.replace(request, **changes))  # type: ignore[arg-type]
