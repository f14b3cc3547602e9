import struct
from pathlib import Path

import pytest

from sandbox.image import kernel
from sandbox.core.errors import KernelError

FULL_DEP = (
    "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko\n"
    "kernel/net/9p/9pnet.ko:\n"
    "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko\n"
    "kernel/drivers/char/virtio_console.ko:\n"
)
CLOUD_DEP = "kernel/drivers/char/virtio_console.ko:\n"  # Debian's -cloud-amd64: no 9p at all


def fake_bzimage(version: str) -> bytes:
    """Just a bzImage header ("HdrS") with its version string."""
    head = bytearray(0x400)
    head[0x202:0x206] = b"HdrS"
    head[0x20E:0x210] = (0x300 - 0x200).to_bytes(2, "little")
    text = f"{version} (debian-kernel@lists.debian.org)".encode()
    head[0x300 : 0x300 + len(text)] = text
    return bytes(head)


def make_tree(tmp_path: Path, kernels: dict[str, str]) -> tuple[Path, Path]:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for version, dep in kernels.items():
        (boot / f"vmlinuz-{version}").write_bytes(fake_bzimage(version))
        (mods / version).mkdir(parents=True)
        (mods / version / "modules.dep").write_text(dep)
    return boot, mods


def test_newest_kernel_with_9p_wins_and_cloud_kernels_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    boot, mods = make_tree(tmp_path, {"6.1.0-9-amd64": FULL_DEP, "6.1.0-10-amd64": FULL_DEP, "6.1.0-11-cloud-amd64": CLOUD_DEP})
    caplog.set_level("INFO")
    k = kernel.find_kernel(None, boot, mods)
    assert k.version == "6.1.0-10-amd64"  # 10 > 9 numerically; 11 is the cloud kernel
    assert "6.1.0-11-cloud-amd64: lacks 9p filesystem, 9p over virtio" in caplog.text


def test_no_usable_kernel_names_the_package(tmp_path: Path) -> None:
    boot, mods = make_tree(tmp_path, {"6.1.0-11-cloud-amd64": CLOUD_DEP})
    with pytest.raises(KernelError) as err:
        kernel.find_kernel(None, boot, mods)
    msg = str(err.value)
    assert "linux-image-amd64" in msg and "cloud-amd64: lacks 9p" in msg and "\n" not in msg


def test_explicit_cloud_kernel_is_refused_with_reason(tmp_path: Path) -> None:
    boot, mods = make_tree(tmp_path, {"6.1.0-11-cloud-amd64": CLOUD_DEP})
    with pytest.raises(KernelError, match="lacks 9p filesystem"):
        kernel.find_kernel(boot / "vmlinuz-6.1.0-11-cloud-amd64", boot, mods)


def test_explicit_non_kernel_and_directory_are_named_for_what_they_are(tmp_path: Path) -> None:
    boot, mods = make_tree(tmp_path, {"6.1.0-9-amd64": FULL_DEP})
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(KernelError, match="is not a Linux kernel image"):
        kernel.find_kernel(text, boot, mods)
    with pytest.raises(KernelError, match="is a directory, not a kernel image"):
        kernel.find_kernel(boot, boot, mods)
    assert kernel.find_kernel(boot / "vmlinuz-6.1.0-9-amd64", boot, mods).version == "6.1.0-9-amd64"


def test_builtin_9p_counts(tmp_path: Path) -> None:
    boot, mods = make_tree(tmp_path, {"6.6.0-custom": CLOUD_DEP})
    (mods / "6.6.0-custom" / "modules.builtin").write_text("kernel/fs/9p/9p.ko\nkernel/net/9p/9pnet_virtio.ko\n")
    assert kernel.find_kernel(None, boot, mods).version == "6.6.0-custom"


def host_kernel() -> kernel.Kernel:
    try:
        return kernel.find_kernel()
    except KernelError as exc:
        pytest.fail(f"the test machine needs linux-image-amd64: {exc}")


def test_real_bzimage_header_version_and_pvh_extraction() -> None:
    k = host_kernel()
    assert kernel.image_version(k.image) == k.version
    elf = kernel.extract_vmlinux(k.image.read_bytes())
    assert elf[:4] == b"\x7fELF"
    assert kernel.has_pvh_note(elf)  # Debian's kernel has CONFIG_PVH=y


