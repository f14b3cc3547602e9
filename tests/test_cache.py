"""The on-disk cache: keys and the pruning of boot images nobody uses."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sandbox.core import cache


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return cache.cache_dir()


def _aged(path: Path, days: float) -> Path:
    path.write_bytes(b"x")
    t = time.time() - days * 86400
    os.utime(path, (t, t))
    return path


def test_idle_boot_images_go_and_used_ones_stay(cache_home: Path) -> None:
    in_use = _aged(cache_home / "vmlinux-6.1-aaaa.packed.pvh", 30)
    old_kernel = _aged(cache_home / "vmlinux-6.1-bbbb.pvh", 8)
    old_initrd = _aged(cache_home / "initramfs-6.1-cccc.cpio", 8)
    recent = _aged(cache_home / "initramfs-6.1-dddd.cpio", 2)  # another launcher used it lately
    other = _aged(cache_home / "qemu-eeee.json", 30)  # not a boot image
    removed = cache.prune_boot_images([in_use])
    assert sorted(removed) == sorted([old_kernel, old_initrd])
    assert in_use.exists() and recent.exists() and other.exists()
    assert time.time() - in_use.stat().st_mtime < 60  # its use was recorded


def test_a_fresh_entry_is_not_rewritten_on_every_run(cache_home: Path) -> None:
    entry = _aged(cache_home / "initramfs-6.1-ffff.cpio", 0.5)
    before = entry.stat().st_mtime
    cache.prune_boot_images([entry])
    assert entry.stat().st_mtime == before


def test_content_hash_separates_parts() -> None:
    assert cache.content_hash(b"ab", b"c") != cache.content_hash(b"a", b"bc")
