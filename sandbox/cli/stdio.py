"""The launcher's first step: which of fds 0-2 it was started without (light: the pooled client takes it first too)."""

from __future__ import annotations

import os


def reserve() -> int:
    """Put /dev/null on a closed fd 0, 1 or 2, so that no socket of ours lands there; which were closed (bit 1 << fd)."""
    closed = 0
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open("/dev/null", os.O_RDWR)  # the lowest free number: this one
            closed |= 1 << fd
    return closed