def test_zstd_payload_is_extracted() -> None:
    # Ubuntu's and Fedora's kernels are zstd-compressed; the build appends the ELF's size after the frame.
    import zstandard

    elf = b"\x7fELF" + bytes(range(256)) * 64
    payload = zstandard.ZstdCompressor().compress(elf) + len(elf).to_bytes(4, "little")
    image = bytearray(5 * 512)  # setup_sects 0 means 4, plus the boot sector
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", image, 0x248, 0, len(payload))
    assert kernel.extract_vmlinux(bytes(image) + payload) == elf


def test_extract_refuses_non_bzimage() -> None:
    with pytest.raises(KernelError):
        kernel.extract_vmlinux(b"\0" * 4096)


def _guest_image(elf: bytes) -> tuple[int, bytes]:
    """What a loader writes into guest RAM for `elf`, as (lowest paddr, bytes); untouched bytes are zero."""
    import struct

    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    (phentsize, phnum) = struct.unpack_from("<HH", elf, 0x36)
    segs = []
    for i in range(phnum):
        ptype, _fl, off, _va, pa, filesz, memsz, _al = struct.unpack_from("<IIQQQQQQ", elf, phoff + i * phentsize)
        if ptype == 1:
            segs.append((pa, elf[off : off + filesz], memsz))
    low = min(pa for pa, _, _ in segs)
    high = max(pa + memsz for pa, _, memsz in segs)
    ram = bytearray(high - low)
    for pa, data, _ in segs:
        ram[pa - low : pa - low + len(data)] = data
    return low, bytes(ram).rstrip(b"\0")


def _elf(segments: list[tuple[int, bytes, int]], note_at: int) -> bytes:
    """A minimal ELF64 with PT_LOADs (paddr, file bytes, memsz) and a PVH note at file offset note_at."""
    import struct

    n = len(segments) + 1
    head = bytearray(b"\x7fELF\x02\x01\x01" + bytes(9))
    head += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, 64, 0x9999, 0, 64, 56, n, 64, 3, 2)
    body = bytearray()
    phdrs = bytearray()
    for pa, data, memsz in segments:
        off = 0x1000 + len(body)
        body += data + bytes(-len(data) % 4096)
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, off, pa | 0xFFFFFFFF80000000, pa, len(data), memsz, 0x200000)
    note_pa = segments[0][0] + note_at - 0x1000
    phdrs += struct.pack("<IIQQQQQQ", 4, 4, note_at, note_pa, note_pa, 24, 24, 4)
    out = head + phdrs
    out += bytes(0x1000 - len(out)) + body
    return bytes(out)


def test_pack_pvh_keeps_only_nonzero_pages_and_the_note() -> None:
    import struct

    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x1000040) + bytes(4)
    def page(b: int) -> bytes:
        return bytes([b]) * 4096

    first = note + bytes(4096 - len(note)) + page(1) + page(0) + page(0) + page(2) + b"\3" * 100 + bytes(3996)
    elf = _elf([(0x1000000, first, len(first) + 5 * 4096), (0x2000000, page(0) + page(7), 8192)], 0x1000)
    packed = kernel.pack_pvh(elf)
    assert kernel.has_pvh_note(packed)
    assert _guest_image(packed) == _guest_image(elf)
    (phnum,) = struct.unpack_from("<H", packed, 0x38)
    loads = []
    for i in range(phnum):
        ptype, _fl, off, va, pa, filesz, memsz, _al = struct.unpack_from("<IIQQQQQQ", packed, 64 + 56 * i)
        if ptype == 1:
            loads.append((pa, filesz))
            assert memsz == filesz  # no zero fill left for QEMU to write
            assert off % 4096 == va % 4096
            assert packed[off : off + filesz].strip(b"\0")
    assert loads == [(0x1000000, 8192), (0x1004000, 8192), (0x2001000, 4096)]
    assert struct.unpack_from("<QH", packed, 0x28)[0] == 0  # no section headers


def test_pack_pvh_of_the_real_kernel_loads_the_same_memory() -> None:
    elf = kernel.extract_vmlinux(host_kernel().image.read_bytes())
    packed = kernel.pack_pvh(elf)
    assert kernel.has_pvh_note(packed)
    assert _guest_image(packed) == _guest_image(elf)
    assert len(packed) < len(elf) * 0.6
