"""Kernel and initramfs on the libvirt host, through libvirt's storage API only.

Nothing assumes that the launcher and libvirtd share paths.  The images
go into a storage pool on the target (`sandbox`, a directory QEMU there
can read, whatever its user), named by content, uploaded once.  For a
remote host the kernel is the remote's own: its /boot and the modules the
guest needs are read through transient read-only directory pools, into a
local mirror, and the initramfs is built here from that mirror, exactly as
for a local kernel.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox.core import cache, progress
from sandbox.image import kernel, modules
from sandbox.core.errors import KernelError
from sandbox.backends.libvirt.connection import LibvirtError, message

if TYPE_CHECKING:
    import libvirt

log = logging.getLogger(__name__)

POOL = "sandbox"
POOL_DIR = "/var/lib/libvirt/images/sandbox"
COMPLETE = ".complete"  # a marker volume: its data volume was uploaded whole


def _lv() -> Any:
    import libvirt

    return libvirt


def _pool_xml(name: str, path: str) -> str:
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    ET.SubElement(ET.SubElement(pool, "target"), "path").text = path
    return ET.tostring(pool, encoding="unicode")


def image_pool(conn: libvirt.virConnect) -> libvirt.virStoragePool:
    """The target's `sandbox` pool (a transient one, made with its directory when missing)."""
    lv = _lv()
    try:
        pool = conn.storagePoolLookupByName(POOL)
    except lv.libvirtError:
        try:
            pool = conn.storagePoolCreateXML(_pool_xml(POOL, POOL_DIR), lv.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
        except lv.libvirtError as exc:
            if "already exists" not in message(exc):
                raise LibvirtError(f"cannot make the storage pool {POOL} ({POOL_DIR}) on the libvirt host: {message(exc)}") from None
            pool = conn.storagePoolLookupByName(POOL)
    if not pool.isActive():
        pool.create()
    pool.refresh()
    return pool


def _volume(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    lv = _lv()
    try:
        return pool.storageVolLookupByName(name)
    except lv.libvirtError:
        return None


# Readable by every QEMU user: a run's QEMU may be libvirt's own user or
# the caller (a per-domain DAC label that libvirt does not relabel images
# for).  Kernel and initramfs hold nothing secret.
VOLUME_MODE = 0o644


def _vol_xml(name: str, size: int) -> str:
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", unit="bytes").text = str(size)
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", type="raw")
    ET.SubElement(ET.SubElement(target, "permissions"), "mode").text = f"{VOLUME_MODE:04o}"
    return ET.tostring(vol, encoding="unicode")


def _mode(vol: libvirt.virStorageVol) -> int | None:
    text = ET.fromstring(vol.XMLDesc(0)).findtext("target/permissions/mode")
    return int(text, 8) if text else None


def upload(conn: libvirt.virConnect, pool: libvirt.virStoragePool, path: Path) -> str:
    """`path` as a volume of the pool (uploaded unless already whole there); its path on the target."""
    lv = _lv()
    name = path.name
    vol, done = _volume(pool, name), _volume(pool, name + COMPLETE)
    # An upload of an earlier version (mode 0600) is replaced: QEMU running as the caller could not read it.
    if vol is not None and done is not None and _mode(vol) == VOLUME_MODE:
        return str(vol.path())
    data = path.read_bytes()
    try:
        progress.show(f"uploading {name} to the libvirt host")
        for stale in (vol, done):
            if stale is not None:
                stale.delete(0)
        vol = pool.createXML(_vol_xml(name, len(data)), 0)
        stream = conn.newStream(0)
        vol.upload(stream, 0, len(data), 0)
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            n = stream.send(bytes(view[sent : sent + (1 << 20)]))
            if n <= 0:
                raise LibvirtError(f"uploading {name}: the stream refused data")
            sent += n
        stream.finish()
        pool.createXML(_vol_xml(name + COMPLETE, 0), 0)
    except lv.libvirtError as exc:
        raise LibvirtError(f"cannot upload {name} to the libvirt host: {message(exc)}") from None
    finally:
        progress.clear()
    log.info("uploaded %s (%d bytes) to the libvirt host", name, len(data))
    return str(vol.path())


# ---- a remote host's own kernel ------------------------------------------------------


@contextlib.contextmanager
def _read_only_dir(conn: libvirt.virConnect, path: str) -> Iterator[libvirt.virStoragePool]:
    """A transient directory pool over `path` on the target, to read files through (never written)."""
    lv = _lv()
    try:
        pool = conn.storagePoolCreateXML(_pool_xml(f"sandbox-ro-{uuid.uuid4().hex[:12]}", path), 0)
    except lv.libvirtError as exc:
        raise LibvirtError(f"cannot read {path} on the libvirt host: {message(exc)}") from None
    try:
        yield pool
    finally:
        with contextlib.suppress(lv.libvirtError):
            pool.destroy()  # a transient pool: gone, its directory untouched


def _download(conn: libvirt.virConnect, vol: libvirt.virStorageVol, out: Path) -> None:
    progress.show(f"mirroring the remote kernel for --connect ({out.name})")
    size = vol.info()[1]
    stream = conn.newStream(0)
    vol.download(stream, 0, size, 0)
    chunks = []
    while True:
        chunk = stream.recv(1 << 20)
        if not chunk or chunk == -2:
            break
        chunks.append(chunk)
    stream.finish()
    out.parent.mkdir(parents=True, exist_ok=True)
    cache.write_atomic(out, b"".join(chunks))


def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.-]", version)]


def mirror_remote_kernel(conn: libvirt.virConnect, wanted: list[str]) -> kernel.Kernel:
    """The remote host's newest kernel with 9p, mirrored here with just the modules the guest loads."""
    host = conn.getHostname()
    mirror = cache.cache_dir() / "remote" / f"{host}-{hashlib.sha256(conn.getURI().encode()).hexdigest()[:12]}"
    with contextlib.ExitStack() as stack, _read_only_dir(conn, "/boot") as boot:
        stack.callback(progress.clear)  # _download shows what it mirrors
        images = {v.name(): v for v in boot.listAllVolumes() if v.name().startswith("vmlinuz-")}
        reasons = []
        for name in sorted(images, key=lambda n: _version_key(n[8:]), reverse=True):
            version = name[len("vmlinuz-") :]
            moddir = mirror / "lib" / "modules" / version
            moddir.mkdir(parents=True, exist_ok=True)
            try:
                with _read_only_dir(conn, f"/lib/modules/{version}") as mods:
                    vols = {v.name(): v for v in mods.listAllVolumes()}
                    for index in ("modules.dep", "modules.builtin"):
                        if index in vols and not (moddir / index).exists():
                            _download(conn, vols[index], moddir / index)
            except LibvirtError as exc:
                reasons.append(f"{version}: {exc}")
                continue
            missing = kernel.missing_features(moddir)
            if missing:
                reasons.append(f"{version}: lacks {', '.join(missing)}")
                continue
            image = mirror / "boot" / name
            if not image.exists() or image.stat().st_size != images[name].info()[1]:
                _download(conn, images[name], image)
            found = kernel.Kernel(image, version, moddir)
            _mirror_modules(conn, found, wanted)
            return found
    detail = f" ({'; '.join(reasons)})" if reasons else ""
    raise KernelError(f"the libvirt host {host} has no usable kernel in /boot{detail}; install linux-image-amd64 there")


def _mirror_modules(conn: libvirt.virConnect, k: kernel.Kernel, wanted: list[str]) -> None:
    needed = [m for m in modules.resolve_in(k.modules_dir, wanted) if not (k.modules_dir / m.path).exists()]
    by_dir: dict[str, list[modules.Module]] = {}
    for m in needed:
        by_dir.setdefault(m.path.rsplit("/", 1)[0], []).append(m)
    for directory, mods in sorted(by_dir.items()):
        with _read_only_dir(conn, f"/lib/modules/{k.version}/{directory}") as pool:
            for m in mods:
                target = k.modules_dir / m.path
                target.parent.mkdir(parents=True, exist_ok=True)
                _download(conn, pool.storageVolLookupByName(m.path.rsplit("/", 1)[1]), target)
