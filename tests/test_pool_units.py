"""The pool's pure parts, without a guest: which runs it serves, its messages, its freshness check, the client's choice."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.backends.pool import freshness, key, wire
from sandbox.cli import handoff
from sandbox.core.errors import UsageError
from sandbox.plan.request import CommandRequest, ConfinementOptions, FilesRequest, MachineRequest, NetRequest, RunRequest, X11Request

REPO = Path(__file__).resolve().parent.parent
BASE = RunRequest(CommandRequest(("true",)), confinement=ConfinementOptions(), pool=2)


@pytest.mark.parametrize(
    "request_, why",
    [
        (replace(BASE, connect="qemu:///system"), "--connect"),
        (replace(BASE, machine=MachineRequest(warm=False)), "--cold"),
        (replace(BASE, net=NetRequest("user")), "--net"),
        (replace(BASE, x11=X11Request("xephyr", (800, 600))), "--x11"),
        (replace(BASE, machine=MachineRequest(keyboard=True)), "--keyboard"),
        (replace(BASE, files=FilesRequest(home=Path("/srv"))), "--share/--home (devices of their own)"),
        (replace(BASE, verbose=2), "-vv (a whole boot is shown)"),
    ],
)
def test_what_the_pool_does_not_serve(request_: RunRequest, why: str) -> None:
    assert key.unpoolable(request_) == why
    assert key.unpoolable(BASE) is None


def test_the_key_is_the_machine_and_the_walls_not_the_command() -> None:
    other_command = replace(BASE, command=CommandRequest(("ls", "-l"), cwd="/srv", timeout=3.0))
    assert key.key(other_command) == key.key(BASE)
    assert key.key(replace(BASE, machine=MachineRequest(memory_mb=768))) != key.key(BASE)
    assert key.key(replace(BASE, confinement=ConfinementOptions(pids_limit=64))) != key.key(BASE)
    assert key.key(replace(BASE, confinement=None)) != key.key(BASE)


def test_a_pool_is_made_for_exactly_what_it_was_described_as() -> None:
    asked = replace(BASE, machine=MachineRequest(kernel=Path("/boot/vmlinuz-x"), memory_mb=1024, cpus=2),
                    confinement=ConfinementOptions(memory_limit=2048, limits="best-effort"))  # fmt: skip
    made = key.request_from(key.describe(asked))
    assert (made.machine, made.confinement) == (asked.machine, asked.confinement)
    assert key.key(made) == key.key(asked)
    with pytest.raises(UsageError):
        key.request_from('{"machine": {"no_such_field": 1}, "confinement": null}')


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def test_a_message_and_its_descriptors_arrive_together() -> None:
    a, b = _pair()
    r, w = os.pipe()
    try:
        wire.send(a, {"op": "x", "text": "é\udcff"}, [r, w])
        message, fds = wire.receive(b)
        assert message == {"op": "x", "text": "é\udcff"} and len(fds) == 2
        os.write(fds[1], b"through")
        assert os.read(r, 7) == b"through"
        for fd in fds:
            assert not os.get_inheritable(fd)
            os.close(fd)
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300))
def test_whatever_a_peer_sends_is_a_message_or_one_error(junk: bytes) -> None:
    a, b = _pair()
    try:
        a.sendall(junk + b"\n")
        try:
            message, fds = wire.receive(b)
        except wire.WireError:
            return
        assert isinstance(message, dict) and fds == []
    finally:
        a.close()
        b.close()


def test_a_message_past_its_bound_is_refused() -> None:
    a, b = _pair()
    try:
        a.sendall(b'{"x": "' + b"a" * 70_000)
        with pytest.raises(wire.WireError, match="longer than"):
            wire.receive(b)
        with pytest.raises(wire.WireError):
            wire.send(a, {"x": "a" * 70_000})
    finally:
        a.close()
        b.close()


def test_a_walk_passes_every_directory_and_link(tmp_path: Path) -> None:
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "dash").write_text("x")
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "usr" / "bin" / "sh").symlink_to("dash")
    walked = freshness.walk(f"{tmp_path}/bin/sh")
    for expected in (f"{tmp_path}", f"{tmp_path}/bin", f"{tmp_path}/usr", f"{tmp_path}/usr/bin", f"{tmp_path}/usr/bin/sh",
                     f"{tmp_path}/usr/bin/dash"):  # fmt: skip
        assert expected in walked
    (tmp_path / "loop").symlink_to("loop")
    assert len(freshness.walk(f"{tmp_path}/loop")) < 100  # a loop ends


def test_any_change_to_what_a_guest_read_shows_in_the_fingerprint(tmp_path: Path) -> None:
    d = tmp_path / "lib"
    d.mkdir()
    f = d / "libc.so"
    f.write_bytes(b"a" * 100)
    paths = [str(p) for p in (tmp_path, d, f, d / "absent")]
    before = freshness.fingerprint(paths)
    assert freshness.fingerprint(paths) == before
    stat = f.stat()
    f.write_bytes(b"b" * 100)  # same size...
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...and mtime: the ctime still moves
    assert freshness.fingerprint(paths) != before
    changes: list[Callable[[], object]] = [
        lambda: (d / "new").write_text(""),
        lambda: (d / "new").rename(d / "renamed"),
        lambda: (d / "renamed").unlink(),
        lambda: (d / "absent").write_text("now here"),
    ]
    for change in changes:
        before = freshness.fingerprint(paths)
        change()
        assert freshness.fingerprint(paths) != before


def test_the_pool_watches_every_program_its_guests_exercise() -> None:
    source = (REPO / "guest-init" / "pool.c").read_text()
    exercised = set(re.findall(r'"(/[^"\s]+)"', source))
    assert exercised <= set(freshness.PROGRAMS) | {"/hostroot", "/dev/null"}, exercised  # the guest's own /dev/null, opened before the chroot
    watched = freshness.watched_paths()
    for path in ("/", "/etc", "/etc/ld.so.cache", *freshness.PROGRAMS):
        # What a lookup ends on, and every symbolic link on the way (/bin on a merged-/usr host).
        assert os.path.realpath(path) in watched, path
        parts = path.split("/")
        for i in range(2, len(parts)):
            prefix = "/".join(parts[:i])
            if os.path.islink(prefix):
                assert prefix in watched, prefix


@pytest.mark.parametrize(
    "argv, pooled",
    [
        (["run", "--", "true"], True),
        (["run", "--memory", "1G", "--", "true"], True),
        (["run", "--no-pool", "--", "true"], False),
        (["run", "--pool", "0", "--", "true"], False),
        (["run", "--pool=0", "--", "true"], False),
        (["run", "-d", "--", "sleep", "9"], False),
        (["run", "--", "sh", "-c", "x", "--no-pool"], True),  # the command's own words
        (["list"], False),
        ([], False),
    ],
)
def test_which_command_lines_the_client_hands_to_the_pool(argv: list[str], pooled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_POOL", raising=False)
    assert handoff._for_pool(argv) is pooled
    monkeypatch.setenv("SANDBOX_POOL", "0")
    assert handoff._for_pool(argv) is False


def test_status_for_people_names_every_counter_and_what_guests_are_made_for() -> None:
    from sandbox.backends.pool.control import format_status

    assert "no pool runs" in format_status(None)
    status = {"pid": 7, "size": 2, "ready": [{"qemu_pid": 9, "pss_mib": 55.5, "waiting_s": 3.0}], "serving": 1, "served": 4,
              "refills": 5, "misses": 1, "failures": 0, "stale": 2, "launchers_ready": 1, "launches": 4, "uptime_s": 30.0,
              "idle_s": 600, "pool_pss_mib": 10.0, "memory_mb": 512, "accel": "tcg", "kernel": "/boot/vmlinuz-x", "key": "abc",
              "last_error": "boom"}  # fmt: skip
    text = format_status(status)
    for fragment in ("pool 7: 1 of 2 guests ready, 1 serving", "served 4, refills 5, misses 1", "ended stale 2",
                     "QEMU 9, 55.5 MiB PSS", "512 MiB, tcg, /boot/vmlinuz-x", "last failure: boom"):  # fmt: skip
        assert fragment in text, (fragment, text)


def test_a_fingerprint_is_taken_only_once_the_last_change_is_a_clock_tick_old(tmp_path: Path) -> None:
    # Two changes within one tick of a coarse clock can leave the same ctime: one just before
    # the fingerprint and one just after would go unseen.  So a fresh change is waited out.
    f = tmp_path / "lib.so"
    f.write_bytes(b"x")
    changed = f.stat().st_ctime_ns
    slept: list[float] = []
    now = [changed + freshness.RACY_NS // 2]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += int(seconds * 1e9)

    found = freshness.settled_fingerprint([str(f)], clock=lambda: now[0], sleep=sleep)
    assert slept and found == freshness.fingerprint([str(f)])
    slept.clear()
    assert freshness.settled_fingerprint([str(f)], clock=lambda: changed + 10 * freshness.RACY_NS, sleep=sleep) != ()
    assert not slept  # an old change: at once
    # One that keeps changing is never trusted: () matches no host, and the guest ends as stale.
    assert freshness.settled_fingerprint([str(f)], clock=lambda: changed, sleep=lambda s: None) == ()


def test_any_mount_or_unmount_changes_the_mount_table_digest(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    lines = ["22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw", "23 22 0:22 / /proc rw - proc proc rw"]
    table.write_text("\n".join(lines) + "\n")
    before = freshness.mount_table(str(table))
    assert before and freshness.mount_table(str(table)) == before
    table.write_text("\n".join([*lines, "40 22 0:35 / /var/lib/x rw - tmpfs t rw"]) + "\n")  # a mount
    assert freshness.mount_table(str(table)) not in (b"", before)
    table.write_text(lines[0] + "\n")  # an unmount
    assert freshness.mount_table(str(table)) not in (b"", before)
    assert freshness.mount_table(str(tmp_path / "gone")) == b""  # unreadable: matches no guest (daemon hands none over)
    assert freshness.mount_table() != b""  # this process's own
