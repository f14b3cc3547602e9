"""Domain XML for a sandbox: a pure function from a spec to a string."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from sandbox.wire import protocol
from sandbox.backends.base import TCG_CPU


@dataclass(frozen=True)
class DomainSpec:
    """Everything the domain XML depends on."""

    name: str
    uuid: str
    accel: str  # "kvm" or "tcg"
    machine: str  # "microvm" or "q35"
    kernel: str  # paths on the target host
    initrd: str
    cmdline: str
    memory_mb: int = 512
    cpus: int = 1
    emulator: str | None = None  # None: libvirt's default for the arch
    tb_size_mb: int | None = None
    cpu_model: str | None = None
    memory_limit_mb: int | None = None  # <memtune><hard_limit>
    cpu_weight: int | None = None  # <cputune><shares>
    cpu_quota: float | None = None  # CPUs, as <period>/<quota>
    ports: tuple[int, ...] = ()  # virtio-serial port numbers (protocol.PORT_*)
    dac_label: tuple[int, int] | None = None  # QEMU's uid and gid; None: libvirt's own user (qemu.conf)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    e = ET.SubElement(parent, tag, attrs)
    if text is not None:
        e.text = text
    return e


def _cpu(parent: ET.Element, spec: DomainSpec) -> None:
    if spec.accel == "kvm" and spec.cpu_model is None:
        _sub(parent, "cpu", mode="host-passthrough")
        return
    model, *features = (spec.cpu_model or TCG_CPU).split(",")
    cpu = _sub(parent, "cpu", mode="custom", match="exact", check="none")
    _sub(cpu, "model", model, fallback="forbid")
    for f in features:
        policy = "disable" if f.startswith("-") else "require"
        _sub(cpu, "feature", policy=policy, name=f.lstrip("+-"))


def _mmio(dev: ET.Element, spec: DomainSpec) -> None:
    if spec.machine == "microvm":
        _sub(dev, "address", type="virtio-mmio")


def domain_xml(spec: DomainSpec) -> str:
    """The transient domain libvirt creates for one sandbox."""
    dom = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", spec.uuid)
    _sub(dom, "memory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "vcpu", str(spec.cpus))
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine=spec.machine)
    _sub(os_, "kernel", spec.kernel)
    _sub(os_, "initrd", spec.initrd)
    _sub(os_, "cmdline", spec.cmdline)
    features = _sub(dom, "features")
    # The guest finds its virtio-mmio devices through ACPI, and powers off through it.
    _sub(features, "acpi")
    if spec.accel != "kvm" and spec.tb_size_mb:
        _sub(_sub(features, "tcg"), "tb-cache", str(spec.tb_size_mb), unit="MiB")
    _cpu(dom, spec)
    _sub(dom, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(dom, event, "destroy")
    if spec.memory_limit_mb:
        _sub(_sub(dom, "memtune"), "hard_limit", str(spec.memory_limit_mb), unit="MiB")
    if spec.cpu_weight or spec.cpu_quota:
        tune = _sub(dom, "cputune")
        if spec.cpu_weight:
            _sub(tune, "shares", str(spec.cpu_weight))
        if spec.cpu_quota:
            period = 100_000
            _sub(tune, "period", str(period))
            _sub(tune, "quota", str(int(spec.cpu_quota * period)))
    if spec.dac_label is not None:
        uid, gid = spec.dac_label
        label = _sub(dom, "seclabel", type="static", model="dac", relabel="no")
        _sub(label, "label", f"+{uid}:+{gid}")
    devices = _sub(dom, "devices")
    if spec.emulator:
        _sub(devices, "emulator", spec.emulator)
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")
    # The host's root, read-only: libvirt's passthrough is QEMU's
    # security_model=none (the files' own owners and modes).
    fs = _sub(devices, "filesystem", type="mount", accessmode="passthrough", multidevs="remap")
    _sub(fs, "driver", type="path")
    _sub(fs, "source", dir="/")
    _sub(fs, "target", dir=protocol.ROOT_TAG)
    _sub(fs, "readonly")
    _mmio(fs, spec)
    if spec.ports:
        ctrl = _sub(devices, "controller", type="virtio-serial", index="0", ports=str(max(spec.ports) + 1))
        _mmio(ctrl, spec)
        for nr in spec.ports:
            ch = _sub(devices, "channel", type="unix")
            _sub(ch, "source", mode="bind")
            _sub(ch, "target", type="virtio", name=protocol.PORT_NAMES[nr])
            _sub(ch, "address", type="virtio-serial", controller="0", bus="0", port=str(nr))
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")
