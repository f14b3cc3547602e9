from pathlib import Path

import pytest

from sandbox import kernel
from sandbox.errors import KernelError

FULL_DEP = (
    "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko\n"
    "kernel/net/9p/9pnet.ko:\n"
    "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko\n"
    "kernel/drivers/char/virtio_console.ko:\n"
)
CLOUD_DEP = "kernel/drivers/char/virtio_console.ko:\n"  # Debian's -cloud-amd64: no 9p at all


def make_tree(tmp_path: Path, kernels: dict[str, str]) -> tuple[Path, Path]:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for version, dep in kernels.items():
        (boot / f"vmlinuz-{version}").write_bytes(b"not really a kernel")
        (mods / version).mkdir(parents=True)
        (mods / version / "modules.dep").write_text(dep)
    return boot, mods


def test_newest_kernel_with_9p_wins_and_cloud_kernels_are_skipped(tmp_path: Path, caplog) -> None:
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


def test_extract_refuses_non_bzimage() -> None:
    with pytest.raises(KernelError):
        kernel.extract_vmlinux(b"\0" * 4096)
