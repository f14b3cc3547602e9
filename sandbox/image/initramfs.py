"""The guest's initramfs: the static init plus only the modules it loads, cached by key."""

from __future__ import annotations

import logging
from pathlib import Path

from sandbox.core import cache, progress
from sandbox.image import modules
from sandbox.image.cpio import CpioWriter
from sandbox.image.kernel import Kernel

log = logging.getLogger(__name__)

# What the init needs beyond the transport, which depends on the machine type.
# loop, erofs: host trees from images (hostfiles.py); crc32c_generic is
# libcrc32c's soft dependency (modules.softdep), which erofs needs loaded.
BASE_MODULES = ["virtio_console", "9pnet_virtio", "9p", "overlay", "loop", "crc32c_generic", "erofs"]
# microvm: 9p over mmio, virtio-serial over PCI (qemu/argv.py, _serial_device).
TRANSPORT_MODULES = {"microvm": ["virtio_mmio", "virtio_pci"], "q35": ["virtio_pci"]}


KEYBOARD_MODULES = ["virtio_input", "evdev"]  # --keyboard: a virtio keyboard read through /dev/input
NET_MODULES = ["virtio_net"]  # --net: loaded only when the guest has a NIC


def wanted_modules(machine: str, keyboard: bool = False, net: bool = False) -> list[str]:
    """Module names the guest loads, transport first so the devices exist."""
    return TRANSPORT_MODULES[machine] + BASE_MODULES + (KEYBOARD_MODULES if keyboard else []) + (NET_MODULES if net else [])


def build(kernel: Kernel, init: Path, wanted: list[str]) -> bytes:
    """The initramfs as bytes (a pure function of its inputs)."""
    w = CpioWriter()
    for d in ("dev", "proc", "sys", "newroot", "hostroot", "stage", "modules"):
        w.dir(d)
    w.char_device("dev/console", 5, 1)
    w.file("init", init.read_bytes(), 0o755)
    order = []
    for mod in modules.resolve_in(kernel.modules_dir, wanted):
        fname = f"{mod.name}.ko"
        w.file(f"modules/{fname}", modules.strip_signature(modules.read_module(kernel.modules_dir, mod)))
        order.append(f"{mod.name} {fname}\n")
    w.file("modules/order", "".join(order).encode())
    return w.getvalue()


def cached(kernel: Kernel, init: Path, wanted: list[str]) -> Path:
    """Path of the cached initramfs for these inputs, built when missing."""
    key = cache.content_hash(
        kernel.version.encode(),
        cache.file_identity(kernel.modules_dir / "modules.dep").encode(),
        init.name.encode(),  # the init's name carries its source hash
        b"unsigned-modules",
        " ".join(wanted).encode(),
    )
    path = cache.cache_dir() / f"initramfs-{kernel.version}-{key}.cpio"
    if not path.exists():
        log.info("building %s", path)
        with progress.step("building the guest image (its initramfs)"):
            cache.write_atomic(path, build(kernel, init, wanted))
    return path
