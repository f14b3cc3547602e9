"""The pure parts of the libvirt backend: domain XML, QEMU's user, where a run starts, the URI's source, refused options."""

from __future__ import annotations

import dataclasses
import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sandbox.plan.mounts import Share
from sandbox.plan.request import NetRequest
from sandbox.plan.request import CommandRequest, FilesRequest, MachineRequest, RunRequest, X11Request

from sandbox.wire import protocol
from sandbox.run import runner
from sandbox.core.errors import UsageError
from sandbox.backends.libvirt import connect_uri, dac, images
from sandbox.backends.libvirt.backend import check_options
from sandbox.backends.libvirt.connection import message
from sandbox.backends.libvirt.domain import DomainSpec, domain_xml

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
    assert {f.get("name") for f in dom.iterfind("cpu/feature")} == {"ssse3", "sse4.1", "sse4.2", "popcnt", "cx16", "arat"}
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


def test_a_dac_label_runs_qemu_as_that_uid_and_gid_without_relabelling() -> None:
    dom = ET.fromstring(domain_xml(DomainSpec(**{**SPEC.__dict__, "dac_label": (1000, 1001)})))
    label = dom.find("seclabel")
    assert label is not None and label.attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert label.findtext("label") == "+1000:+1001"
    assert ET.fromstring(domain_xml(SPEC)).find("seclabel") is None  # libvirt's own user


def test_uploaded_images_are_readable_by_any_qemu_user() -> None:
    vol = ET.fromstring(images._vol_xml("vmlinux-x", 123))
    assert vol.findtext("target/permissions/mode") == "0644"


CAPS = ET.fromstring(
    "<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel>"
    "<secmodel><model>dac</model><doi>0</doi><baselabel type='kvm'>+64055:+107</baselabel>"
    "<baselabel type='qemu'>+64055:+64055</baselabel></secmodel></host></capabilities>"
)


def test_libvirts_own_qemu_user_comes_from_its_capabilities() -> None:
    assert dac.default_user(CAPS, "qemu") == (64055, 64055)
    assert dac.default_user(CAPS, "kvm") == (64055, 107)
    assert dac.default_user(ET.fromstring("<capabilities><host/></capabilities>"), "qemu") is None
    assert dac.parse_label("+0:+0") == (0, 0) and dac.parse_label("libvirt-qemu:kvm") is None


def _stat(modes: dict[str, tuple[int, int, int]]):  # type: ignore[no-untyped-def]
    def fake(path: str) -> os.stat_result:
        if path not in modes:
            raise FileNotFoundError(path)
        mode, uid, gid = modes[path]
        return os.stat_result((stat.S_IFDIR | mode, 0, 0, 2, uid, gid, 0, 0, 0, 0))

    return fake


TREE = {
    "/": (0o755, 0, 0), "/root": (0o700, 0, 0), "/home": (0o755, 0, 0), "/home/al": (0o750, 1000, 64055),
    "/home/bo": (0o711, 1001, 1001), "/home/bo/pub": (0o755, 1001, 1001), "/tmp": (0o1777, 0, 0),
}  # fmt: skip
LIBVIRT_QEMU = dac.Identity(64055, 64055, (107, 64055))


@pytest.mark.parametrize(
    ("path", "readable"),
    [("/tmp", True), ("/root", False), ("/home/al", True), ("/home/bo", False), ("/home/bo/pub", True), ("/gone", False)],
)
def test_readable_means_listable_and_reachable_by_mode_bits(path: str, readable: bool) -> None:
    # /home/al through its group; /home/bo can be passed through but not listed.
    assert dac.can_read(path, LIBVIRT_QEMU, _stat(TREE)) is readable
    assert dac.can_read(path, dac.Identity(0, 0), _stat(TREE)) is True


def test_a_normal_users_qemu_always_runs_as_that_user() -> None:
    choice = dac.qemu_identity((1000, 1000), LIBVIRT_QEMU, ["/tmp"], exists=lambda p: True, readable=lambda p, who: True)
    assert choice.label == (1000, 1000)


