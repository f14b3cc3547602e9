from pathlib import Path

from sandbox.backends.direct import argv as qemucmd
from sandbox.backends.base import Share
from sandbox.backends.direct.argv import MachineSpec, Port


def spec(**kw: object) -> MachineSpec:
    base: dict[str, object] = dict(
        qemu="qemu-system-x86_64",
        accel="tcg",
        machine="microvm",
        kernel=Path("/k"),
        initrd=Path("/i"),
        cmdline="quiet",
        console_fd=7,
        shares=(Share("root", Path("/")),),
        ports=(Port(1, "sandbox.control", 8), Port(3, "sandbox.stdout", 9)),
        tb_size_mb=48,
    )
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


def value_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_microvm_is_minimal_and_uses_mmio_devices() -> None:
    argv = qemucmd.build_argv(spec())
    assert argv[0] == "qemu-system-x86_64"
    assert {"-nodefaults", "-no-user-config", "-no-reboot"} <= set(argv)
    machine = value_after(argv, "-machine")[0]
    assert machine.startswith("microvm,") and "x-option-roms=off" in machine and "pit=off" in machine
    assert "pcie=on" in machine  # for virtio-serial
    assert value_after(argv, "-accel") == ["tcg,tb-size=48"]
    devices = value_after(argv, "-device")
    assert devices[0] == "virtio-9p-device,fsdev=fs0,mount_tag=root"
    assert "virtio-serial-pci,max_ports=4" in devices  # 128-entry queues, not mmio's 1024
    assert "virtserialport,chardev=port3,name=sandbox.stdout,nr=3" in devices
    assert "socket,id=port1,fd=8" in value_after(argv, "-chardev")
    assert value_after(argv, "-serial") == ["chardev:console"]


def test_microvm_without_ports_has_no_pci() -> None:
    argv = qemucmd.build_argv(spec(ports=()))
    assert "pcie=off" in value_after(argv, "-machine")[0]
    assert not any("virtio-serial" in d for d in value_after(argv, "-device"))


def test_q35_uses_pci_devices_and_kvm_uses_host_cpu() -> None:
    argv = qemucmd.build_argv(spec(machine="q35", accel="kvm"))
    assert value_after(argv, "-machine")[0].startswith("q35,")
    assert value_after(argv, "-accel") == ["kvm"]  # no TB cache outside TCG
    assert value_after(argv, "-cpu") == ["host"]
    assert "virtio-9p-pci,fsdev=fs0,mount_tag=root" in value_after(argv, "-device")


def test_commas_in_values_are_escaped() -> None:
    argv = qemucmd.build_argv(spec(shares=(Share("home", Path("/srv/a,b"), readonly=False),)))
    [fsdev] = value_after(argv, "-fsdev")
    assert "path=/srv/a,,b," in fsdev
    assert "readonly" not in fsdev
    assert qemucmd.escape("a,b,,c") == "a,,b,,,,c"


def test_read_only_root_share() -> None:
    [fsdev] = value_after(qemucmd.build_argv(spec()), "-fsdev")
    assert fsdev.endswith(",readonly=on") and "security_model=none" in fsdev


def test_seccomp_option() -> None:
    assert value_after(qemucmd.build_argv(spec(seccomp=True)), "-sandbox") == [qemucmd.SECCOMP]
    assert "-sandbox" not in qemucmd.build_argv(spec())


def test_argv_is_a_list_of_strings_with_no_shell() -> None:
    argv = qemucmd.build_argv(spec(cmdline="a b; rm -rf /"))
    assert all(isinstance(a, str) for a in argv)
    assert value_after(argv, "-append") == ["a b; rm -rf /"]
