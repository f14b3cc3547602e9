"""The QEMU command line: a pure function from a machine spec to an argv list."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sandbox.backends.base import TCG_CPU, NetDevice, Share



def escape(value: str) -> str:
    """Escape a value for QEMU's option syntax, where ',' separates keys."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class Port:
    """A virtio-serial port backed by a socket the launcher holds the other end of."""

    nr: int
    name: str
    fd: int


@dataclass(frozen=True)
class GuestRam:
    """Guest RAM in a file QEMU maps (for templates); otherwise QEMU's own anonymous memory.

    `shared`: QEMU writes through to the file (building a template); else a
    private copy-on-write mapping (restoring from one).
    """

    path: str
    shared: bool


@dataclass(frozen=True)
class MachineSpec:
    """Everything the QEMU command line depends on."""

    qemu: str
    accel: str  # "kvm" or "tcg"
    machine: str  # "microvm" or "q35"
    kernel: Path
    initrd: Path
    cmdline: str
    memory_mb: int = 512
    cpus: int = 1
    console_fd: int | None = None
    monitor_fd: int | None = None
    shares: tuple[Share, ...] = ()
    ports: tuple[Port, ...] = ()
    tb_size_mb: int | None = None
    seccomp: bool = False
    cpu_model: str | None = None  # None: host under KVM, TCG_CPU under TCG
    ram: GuestRam | None = None
    incoming: bool = False  # wait for a device state to restore (migrate-incoming)
    keyboard: bool = False  # a virtio keyboard (send-key)
    extra_monitor_fd: int | None = None  # a listening socket: QMP for other commands
    net: NetDevice | None = None
    extra: tuple[str, ...] = field(default=())


SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"



def _machine(spec: MachineSpec) -> str:
    if spec.machine == "microvm":
        # No legacy PIC/PIT/RTC and no option ROMs: less to emulate and less
        # for the guest to probe.  ACPI stays: stock kernels lack
        # VIRTIO_MMIO_CMDLINE_DEVICES and find virtio-mmio through the DSDT,
        # and its GED device is how the guest powers off.  PCIe only when a
        # device needs it (see _serial_device).
        pcie = "on" if spec.ports else "off"
        opts = f"microvm,x-option-roms=off,pit=off,pic=off,rtc=on,acpi=on,auto-kernel-cmdline=off,isa-serial=on,pcie={pcie}"
    else:
        opts = "q35,vmport=off,smbus=off,sata=off,usb=off,graphics=off"
    if spec.ram is not None:
        opts += ",memory-backend=mem0"
    return opts


def _bus_device(spec: MachineSpec, kind: str) -> str:
    """virtio device model name for the machine's transport."""
    return f"{kind}-device" if spec.machine == "microvm" else f"{kind}-pci"


def _serial_device(spec: MachineSpec) -> str:
    """virtio-serial goes over PCI even on microvm.

    Its guest driver keeps every receive queue full of 4 KiB buffers, and
    virtio-mmio offers 1024-entry queues where virtio-pci offers the
    device's own 128: 5 queues cost the guest 20 MiB over mmio and 2.5 MiB
    over PCI, for ~30 ms more boot (benchmarks/README.md).
    """
    return "virtio-serial-pci"


def _netdev(net: NetDevice) -> str:
    if net.kind == "tap":
        return f"tap,id=net0,fd={net.fd}"
    if net.kind == "stream":
        return f"stream,id=net0,server=off,addr.type=fd,addr.str={net.fd}"
    raise ValueError(f"unknown netdev kind {net.kind!r}")


def _nic(spec: MachineSpec) -> str:
    assert spec.net is not None
    # No link-status feature: the carrier is then on from the probe, with no
    # link-state event that the kernel defers by up to a second (linkwatch),
    # and IPv6 autoconfiguration, which waits for it, starts at once.
    nic = f"{_bus_device(spec, 'virtio-net')},netdev=net0,mac={spec.net.mac},status=off"
    if spec.machine != "microvm":
        nic += ",romfile="  # no PXE option ROM: the kernel is loaded directly
    return nic


def build_argv(spec: MachineSpec) -> list[str]:
    """The full QEMU argv for `spec` (argv[0] included)."""
    accel = spec.accel
    if accel == "tcg" and spec.tb_size_mb:
        accel += f",tb-size={spec.tb_size_mb}"
    argv = [
        spec.qemu,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-machine", _machine(spec),
        "-accel", accel,
        "-cpu", spec.cpu_model or ("host" if spec.accel == "kvm" else TCG_CPU),
        "-m", f"{spec.memory_mb}M",
        "-smp", str(spec.cpus),
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", spec.cmdline,
    ]  # fmt: skip
    if spec.extra_monitor_fd is not None:
        argv += ["-chardev", f"socket,id=qmp2,fd={spec.extra_monitor_fd},server=on,wait=off", "-mon", "chardev=qmp2,mode=control"]
    if spec.keyboard:
        # The guest's virtio-input driver insists on a virtio 1.0 device;
        # microvm's mmio transport is legacy unless told otherwise.
        if spec.machine == "microvm":
            argv += ["-global", "virtio-mmio.force-legacy=false"]
        argv += ["-device", _bus_device(spec, "virtio-keyboard")]
    if spec.ram is not None:
        mode = "on" if spec.ram.shared else "off"
        argv += ["-object", f"memory-backend-file,id=mem0,size={spec.memory_mb}M,mem-path={escape(spec.ram.path)},share={mode}"]
    if spec.incoming:
        # The state comes once the monitor has set the migration
        # capabilities (QEMU 7.2 has no command-line switch for x-ignore-shared).
        argv += ["-incoming", "defer"]
    if spec.console_fd is not None:
        argv += ["-chardev", f"socket,id=console,fd={spec.console_fd}", "-serial", "chardev:console"]
    else:
        argv += ["-serial", "none"]
    if spec.monitor_fd is not None:
        argv += ["-chardev", f"socket,id=qmp,fd={spec.monitor_fd}", "-mon", "chardev=qmp,mode=control"]
    for i, share in enumerate(spec.shares):
        ro = ",readonly=on" if share.readonly else ""
        argv += [
            "-fsdev",
            f"local,id=fs{i},path={escape(str(share.path))},security_model=none,multidevs=remap{ro}",
            "-device",
            f"{_bus_device(spec, 'virtio-9p')},fsdev=fs{i},mount_tag={escape(share.tag)}",
        ]
    if spec.ports:
        max_ports = max(p.nr for p in spec.ports) + 1
        argv += ["-device", f"{_serial_device(spec)},max_ports={max_ports}"]
        for p in spec.ports:
            argv += [
                "-chardev", f"socket,id=port{p.nr},fd={p.fd}",
                "-device", f"virtserialport,chardev=port{p.nr},name={escape(p.name)},nr={p.nr}",
            ]  # fmt: skip
    if spec.net is not None:
        argv += ["-netdev", _netdev(spec.net), "-device", _nic(spec)]
    if spec.seccomp:
        argv += ["-sandbox", SECCOMP]
    argv += list(spec.extra)
    return argv
