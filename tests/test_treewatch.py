"""The pool's tree watcher (sandbox/image/treewatch.py) on real directories: a tree is vouched for only while nothing in it changed."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox.image import hostfiles, treewatch


def test_events_are_parsed_whole_names_and_all() -> None:
    data = struct.pack("iIII", 3, treewatch.IN_MODIFY, 0, 16) + b"name\0".ljust(16, b"\0") + struct.pack("iIII", 4, treewatch.IN_Q_OVERFLOW, 0, 0)
    assert treewatch.parse_events(data) == [(3, treewatch.IN_MODIFY), (4, treewatch.IN_Q_OVERFLOW)]
    assert treewatch.parse_events(data[:10]) == []


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    t = tmp_path / "tree"
    (t / "sub" / "deep").mkdir(parents=True)
    (t / "a.txt").write_text("hello")
    (t / "sub" / "deep" / "c.txt").write_text("sea")
    return t


@pytest.fixture
def watcher() -> Iterator[treewatch.TreeWatcher]:
    w = treewatch.TreeWatcher(hostfiles.digests)
    yield w
    w.close()


def _in_place(t: Path) -> None:
    st = os.stat(t / "sub" / "deep" / "c.txt")
    with open(t / "sub" / "deep" / "c.txt", "r+") as f:
        f.write("SEA")  # same size; mtime set back below: only the event (and ctime) tell
    os.utime(t / "sub" / "deep" / "c.txt", ns=(st.st_atime_ns, st.st_mtime_ns))


CHANGES: dict[str, Callable[[Path], object]] = {
    "in place, deep down": _in_place,
    "added": lambda t: (t / "sub" / "new.txt").write_text("x"),
    "removed": lambda t: (t / "a.txt").unlink(),
    "renamed": lambda t: (t / "sub" / "deep" / "c.txt").rename(t / "sub" / "c.txt"),
    "chmod of a directory": lambda t: os.chmod(t / "sub", 0o700),
    "a new directory": lambda t: (t / "sub" / "deep" / "deeper").mkdir(),
    "touched": lambda t: os.utime(t / "a.txt"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_any_change_ends_the_vouching_and_a_new_watch_takes_the_new_fingerprint(tree: Path, watcher: treewatch.TreeWatcher, change: str) -> None:
    watcher.watch([str(tree)])
    before = hostfiles.digests([str(tree)])[str(tree)]
    assert watcher.current([str(tree)]) == {str(tree): before}
    CHANGES[change](tree)
    assert watcher.current([str(tree)]) == {}  # at once: the event was queued before the change returned
    assert watcher.unknown([str(tree)]) == [str(tree)]
    watcher.watch([str(tree)])
    after = hostfiles.digests([str(tree)])[str(tree)]
    assert after != before and watcher.current([str(tree)]) == {str(tree): after}


def test_a_directory_made_after_the_watch_is_watched_after_the_next_one(tree: Path, watcher: treewatch.TreeWatcher) -> None:
    watcher.watch([str(tree)])
    (tree / "later").mkdir()
    watcher.watch([str(tree)])  # the mkdir ended the vouching; this watch covers "later" too
    assert str(tree) in watcher.current([str(tree)])
    (tree / "later" / "f").write_text("x")
    assert watcher.current([str(tree)]) == {}


def test_a_change_while_the_fingerprint_is_taken_is_never_vouched_for(tree: Path) -> None:
    def racing(trees: list[str]) -> dict[str, str | None]:
        found = hostfiles.digests(trees)
        (tree / "a.txt").write_text("late")  # after the walk, before the watcher records it
        return found

    w = treewatch.TreeWatcher(racing)
    try:
        w.watch([str(tree)])
        assert w.current([str(tree)]) == {}
    finally:
        w.close()


def test_trees_are_vouched_for_each_on_its_own(tmp_path: Path, watcher: treewatch.TreeWatcher) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    watcher.watch([str(a), str(b)])
    (b / "x").write_text("x")
    assert list(watcher.current([str(a), str(b)])) == [str(a)]
    assert watcher.known() == [str(a)]


def test_a_tree_that_cannot_be_watched_stays_unknown(tmp_path: Path, watcher: treewatch.TreeWatcher) -> None:
    watcher.watch([str(tmp_path / "missing")])
    assert watcher.current([str(tmp_path / "missing")]) == {}
    assert watcher.unknown([str(tmp_path / "missing")]) == [str(tmp_path / "missing")]


def test_forget_drops_a_tree_the_walk_found_changed(tree: Path, watcher: treewatch.TreeWatcher) -> None:
    watcher.watch([str(tree)])
    watcher.forget(str(tree))
    assert watcher.current([str(tree)]) == {}  # nothing queued: forgetting alone did it


def test_a_directory_on_the_way_renamed_or_replaced_ends_the_vouching(tmp_path: Path, watcher: treewatch.TreeWatcher) -> None:
    """The tree's path then leads to other directories, while nothing in the old ones changed."""
    t = tmp_path / "a" / "tree"
    t.mkdir(parents=True)
    (t / "f").write_text("old")
    watcher.watch([str(t)])
    assert str(t) in watcher.current([str(t)])
    (tmp_path / "a").rename(tmp_path / "a.old")
    (tmp_path / "a" / "tree").mkdir(parents=True)
    (tmp_path / "a" / "tree" / "f").write_text("new")
    assert watcher.current([str(t)]) == {}


def test_ancestors_are_every_directory_on_the_way() -> None:
    assert treewatch.ancestors("/usr/lib/python3.11") == ["/", "/usr", "/usr/lib"]
    assert treewatch.ancestors("/opt") == ["/"]


def test_an_event_on_a_shared_ancestor_ends_every_tree_below_it(tmp_path: Path, watcher: treewatch.TreeWatcher) -> None:
    a, b = tmp_path / "p" / "a", tmp_path / "p" / "b"
    a.mkdir(parents=True)
    b.mkdir()
    watcher.watch([str(a), str(b)])
    assert len(watcher.current([str(a), str(b)])) == 2
    (tmp_path / "p" / "c").write_text("x")  # a sibling made: over-cautious, both are walked again
    assert watcher.current([str(a), str(b)]) == {}
