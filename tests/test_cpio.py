import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from sandbox.image.cpio import CpioWriter


def sample() -> bytes:
    w = CpioWriter()
    w.file("modules/b.ko", b"B" * 5)
    w.file("init", b"\x7fELF-binary", 0o755)
    w.symlink("bin/sh", "/init")
    w.char_device("dev/console", 5, 1)
    w.dir("newroot")
    return w.getvalue()


def test_cpio_tool_lists_entries_sorted_with_parents_first() -> None:
    if shutil.which("cpio") is None:
        pytest.fail("cpio(1) is needed to verify the archive (apt-get install cpio)")
    out = subprocess.run(["cpio", "-t", "--quiet"], input=sample(), capture_output=True, check=True).stdout
    assert out.decode().split() == ["bin", "bin/sh", "dev", "dev/console", "init", "modules", "modules/b.ko", "newroot"]


def test_cpio_tool_extracts_content_modes_and_devices(tmp_path: Path) -> None:
    subprocess.run(["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames"], input=sample(), cwd=tmp_path, check=True)
    assert (tmp_path / "init").read_bytes() == b"\x7fELF-binary"
    assert stat.S_IMODE((tmp_path / "init").stat().st_mode) == 0o755
    assert (tmp_path / "modules/b.ko").read_bytes() == b"BBBBB"
    assert (tmp_path / "bin/sh").readlink().as_posix() == "/init"
    st = (tmp_path / "dev/console").lstat()
    assert stat.S_ISCHR(st.st_mode) and (st.st_rdev >> 8, st.st_rdev & 0xFF) == (5, 1)


def test_output_is_reproducible_regardless_of_insertion_order() -> None:
    a, b = CpioWriter(), CpioWriter()
    a.file("x/1", b"1")
    a.file("y", b"2")
    b.file("y", b"2")
    b.file("x/1", b"1")
    assert a.getvalue() == b.getvalue()
    # mtime is zero: the 8 hex digits after ino, mode, uid, gid, nlink
    data = a.getvalue()
    assert data[6 + 5 * 8 : 6 + 6 * 8] == b"00000000"


def test_newc_alignment_and_trailer() -> None:
    data = sample()
    assert data.startswith(b"070701")
    assert len(data) % 4 == 0
    assert b"TRAILER!!!\0" in data[-128:]


@pytest.mark.parametrize("bad", ["../etc", "/", "a/../../b"])
def test_rejects_paths_that_escape(bad: str) -> None:
    with pytest.raises(ValueError):
        CpioWriter().file(bad, b"")
