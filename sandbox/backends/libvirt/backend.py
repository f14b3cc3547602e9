"""--connect URI: what the runner needs from a libvirt host (boot inputs there, and guests)."""

from __future__ import annotations

import logging
import os
import re
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox.image import host, initramfs, kernel
from sandbox.wire import protocol
from sandbox.backends.base import PORTS, Attempt, BootOnce, BootSpec, Prepared, RunContext, RunResult
from sandbox.core.errors import UsageError
from sandbox.image.guestinit import init_binary
from sandbox.plan.request import RunRequest
from sandbox.backends.libvirt import dac, images
from sandbox.backends.libvirt.connection import is_remote, open_connection
from sandbox.backends.libvirt.domain import DomainSpec
from sandbox.backends.libvirt.guest import LibvirtGuest


log = logging.getLogger(__name__)


class LibvirtBackend:
    """libvirtd runs the guest, here or on another host: one connection for one run (implements backend.Backend)."""

    name = "libvirt"
    confined_here = False  # libvirt puts up walls of its own

    def __init__(self, request: RunRequest) -> None:
        assert request.connect is not None
        check_options(request)
        self.uri = request.connect
        self.conn = open_connection(self.uri)
        self.remote = is_remote(self.conn)
        self.caps = ET.fromstring(self.conn.getCapabilities())
        self.request = request
        self.local_files = not self.remote

    def __enter__(self) -> LibvirtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass

    def _accel(self, requested: str) -> str:
        if not self.remote:
            accel, warning = host.choose_accel(requested)
            if warning:
                log.info("%s", warning)
            return accel
        if requested == "tcg":
            return "tcg"
        # KVM only where the host CPU has it (a /dev/kvm alone is not enough).
        has_kvm = any(d.get("type") == "kvm" for d in self.caps.iter("domain"))
        cpu_ok = any(f.get("name") in ("vmx", "svm") for f in self.caps.iterfind("host/cpu/feature"))
        if has_kvm and cpu_ok:
            return "kvm"
        if requested == "kvm":
            raise UsageError(f"--accel kvm: the libvirt host behind {self.uri} has no usable KVM")
        return "tcg"

    def _tsc_khz(self) -> int | None:
        counter = self.caps.find("host/cpu/counter[@name='tsc']")
        freq = counter.get("frequency") if counter is not None else None
        return int(freq) // 1000 if freq and freq.isdigit() else None

    def _microvm(self) -> bool:
        return any(m.text == "microvm" for m in self.caps.iter("machine"))

    def prepare(self, request: RunRequest) -> Prepared:
        """Kernel and initramfs on the libvirt host (the remote's own kernel when remote)."""
        m = request.machine
        accel = self._accel(m.accel or "auto")
        machine = m.machine
        if machine == "auto":
            machine = "microvm" if self._microvm() else "q35"
        wanted = initramfs.wanted_modules(machine)
        if self.remote:
            if m.kernel is not None:
                raise UsageError("--kernel with a remote --connect: the remote host's own kernel is used")
            kern = images.mirror_remote_kernel(self.conn, wanted)
        else:
            kern = kernel.find_kernel(m.kernel)
            kernel.ensure_readable(kern.image)
        pvh_image = kernel.pvh_image(kern) if m.pvh else None
        initrd = initramfs.cached(kern, init_binary(), wanted)
        pool = images.image_pool(self.conn)
        image_on_host = images.upload(self.conn, pool, pvh_image or kern.image)
        initrd_on_host = images.upload(self.conn, pool, initrd)
        qemu = host.QemuInfo(path="", version=str(self.conn.getVersion()), microvm=machine == "microvm", seccomp=False)
        tsc = self._tsc_khz() if accel == "tcg" else None
        cmdline = kernel.kernel_cmdline(accel, tsc, m.crypto_selftests, request.verbose, m.kernel_append, m.tracefs)
        return Prepared(accel, qemu, machine, Path(image_on_host), pvh_image is not None, Path(initrd_on_host), cmdline, tsc)

    def run(self, boot: BootSpec, ctx: RunContext, once: BootOnce) -> RunResult:
        return once(lambda: self.guest(boot, ctx), Attempt(1, "cold, libvirt"))

    def ready(self, request: RunRequest, boot: BootSpec) -> str | None:
        where = "remote host, its own kernel" if self.remote else "this host"
        return f"libvirt {self.uri} ({where}): kernel {boot.kernel_image}, initramfs {boot.initrd}, {boot.machine}, {boot.accel}"

    def qemu_label(self, accel: str, overlays: tuple[str, ...]) -> tuple[int, int] | None:
        """QEMU's uid and gid as a per-domain DAC label, or None for libvirt's own user (the rule is in libvirt/dac.py)."""
        if self.remote:
            return None  # our uid means nothing there; libvirt's user reads that host's files
        base = dac.default_user(self.caps, "kvm" if accel == "kvm" else "qemu")
        user = dac.Identity(*base, dac.host_groups(*base)) if base is not None else None
        choice = dac.qemu_identity((os.getuid(), os.getgid()), user, overlays)
        who = f"uid {choice.label[0]}, gid {choice.label[1]}" if choice.label is not None else "libvirt's own user"
        log.info("libvirt runs QEMU as %s: %s", who, choice.why)
        return choice.label

    def guest(self, boot: BootSpec, ctx: RunContext) -> LibvirtGuest:
        limits = self.request.confinement
        if limits is not None and limits.pids_limit:
            raise UsageError("--pids-limit with --connect: libvirt's domain XML has no pids limit")
        ident = uuid.uuid4()
        spec = DomainSpec(
            name=f"sandbox-{ident.hex[:12]}",
            uuid=str(ident),
            accel=boot.accel,
            machine=boot.machine,
            kernel=str(boot.kernel_image),
            initrd=str(boot.initrd),
            cmdline=boot.cmdline,
            memory_mb=boot.memory_mb,
            cpus=boot.cpus,
            tb_size_mb=boot.tb_size_mb,
            cpu_model=boot.cpu_model,
            memory_limit_mb=limits.memory_limit if limits is not None else None,
            cpu_weight=limits.cpu_weight if limits is not None else None,
            cpu_quota=limits.cpu_quota if limits is not None else None,
            ports=tuple(p for p in PORTS if p != protocol.PORT_X11),  # --x11 is refused with --connect
            dac_label=self.qemu_label(boot.accel, ctx.overlays),
        )
        from sandbox.confinement.audit import summarize_argv

        command = summarize_argv(self.request.command.argv) if self.request.confinement is not None else {}
        return LibvirtGuest(self.conn, spec, ctx.rundir, ctx.timeline, ctx.verbose, command, remote=self.remote)

    def vouched_images(self, trees: list[str], images_dir: str) -> tuple[dict[str, str], list[str]]:
        return {}, []  # no watcher here: a run walks its trees itself


def check_options(request: RunRequest) -> None:
    """What --connect cannot do (yet), as one line each."""
    uri = request.connect or ""
    if request.x11 is not None:
        raise UsageError("--x11 with --connect: not supported (the display would be on the libvirt host)")
    if request.net.mode != "none":
        raise UsageError("--net with --connect: not supported yet (use libvirt's own networks)")
    if request.files.shares or request.files.home:
        raise UsageError("--share/--home with --connect: not supported yet (the paths would be the libvirt host's)")
    if request.machine.keyboard:
        raise UsageError("--keyboard with --connect: not supported (use virsh send-key on the domain)")
    if not re.fullmatch(r"[a-z0-9+]+://[^\s]*", uri):
        raise UsageError(f"--connect {uri}: not a libvirt URI (e.g. qemu:///system, qemu+ssh://host/system)")
