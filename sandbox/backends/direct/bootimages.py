"""Kernel and initramfs handed to QEMU as private copies the launcher empties once they are used.

QEMU 7.2 keeps both files mapped for its whole life, to copy them into
guest RAM again on a reset (which -no-reboot rules out here), so their
pages would sit in its resident set next to the copy in guest RAM: 30 MB
for Debian's packed kernel, 2 MB for the initramfs.  A memfd copy per boot
costs ~10 ms and lets the launcher drop those pages: the kernel once QEMU's
main loop answers the monitor (QEMU writes ELF segments into guest RAM at
the machine's first reset, before its main loop starts), the initramfs
once the guest's init runs (the firmware reads it over fw_cfg during boot).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class BootImage:
    """One boot file as an open descriptor, copied into memory when `private`."""

    def __init__(self, path: Path, private: bool) -> None:
        self.private = private
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if not private:
            self.fd = fd
            return
        try:
            self.fd = os.memfd_create(path.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                size = os.fstat(fd).st_size
                copied = 0
                while copied < size:
                    n = os.sendfile(self.fd, fd, copied, size - copied)
                    if n <= 0:
                        raise OSError(f"{path} shrank while being copied")
                    copied += n
                # QEMU gets this very descriptor: sealed, it can neither
                # change the copy nor grow it; only shrinking stays possible.
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            except BaseException:
                os.close(self.fd)
                raise
        finally:
            os.close(fd)

    @property
    def proc_path(self) -> Path:
        """The path QEMU opens: its own inherited descriptor, so it needs no access to our cache."""
        return Path(f"/proc/self/fd/{self.fd}")

    def release(self) -> None:
        """Drop the copy's pages from memory and from every mapping of it (QEMU's included)."""
        if self.private and self.fd >= 0:
            try:
                os.ftruncate(self.fd, 0)
            except OSError as exc:  # pragma: no cover - a memfd can always be truncated
                log.debug("cannot empty boot image copy: %s", exc)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
