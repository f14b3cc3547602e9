"""Boot images: private sealed copies that the launcher can empty."""

from __future__ import annotations

import fcntl
import mmap
import os
from pathlib import Path

import pytest

from sandbox.backends.direct.bootimages import BootImage


def test_private_copy_is_sealed_and_release_drops_mapped_pages(tmp_path: Path) -> None:
    src = tmp_path / "vmlinux.pvh"
    data = os.urandom(3 * 4096 + 17)
    src.write_bytes(data)
    image = BootImage(src, private=True)
    try:
        with open(image.proc_path, "rb") as f:
            assert f.read() == data
        seals = fcntl.fcntl(image.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.write(image.fd, b"x")
        # A reader's mapping (QEMU's) loses the pages too.
        with open(image.proc_path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        assert m[:16] == data[:16]
        image.release()
        assert os.fstat(image.fd).st_size == 0
        assert src.read_bytes() == data  # the cached file is untouched
        m.close()
    finally:
        image.close()
    assert image.fd == -1


def test_shared_image_is_the_file_itself(tmp_path: Path) -> None:
    src = tmp_path / "vmlinuz"
    src.write_bytes(b"bzImage")
    image = BootImage(src, private=False)
    try:
        assert os.readlink(image.proc_path) == str(src)
        image.release()  # nothing to drop: QEMU read it into its own memory
        assert src.read_bytes() == b"bzImage"
    finally:
        image.close()
