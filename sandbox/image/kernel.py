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

from sandbox.core import cache, progress
from sandbox.core.errors import KernelError

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


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


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
        if explicit.is_dir():
            raise KernelError(f"--kernel {explicit} is a directory, not a kernel image (e.g. /boot/vmlinuz-VERSION)")
        if not explicit.is_file():
            raise KernelError(f"kernel image {explicit} does not exist")
        version = image_version(explicit)
        if version is None:
            if not _is_elf(explicit):
                raise KernelError(f"--kernel {explicit} is not a Linux kernel image (no bzImage header, not an ELF)")
            version = explicit.name.removeprefix("vmlinuz-").removeprefix("vmlinux-")
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
    import zstandard  # only here: Debian's kernel is xz

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


PAGE = 4096
_PHDR = struct.Struct("<IIQQQQQQ")  # type, flags, offset, vaddr, paddr, filesz, memsz, align


def _nonzero_runs(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each run of pages of `data` holding a non-zero byte."""
    runs: list[tuple[int, int]] = []
    zero = bytes(PAGE)
    start = None
    for at in range(0, len(data), PAGE):
        page = data[at : at + PAGE]
        if page != zero[: len(page)]:
            if start is None:
                start = at
            continue
        if start is not None:
            runs.append((start, at))
            start = None
    if start is not None:
        runs.append((start, len(data)))
    return runs


def pack_pvh(elf: bytes) -> bytes:
    """The kernel ELF reduced to what QEMU must copy into guest RAM.

    Each PT_LOAD becomes one segment per run of non-zero pages, with no
    zero-fill tail (.bss, .brk) and no section headers.  Guest RAM starts
    zeroed and the kernel clears its own .bss, so nothing changes for the
    guest; QEMU just no longer writes ~24 MB of zeros (the text/rodata gaps
    and the tails) into guest pages, which then stay untouched, and the
    file it maps shrinks from 63 to 30 MB.  Segments keep their page offset
    so that file offset and address agree modulo the page size.
    """
    if elf[4] != 2 or elf[5] != 1:
        raise KernelError("not a little-endian 64-bit ELF")
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    (phentsize, phnum) = struct.unpack_from("<HH", elf, 0x36)
    loads: list[tuple[int, int, int, int, bytes]] = []  # flags, vaddr, paddr, align, data
    notes: list[tuple[int, ...]] = []
    for i in range(phnum):
        ptype, flags, off, vaddr, paddr, filesz, memsz, align = _PHDR.unpack_from(elf, phoff + i * phentsize)
        if ptype == 1:
            data = elf[off : off + filesz]
            for a, b in _nonzero_runs(data):
                loads.append((flags, vaddr + a, paddr + a, PAGE, data[a:b]))
        elif ptype == 4:
            notes.append((flags, off, vaddr, paddr, filesz, memsz, align))
    count = len(loads) + len(notes)
    out = bytearray(elf[:64])
    struct.pack_into("<Q", out, 0x20, 64)  # e_phoff
    struct.pack_into("<Q", out, 0x28, 0)  # e_shoff: no section headers
    struct.pack_into("<HHHHH", out, 0x36, _PHDR.size, count, 64, 0, 0)  # phentsize..shstrndx
    headers = bytearray()
    body = bytearray()
    body_start = (64 + count * _PHDR.size + PAGE - 1) // PAGE * PAGE
    placed: list[tuple[int, int, int]] = []  # paddr, size, file offset
    for flags, vaddr, paddr, align, data in loads:
        pos = body_start + len(body)
        pad = (vaddr - pos) % PAGE
        body += bytes(pad) + data
        pos += pad
        placed.append((paddr, len(data), pos))
        headers += _PHDR.pack(1, flags, pos, vaddr, paddr, len(data), len(data), align)
    for flags, off, vaddr, paddr, filesz, memsz, align in notes:
        # The note lives inside a loaded segment: point at its new place,
        # or append a copy if it fell in a page that was dropped.
        where = next((pos + paddr - p for p, size, pos in placed if p <= paddr < p + size), None)
        if where is None:
            where = body_start + len(body)
            body += elf[off : off + filesz]
        headers += _PHDR.pack(4, flags, where, vaddr, paddr, filesz, memsz, align)
    out += headers
    out += bytes(body_start - len(out))
    out += body
    return bytes(out)


def pvh_image(kernel: Kernel) -> Path | None:
    """A cached PVH-bootable vmlinux for `kernel`, or None if it cannot have one."""
    key = cache.file_identity(kernel.image)
    target = cache.cache_dir() / f"vmlinux-{kernel.version}-{key}.packed.pvh"
    negative = target.with_suffix(".nopvh")
    if target.exists():
        return target
    if negative.exists():
        return None
    with progress.step("building the guest image (its kernel)"):
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
        cache.write_atomic(target, pack_pvh(elf))
    return target


def ensure_readable(path: Path) -> None:
    """Raise a KernelError naming `path` if it cannot be read."""
    if not os.access(path, os.R_OK):
        raise KernelError(f"cannot read {path} (kernel images are often root-only: run as root or chmod a+r it)")


def kernel_cmdline(
    accel: str, tsc_khz: int | None, crypto_selftests: bool, verbose: int, extra: str, tracefs: bool = False
) -> str:
    """The guest kernel's command line; each knob's effect is in benchmarks/README.md."""
    args = [
        "console=ttyS0",
        "panic=-1",  # a panic resets, and -no-reboot turns that into QEMU's exit
        "8250.nr_uarts=1",
        "i8042.noaux",
        "i8042.nokbd",
        "i8042.nopnp",
        "noreplace-smp",
        "nowatchdog",
        "audit=0",
    ]
    if verbose < 2:
        args.append("quiet")
    if accel == "tcg" and tsc_khz:
        # Calibrating the TSC against a busy host hangs the boot; the host's
        # rate is exact under TCG, whose guest TSC is the host's.
        args.append(f"tsc_early_khz={tsc_khz}")
        args.append("tsc=reliable")
    if not crypto_selftests:
        args.append("cryptomgr.notests")
    if not tracefs:
        # Its ~10,000 event files cost 80 ms and 9 MiB of inodes at boot,
        # and tracing is a debugging interface the sandboxed command has
        # no use for: one less thing in the guest kernel to attack.
        args.append("initcall_blacklist=tracer_init_tracefs")
    if extra:
        args.append(extra)
    return " ".join(args)
