"""Guest kernel discovery: which /boot kernel to boot, and its PVH-bootable vmlinux."""

from __future__ import annotations

import gzip
import logging
import lzma
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from . import cache
from .errors import KernelError

log = logging.getLogger(__name__)

# What the guest needs from the kernel, as module paths below kernel/.
REQUIRED_FEATURES = {
    "9p filesystem": "fs/9p/9p.ko",
    "9p over virtio": "net/9p/9pnet_virtio.ko",
    "virtio console": "drivers/char/virtio_console.ko",
}

KERNEL_PACKAGE_HINT = "install Debian's linux-image-amd64 (apt-get install linux-image-amd64)"


@dataclass(frozen=True)
class Kernel:
    """A bootable kernel image and the module tree that belongs to it."""

    image: Path
    version: str
    modules_dir: Path


def image_version(image: Path) -> str | None:
    """The version string embedded in a bzImage header, if it has one."""
    try:
        with image.open("rb") as f:
            head = f.read(0x10000)
    except OSError:
        return None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    (ptr,) = struct.unpack_from("<H", head, 0x20E)
    start = ptr + 0x200
    if not ptr or start >= len(head):
        return None
    raw = head[start : head.find(b"\0", start)]
    return raw.split(b" ", 1)[0].decode(errors="replace") or None


def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~]", version)]


def missing_features(modules_dir: Path) -> list[str]:
    """Features from REQUIRED_FEATURES that this module tree cannot provide.

    A substring test on the raw text rather than a parse: this runs on every
    start, and modules.dep is half a megabyte.  A module path ending in
    ".ko" matches its compressed forms too, and one named only as another
    module's dependency exists all the same.
    """
    text = ""
    for name in ("modules.dep", "modules.builtin"):
        try:
            text += (modules_dir / name).read_text() + "\n"
        except OSError:
            continue
    return [feat for feat, mod in REQUIRED_FEATURES.items() if "kernel/" + mod not in text]


def find_kernel(
    explicit: Path | None = None,
    boot: Path = Path("/boot"),
    module_root: Path = Path("/lib/modules"),
) -> Kernel:
    """The kernel to boot: `explicit`, or the newest one in `boot` that has 9p over virtio."""
    if explicit is not None:
        if not explicit.is_file():
            raise KernelError(f"kernel image {explicit} does not exist")
        version = image_version(explicit) or explicit.name.removeprefix("vmlinuz-")
        kernel = Kernel(explicit, version, module_root / version)
        if not kernel.modules_dir.is_dir():
            raise KernelError(f"kernel {explicit}: no modules at {kernel.modules_dir}")
        missing = missing_features(kernel.modules_dir)
        if missing:
            raise KernelError(f"kernel {version} lacks {', '.join(missing)}; {KERNEL_PACKAGE_HINT}")
        return kernel
    reasons: list[str] = []
    candidates = sorted(boot.glob("vmlinuz-*"), key=lambda p: _version_key(p.name[8:]), reverse=True)
    for image in candidates:
        version = image.name[len("vmlinuz-") :]
        modules_dir = module_root / version
        if not modules_dir.is_dir():
            reasons.append(f"{version}: no {modules_dir}")
            continue
        missing = missing_features(modules_dir)
        if missing:
            reasons.append(f"{version}: lacks {', '.join(missing)}")
            continue
        for reason in reasons:
            log.info("skipped kernel %s", reason)
        return Kernel(image, version, modules_dir)
    detail = f" ({'; '.join(reasons)})" if reasons else ""
    raise KernelError(f"no usable kernel in {boot}{detail}; {KERNEL_PACKAGE_HINT}")


# ---- PVH: boot the uncompressed ELF and skip the guest's own decompression.

_MAGICS: list[tuple[bytes, str]] = [
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
]
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if kind == "gzip":
        return gzip.decompress(data)
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError as exc:
        raise KernelError("zstd-compressed kernel: install python3-zstandard for PVH boot") from exc
    out: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return out


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF vmlinux inside a bzImage (boot protocol >= 2.08 payload fields)."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise KernelError("not a bzImage")
    setup_sects = bzimage[0x1F1] or 4
    (offset, length) = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    for magic, kind in _MAGICS:
        if payload.startswith(magic):
            elf = _decompress(kind, payload)
            if not elf.startswith(b"\x7fELF"):
                raise KernelError("bzImage payload is not an ELF")
            return elf
    raise KernelError("unknown bzImage payload compression")


def has_pvh_note(elf: bytes) -> bool:
    """Whether a 64-bit ELF kernel carries the PVH entry note QEMU looks for."""
    if elf[4] != 2:  # ELFCLASS64 only
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    (phentsize, phnum) = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        ptype, _flags, off, _va, _pa, filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if ptype != 4:  # PT_NOTE
            continue
        pos, end = off, off + filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def trim_zero_tails(elf: bytes) -> bytes:
    """Shrink each PT_LOAD's file size to end at its last non-zero page.

    The loader zero-fills from p_filesz to p_memsz anyway, and QEMU keeps
    the file mapped for the whole run: the kernel's .bss/.brk (22 MB of
    zeros in Debian's 6.1) would otherwise sit in its resident set twice.
    """
    out = bytearray(elf)
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    (phentsize, phnum) = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        at = phoff + i * phentsize
        ptype, _flags, off, _va, _pa, filesz = struct.unpack_from("<IIQQQQ", elf, at)
        if ptype != 1 or not filesz:  # PT_LOAD only
            continue
        used = len(elf[off : off + filesz].rstrip(b"\0"))
        used = min(filesz, (used + 4095) & ~4095)
        struct.pack_into("<Q", out, at + 0x20, used)
    return bytes(out)


def pvh_image(kernel: Kernel) -> Path | None:
    """A cached PVH-bootable vmlinux for `kernel`, or None if it cannot have one."""
    key = cache.file_identity(kernel.image)
    target = cache.cache_dir() / f"vmlinux-{kernel.version}-{key}.pvh"
    negative = target.with_suffix(".nopvh")
    if target.exists():
        return target
    if negative.exists():
        return None
    try:
        elf = extract_vmlinux(kernel.image.read_bytes())
    except (KernelError, OSError, lzma.LZMAError, EOFError) as exc:
        log.info("no PVH image for %s: %s", kernel.image, exc)
        cache.write_atomic(negative, b"")
        return None
    if not has_pvh_note(elf):
        log.info("%s has no PVH entry note; booting the bzImage", kernel.image)
        cache.write_atomic(negative, b"")
        return None
    cache.write_atomic(target, trim_zero_tails(elf))
    return target


def ensure_readable(path: Path) -> None:
    """Raise a KernelError naming `path` if it cannot be read."""
    if not os.access(path, os.R_OK):
        raise KernelError(f"cannot read {path} (kernel images are often root-only: run as root or chmod a+r it)")