def test_roots_qemu_runs_as_root_only_where_libvirts_user_cannot_read() -> None:
    read = lambda p, who: dac.can_read(p, who, _stat(TREE))  # noqa: E731
    exists = lambda p: p in TREE  # noqa: E731
    assert dac.qemu_identity((0, 0), LIBVIRT_QEMU, ["/home", "/tmp"], exists, read).label is None
    choice = dac.qemu_identity((0, 0), LIBVIRT_QEMU, ["/home", "/tmp", "/root"], exists, read)
    assert choice.label == (0, 0) and "cannot read /root" in choice.why
    # A directory the host lacks is not overlaid (the guest skips it), so it needs no reading.
    assert dac.qemu_identity((0, 0), LIBVIRT_QEMU, ["/tmp", "/nonexistent"], exists, read).label is None
    # No DAC driver, or libvirt's user already the caller: nothing to ask for.
    assert dac.qemu_identity((0, 0), None, ["/root"], exists, read).label is None
    assert dac.qemu_identity((0, 0), dac.Identity(0, 0), ["/root"], exists, read).label is None


def test_a_remote_run_starts_in_the_home_unless_told_otherwise() -> None:
    assert runner.start_directory(None, None, "/root", remote=True) == "/root"
    assert runner.start_directory("/srv/b", None, "/root", remote=True) == "/srv/b"
    assert runner.start_directory("build", None, "/home/al", remote=True) == "/home/al/build"
    assert runner.start_directory("~/x", None, "/home/al", remote=True) == "/home/al/x"
    assert runner.start_directory(None, None, "/", remote=True) == "/"  # no home: the root


def test_a_local_run_starts_where_the_launcher_is_or_in_its_workdir(tmp_path: Path) -> None:
    assert runner.start_directory(None, "/srv/proj", "/root", remote=False) == "/srv/proj"
    assert runner.start_directory("sub/../lib", "/srv/proj", "/root", remote=False) == "/srv/proj/lib"
    real = os.path.realpath(str(tmp_path))
    link = os.path.join(real, "link")
    os.symlink(real, link)
    assert runner.start_directory(link, "/", "/root", remote=False) == real  # as the working directory: its real path


def test_pwd_names_where_the_command_starts() -> None:
    env = {"PWD": "/home/al/link", "HOME": "/home/al"}
    assert runner.start_environment(env, "/home/al/real", "/home/al/real") == env  # the shell's own PWD, as a direct run
    assert runner.start_environment(env, "/home/al", None)["PWD"] == "/home/al"  # remote
    assert runner.start_environment(env, "/tmp", "/home/al/real")["PWD"] == "/tmp"  # --workdir


def test_a_remote_runs_home_is_private_and_its_start_is_not_looked_up() -> None:
    opts = RunRequest(CommandRequest(("true",)))
    plan = runner.mount_plan(opts, "/root/", "/root", remote=True)
    steps = [(m.op, m.path, m.tag) for m in plan.steps]
    assert (protocol.MOP_TMPFS, "/root", "u") in steps
    assert not any(op == protocol.MOP_OVERLAY and path == "/root" for op, path, _ in steps)


def test_a_qemu_that_died_starting_is_reported_by_its_last_line_not_its_first_warning() -> None:
    text = (
        "internal error: process exited while connecting to monitor: qemu-system-x86_64: -fsdev local,path=/,readonly: "
        "warning: short-form boolean option 'readonly' deprecated\nPlease use readonly=on instead\n"
        "char device redirected to /dev/pts/0 (label charserial0)\nqemu: could not open kernel file '/k': Permission denied\n"
    )
    assert message(Exception(text)) == "internal error: process exited while connecting to monitor: qemu: could not open kernel file '/k': Permission denied"
    assert message(Exception("Domain not found: no domain with matching uuid")) == "Domain not found: no domain with matching uuid"
    assert message(Exception("")) == "Exception"
