import lzma
import os
import struct
from pathlib import Path

import pytest

from sandbox.image import modules
from sandbox.core.errors import InitramfsError

DEP = """\
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko.xz:
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio-console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""


def names(mods: list[modules.Module]) -> list[str]:
    return [m.name for m in mods]


def test_dependencies_come_before_their_users_once_each() -> None:
    deps = modules.parse_modules_dep(DEP)
    order = names(modules.resolve(["virtio_mmio", "virtio_console", "9pnet_virtio", "9p"], deps))
    assert order == ["virtio_ring", "virtio", "virtio_mmio", "virtio_console", "9pnet", "9pnet_virtio", "netfs", "fscache", "9p"]
    for mod in order:
        path, requires = deps[mod]
        assert all(order.index(r) < order.index(mod) for r in requires), mod


def test_dashes_and_underscores_are_one_name() -> None:
    deps = modules.parse_modules_dep(DEP)
    assert "virtio_console" in deps
    assert names(modules.resolve(["virtio-console"], deps))[-1] == "virtio_console"


def test_builtin_modules_are_not_loaded() -> None:
    deps = modules.parse_modules_dep(DEP)
    assert names(modules.resolve(["virtio_mmio"], deps, {"virtio", "virtio_ring"})) == ["virtio_mmio"]


def test_unknown_module_is_an_error_naming_it() -> None:
    with pytest.raises(InitramfsError, match="nosuch"):
        modules.resolve(["nosuch"], modules.parse_modules_dep(DEP))


def test_dependency_loop_is_reported() -> None:
    with pytest.raises(InitramfsError, match="loop"):
        modules.resolve(["a"], modules.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n"))


def test_compressed_modules_are_decompressed(tmp_path: Path) -> None:
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel/x.ko.xz").write_bytes(lzma.compress(b"\x7fELFmodule", format=lzma.FORMAT_XZ))
    (tmp_path / "modules.dep").write_text("kernel/x.ko.xz:\n")
    [mod] = modules.resolve_in(tmp_path, ["x"])
    assert modules.read_module(tmp_path, mod) == b"\x7fELFmodule"


def test_signature_is_stripped_and_unsigned_modules_pass_through() -> None:
    body = b"\x7fELF" + bytes(100)
    sig = b"S" * 37
    signed = body + sig + struct.pack(">BBBBBxxxI", 0, 0, 2, 0, 0, len(sig)) + modules.SIGNATURE_MAGIC
    assert modules.strip_signature(signed) == body
    assert modules.strip_signature(body) == body
    bad = b"x" + struct.pack(">BBBBBxxxI", 0, 0, 2, 0, 0, 1000) + modules.SIGNATURE_MAGIC
    with pytest.raises(InitramfsError):
        modules.strip_signature(bad)


def test_real_module_signature_is_stripped() -> None:
    moddir = Path("/lib/modules") / os.uname().release
    if not moddir.exists():
        moddir = max(Path("/lib/modules").iterdir())
    [mod] = modules.resolve_in(moddir, ["9p"])[-1:]
    raw = modules.read_module(moddir, mod)
    assert raw.endswith(modules.SIGNATURE_MAGIC)  # Debian signs its modules
    stripped = modules.strip_signature(raw)
    assert stripped.startswith(b"\x7fELF") and len(stripped) < len(raw)
    # the ELF ends where its section header table does
    (shoff,) = struct.unpack_from("<Q", stripped, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", stripped, 0x3A)
    assert shoff + shentsize * shnum == len(stripped)



def test_zstd_compressed_modules_are_decompressed(tmp_path: Path) -> None:
    # Ubuntu's and Arch's kernels ship their modules as .ko.zst.
    import zstandard

    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel/x.ko.zst").write_bytes(zstandard.ZstdCompressor().compress(b"\x7fELFmodule"))
    (tmp_path / "modules.dep").write_text("kernel/x.ko.zst:\n")
    [mod] = modules.resolve_in(tmp_path, ["x"])
    assert modules.read_module(tmp_path, mod) == b"\x7fELFmodule"
