"""Sizes written as people and QEMU write them (512M, 2G, 1.5G, 4096K): one parser for all."""

from __future__ import annotations

import re

_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([kKmMgGtT]?)(?:i?[bB])?")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str, default_unit: str = "M") -> int | None:
    """The size in bytes, or None when `text` is not a size; a bare number is in `default_unit` (QEMU's -m: MiB)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        return None
    unit = (m.group(2) or default_unit).upper()
    return int(float(m.group(1)) * _UNITS[unit])


def parse_mb(text: str, default_unit: str = "M") -> int | None:
    """The size in whole MiB (rounded down), or None when `text` is not a size."""
    size = parse_bytes(text, default_unit)
    return None if size is None else size >> 20
