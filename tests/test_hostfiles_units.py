"""Host trees from images (sandbox/image/hostfiles.py), the parts that need no VM: which trees, fingerprints, builds, pruning."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, strategies as st

from sandbox.image import hostfiles
from sandbox.wire.protocol import MOP_HIDE_FILE, MOP_IMAGE, MOP_MKDIR, MOP_OVERLAY, MOP_TMPFS, MountStep


def test_a_tree_that_meets_a_mount_of_the_plan_or_a_home_is_never_imaged() -> None:
    steps = (MountStep(MOP_OVERLAY, "/home"), MountStep(MOP_TMPFS, "/tmp"), MountStep(MOP_OVERLAY, "/usr/src/proj"),
             MountStep(MOP_HIDE_FILE, "/opt/app/.netrc"))  # fmt: skip
    trees = ["/usr/include", "/usr/src", "/usr/src/proj/vendor", "/opt/app", "/tmp/x", "/usr/games/x", "/", "/usr/lib/python3"]
    assert hostfiles.usable_trees(trees, steps, ["/usr/games", "/root"]) == ("/usr/include", "/usr/lib/python3")


def test_a_nested_tree_goes_with_its_outer_one() -> None:
    assert hostfiles.usable_trees(["/usr/lib/python3/dist-packages", "/usr/lib/python3", "/usr/lib/python3.11"], (), []) == (
        "/usr/lib/python3", "/usr/lib/python3.11")  # fmt: skip


@given(st.lists(st.sampled_from(["/a", "/a/b", "/a/bc", "/b", "/b/a", "/ab", "/a/b/c"]), max_size=6),
       st.lists(st.sampled_from(["/a", "/a/b", "/b/a/x", "/c", "/ab/c"]), max_size=3))  # fmt: skip
def test_no_two_chosen_trees_and_no_tree_and_mount_overlap(trees: list[str], mounts: list[str]) -> None:
    chosen = hostfiles.usable_trees(trees, tuple(MountStep(MOP_OVERLAY, m) for m in mounts), [])
    def meets(a: str, b: str) -> bool:
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")
    assert all(not meets(t, m) for t in chosen for m in mounts)
    assert all(not meets(a, b) for i, a in enumerate(chosen) for b in chosen[i + 1:])
    assert set(chosen) <= set(trees)


def test_images_go_after_the_roots_mkdirs_and_before_every_other_step() -> None:
    steps = (MountStep(MOP_OVERLAY, "/tmp"), MountStep(MOP_MKDIR, "/mnt/x"), MountStep(MOP_TMPFS, "/run"))
    out = hostfiles.with_images(steps, [("/usr/include", "/c/a.erofs")])
    assert [m.op for m in out] == [MOP_MKDIR, MOP_IMAGE, MOP_OVERLAY, MOP_TMPFS]
    assert out[1].encode() == "I:/c/a.erofs:::/usr/include"


def _tree(base: Path) -> Path:
    t = base / "tree"
    (t / "sub").mkdir(parents=True)
    (t / "a.txt").write_text("hello\n")
    (t / "b.txt").write_text("bee\n")
    (t / "sub" / "c.txt").write_text("sea\n")
    os.symlink("a.txt", t / "link")
    return t


def test_the_fingerprint_sees_every_change_even_one_that_keeps_size_and_mtime(tmp_path: Path) -> None:
    t = _tree(tmp_path)
    digests = [hostfiles.scan(str(t))]
    st_a = os.stat(t / "a.txt")
    time.sleep(0.01)  # ctime's clock may be coarse: a change in the same tick would keep it (settled_scan's rule)
    (t / "a.txt").write_text("HELLO\n")  # same size
    os.utime(t / "a.txt", ns=(st_a.st_atime_ns, st_a.st_mtime_ns))  # same mtime: only ctime tells
    assert os.stat(t / "a.txt").st_mtime_ns == st_a.st_mtime_ns
    digests.append(hostfiles.scan(str(t)))
    for change in (lambda: (t / "d.txt").write_text("new\n"), lambda: (t / "b.txt").unlink(),
                   lambda: (t / "sub" / "c.txt").rename(t / "sub" / "e.txt"), lambda: os.chmod(t / "sub", 0o700),
                   lambda: (t / "sub" / "deeper").mkdir()):  # fmt: skip
        time.sleep(0.01)
        change()
        digests.append(hostfiles.scan(str(t)))
    found = [d.digest for d in digests if d is not None]
    assert len(found) == len(digests) and len(set(found)) == len(found)


def test_a_fingerprint_is_taken_only_once_the_tree_is_settled(tmp_path: Path) -> None:
    t = _tree(tmp_path)
    newest = hostfiles.scan(str(t))
    assert newest is not None
    now = [newest.newest_ns + 1_000_000]  # 1 ms after the last change: racy
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += int(s * 1e9)

    found = hostfiles.settled_scan(str(t), clock=lambda: now[0], sleep=sleep)
    assert found is not None and found.digest == newest.digest and slept == [hostfiles.RACY_NS / 1e9]
    assert hostfiles.settled_scan(str(t), clock=lambda: newest.newest_ns, sleep=lambda s: None) is None  # never settles


def test_no_tree_or_a_tree_too_large_has_no_fingerprint(tmp_path: Path) -> None:
    t = _tree(tmp_path)
    assert hostfiles.scan(str(tmp_path / "missing")) is None
    assert hostfiles.scan(str(t / "a.txt")) is None
    assert hostfiles.scan(str(t), limit=3) is None


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sandbox" / "files"


def test_a_built_image_is_current_until_the_tree_changes_then_rebuilt(tmp_path: Path, cache: Path) -> None:
    t = _tree(tmp_path)
    assert hostfiles.verdict(str(t)).why == "no image yet"
    m = hostfiles.build(str(t))
    assert m is not None and m.image and m.entries == 5 and m.image_bytes > 0 and not m.error
    image = cache / m.image
    assert image.stat().st_mode & 0o777 == 0o600 and cache.stat().st_mode & 0o777 == 0o700
    assert image.read_bytes()[1024:1028] == (0xE0F5E1E2).to_bytes(4, "little")  # erofs's superblock magic
    assert hostfiles.verdict(str(t)) == hostfiles.Verdict(str(t), str(image), "current", False)
    (t / "d.txt").write_text("new\n")
    assert hostfiles.verdict(str(t)) == hostfiles.Verdict(str(t), None, "changed since its image was built", True)
    m2 = hostfiles.build(str(t))
    assert m2 is not None and m2.image != m.image and hostfiles.verdict(str(t)).image == str(cache / m2.image)
    assert image.exists()  # the old one is kept a while: a run that chose it may still open it
    blob = cache / hostfiles.blob_name(m.image)
    assert blob.exists() and m.image_bytes == image.stat().st_size + blob.stat().st_size
    assert sorted(hostfiles.prune(cache, now=time.time() + hostfiles.PRUNE_AFTER + 1)) == sorted([image, blob])
    assert (cache / m2.image).exists() and (cache / hostfiles.blob_name(m2.image)).exists()


def test_a_tree_that_cannot_be_imaged_says_why_and_is_not_retried_until_it_changes(tmp_path: Path, cache: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    t = _tree(tmp_path)
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr("os.path.exists", lambda p: False)
    m = hostfiles.build(str(t))
    assert m is not None and not m.image and "erofs-utils" in m.error
    v = hostfiles.verdict(str(t))
    assert v.image is None and not v.build and "erofs-utils" in v.why
    (t / "d.txt").write_text("new\n")
    assert hostfiles.verdict(str(t)).build


def test_a_tree_that_changes_while_built_gets_no_image_and_no_new_build_for_a_while(tmp_path: Path, cache: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    t = _tree(tmp_path)
    real_run = subprocess.run

    def mkfs_then_write(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        done: subprocess.CompletedProcess[str] = real_run(argv, **kw)
        if argv[0].endswith("mkfs.erofs"):
            (t / "log.txt").write_text("written while the image was built\n")  # a log, a cache: busy trees
        return done

    monkeypatch.setattr(subprocess, "run", mkfs_then_write)
    m = hostfiles.build(str(t))
    assert m is not None and not m.image and m.error == hostfiles.CHANGED_WHILE_BUILT
    assert not list(cache.glob("*.erofs")) and not list(cache.glob("*.blob"))
    v = hostfiles.verdict(str(t))
    assert v.image is None and not v.build and hostfiles.CHANGED_WHILE_BUILT in v.why  # no build per run
    (t / "log.txt").write_text("and again\n")
    assert not hostfiles.verdict(str(t)).build  # still changing: still none, until the back-off ends
    monkeypatch.setattr(time, "time", lambda: m.built_at + hostfiles.REBUILD_AFTER + 1)
    assert hostfiles.verdict(str(t)).build


def test_a_manifest_of_another_format_or_tree_is_no_manifest(tmp_path: Path, cache: Path) -> None:
    t = _tree(tmp_path)
    cache.mkdir(parents=True)
    m = hostfiles.Manifest(hostfiles.FORMAT, "/elsewhere", "d", "x.erofs", 1, 1, 1, 0.0, 0.0, 0.0)
    from dataclasses import asdict

    hostfiles.manifest_path(str(t)).write_text(json.dumps(asdict(m)))
    assert hostfiles.read_manifest(str(t)) is None
    hostfiles.manifest_path(str(t)).write_text("{not json")
    assert hostfiles.read_manifest(str(t)) is None


def test_the_default_trees_are_directories_and_no_links() -> None:
    for tree in hostfiles.default_trees():
        assert os.path.isdir(tree) and not os.path.islink(tree) and tree.startswith("/usr/")


def test_an_image_written_since_it_was_built_is_not_used(tmp_path: Path, cache: Path) -> None:
    """A run given the cache read-write (--home ~, say) cannot feed later runs a tree of its own making."""
    t = _tree(tmp_path)
    m = hostfiles.build(str(t))
    assert m is not None and hostfiles.verdict(str(t)).image is not None
    blob = cache / hostfiles.blob_name(m.image)
    data = blob.read_bytes()
    time.sleep(0.01)
    blob.write_bytes(data.replace(b"hello", b"HACKD"))  # same size, same name
    assert hostfiles.verdict(str(t)) == hostfiles.Verdict(str(t), None, "its image was changed since it was built", True)


def test_where_the_guest_mounts_its_own_no_tree_is_imaged() -> None:
    for tree in ("/proc/sys/kernel/random", "/sys", "/dev/shm", "/run/user", "/tmp/x", "/var/tmp", "/"):
        assert hostfiles.refusal(tree) is not None, tree
        assert hostfiles.usable_trees([tree], (), []) == ()
    assert hostfiles.refusal("/usr/include") is None and hostfiles.refusal("/var/lib/tree") is None


def test_no_image_is_built_while_a_file_of_the_tree_is_mapped_for_writing(tmp_path: Path, cache: Path) -> None:
    """Writes to a page already dirty in a shared mapping change no timestamp: the fingerprint could not see them."""
    import mmap

    t = _tree(tmp_path)
    with open(t / "a.txt", "r+b") as f, mmap.mmap(f.fileno(), 5) as m:
        m[0:1] = b"J"
        assert hostfiles.mapped_for_writing(str(t)) and not hostfiles.mapped_for_writing(str(t / "sub"))
        assert hostfiles.build(str(t)) is None and hostfiles.read_manifest(str(t)) is None
    assert not hostfiles.mapped_for_writing(str(t))
    m2 = hostfiles.build(str(t))
    assert m2 is not None and m2.image
