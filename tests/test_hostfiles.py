"""Host trees from images on real VMs: used while current, never stale, read-only to every guest (sandbox/image/hostfiles.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import VISIBLE_BASE, Nobody, run_sandbox
from sandbox.image import hostfiles

pytestmark = [pytest.mark.vm]

# What the guest shows of the tree: whether an image is mounted there, then every file with its bytes.
SHOW = 'grep -c " {t} erofs " /proc/mounts; cd {t} && find . -type f | sort | while read f; do echo "$f: $(cat "$f")"; done'


@pytest.fixture
def tree() -> Iterator[Path]:
    """A tree of the host's outside /tmp and every home (those are overlaid, and never imaged), and its images after."""
    t = VISIBLE_BASE / f"tree-{uuid.uuid4().hex[:8]}"
    (t / "sub").mkdir(parents=True)
    (t / "a.txt").write_text("hello")
    (t / "b.txt").write_text("bee")
    (t / "sub" / "c.txt").write_text("sea")
    try:
        yield t
    finally:
        key = hostfiles.tree_key(str(t))
        for made in [*hostfiles.images_dir().glob(f"{key}-*"), *hostfiles.images_dir().glob(f"{key}.*")]:
            made.unlink(missing_ok=True)  # every image of it (earlier ones are kept a while), its manifest and its lock
        shutil.rmtree(t, ignore_errors=True)


def build(t: Path, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> None:
    """The image built now (runs build it in the background; a test waits for none)."""
    subprocess.run([*prefix, sys.executable, "-m", "sandbox.image.hostfiles", str(t)], check=True, env=env, timeout=120)


def seen(t: Path, *opts: str) -> tuple[bool, list[str]]:
    """(whether the run's guest had t from an image, the files it saw with their bytes)."""
    proc = run_sandbox("sh", "-c", SHOW.format(t=t), run_opts=("--image-tree", str(t), *opts), cwd="/")
    assert proc.returncode == 0, proc.stderr.decode()
    count, *files = proc.stdout.decode().splitlines()
    return count == "1", files


def host_view(t: Path) -> list[str]:
    return sorted(f"./{p.relative_to(t)}: {p.read_text()}" for p in t.rglob("*") if p.is_file())


def test_every_change_on_the_host_is_seen_by_the_next_run(tree: Path, start_mode: str, request: pytest.FixtureRequest) -> None:
    """In place (same size, same mtime), added, removed, renamed: each seen by the next run, never the image's old copy.

    Pooled, the pool's watcher vouches for the tree once it watches it (it
    does from the first run that asks), and each change ends that at once.
    """
    t = tree
    assert seen(t) == (False, host_view(t))  # no image yet: 9p
    build(t)
    assert seen(t) == (True, host_view(t))

    def in_place() -> None:
        st = os.stat(t / "a.txt")
        time.sleep(0.03)  # past the racy window: a real edit comes later than the build's fingerprint
        (t / "a.txt").write_text("HELLO")
        os.utime(t / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))

    for change in (in_place, lambda: (t / "d.txt").write_text("new"), lambda: (t / "b.txt").unlink(),
                   lambda: (t / "sub" / "c.txt").rename(t / "sub" / "e.txt")):  # fmt: skip
        change()
        assert seen(t) == (False, host_view(t)), change  # stale: the tree comes over 9p, as it is now
        build(t)
        assert seen(t) == (True, host_view(t)), change  # current again
    # A mount inside the tree, which inotify does not see (pooled, the pool's word ends with any mount).
    subprocess.run(["mount", "-t", "tmpfs", "sandbox-test", str(t / "sub")], check=True)
    try:
        (t / "sub" / "m.txt").write_text("mounted")
        assert seen(t) == (False, host_view(t))
    finally:
        subprocess.run(["umount", str(t / "sub")], check=True)
    assert seen(t)[1] == host_view(t)
    if start_mode == "pooled":
        pool = request.getfixturevalue("test_pool")
        deadline = time.monotonic() + 30
        while str(t) not in pool.status()["trees_watched"]:
            assert time.monotonic() < deadline, "the pool never watched the tree its runs asked about"
            time.sleep(0.2)
        (t / "a.txt").write_text("after")
        assert str(t) not in pool.status()["trees_watched"]
        assert seen(t) == (False, host_view(t))


# What find(1) says of every entry (the guest's find is the host's): all but a directory's size and
# a symbolic link's block count, which are erofs's own.
ENTRIES = "find {t} -printf '%y %p %m %U %G %T@ %n %l\\n' ; find {t} -type f -printf '%p %s %b\\n' ; find {t} -type l -printf '%p %s\\n'"


def test_the_image_shows_every_entry_as_the_host_does(tree: Path) -> None:
    """Against the host itself: types, modes, owners, times to the nanosecond, links, sizes; then the bytes."""
    t = tree
    os.symlink("a.txt", t / "link")
    os.symlink("/nowhere", t / "dangling")
    (t / "empty").touch()
    (t / "tool").write_bytes(os.urandom(70_000) + b"\0" * 2_000_000)  # more than one chunk of the blob
    os.chmod(t / "tool", 0o4755)
    os.link(t / "b.txt", t / "sub" / "hard")
    os.chown(t / "sub" / "c.txt", 1234, 5678)
    os.utime(t / "b.txt", ns=(1, 1_234_567_891_234_567_891))
    (t / "odd name \t ü").write_text("odd")
    build(t)
    host = subprocess.run(["sh", "-c", ENTRIES.format(t=t)], capture_output=True, check=True).stdout
    proc = run_sandbox("sh", "-c", f'grep -c " {t} erofs " /proc/mounts; {ENTRIES.format(t=t)}; echo --; cd {t} && sha256sum tool empty link "odd name \t ü"',
                       run_opts=("--image-tree", str(t)), cwd="/")  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    count, rest = proc.stdout.split(b"\n", 1)
    assert count == b"1"
    listing, sums = rest.split(b"--\n")
    assert sorted(listing.splitlines()) == sorted(host.splitlines())  # each directory's order is its filesystem's own
    want = subprocess.run(["sha256sum", "tool", "empty", "link", "odd name \t ü"], cwd=t, capture_output=True, check=True).stdout
    assert sums == want


def test_no_image_is_used_with_no_images_or_where_a_mount_of_the_run_is(tree: Path) -> None:
    build(tree)
    assert seen(tree, "--no-images") == (False, host_view(tree))
    assert seen(tree, "--tmpfs", f"{tree}/sub")[0] is False  # the plan mounts inside it: no image may hide that
    assert seen(tree)[0] is True


def test_root_in_the_guest_cannot_change_an_image(tree: Path) -> None:
    build(tree)
    m = hostfiles.read_manifest(str(tree))
    assert m is not None and m.image
    image = hostfiles.images_dir() / m.image
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    script = f"""
        echo owned > {image} 2>/dev/null && echo wrote-path
        dd if=/dev/zero of=$(grep " {tree} erofs " /proc/mounts | cut -d' ' -f1) bs=4096 count=1 conv=notrunc 2>/dev/null && echo wrote-device
        cat {tree}/a.txt
    """
    proc = run_sandbox("sh", "-c", script, run_opts=("--image-tree", str(tree)), cwd="/")
    assert proc.returncode == 0, proc.stderr.decode()
    # /root is a copy-on-write overlay in the guest: a write to the path lands there; the loop device is read-only.
    assert b"wrote-device" not in proc.stdout and proc.stdout.endswith(b"\nhello"), proc.stdout
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
    assert seen(tree) == (True, host_view(tree))


def test_a_normal_user_builds_and_uses_images_of_their_own(tree: Path, nobody: Nobody) -> None:
    env = nobody.env()
    build(tree, env=env, prefix=tuple(nobody.prefix))
    images = Path(env["XDG_CACHE_HOME"]) / "sandbox" / "files"
    assert images.stat().st_uid == pwd_uid("nobody") and images.stat().st_mode & 0o777 == 0o700
    proc = nobody.run("run", "--image-tree", str(tree), "--", "sh", "-c", SHOW.format(t=tree))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().splitlines() == ["1", *host_view(tree)]
    # root's own runs never take nobody's image (their caches differ), and build their own
    assert seen(tree)[0] is False


def pwd_uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid
