"""The guest's mount plan and the --share/--tmpfs syntax (pure: no VM)."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import pytest

from sandbox.plan import mounts
from sandbox.core.errors import UsageError
from sandbox.wire.protocol import MountStep

O, T, H, F, D = "O", "T", "H", "F", "D"


def kinds(existing: dict[str, str]):  # type: ignore[no-untyped-def]
    return lambda path: existing.get(path)


def ops(plan: mounts.Plan) -> list[tuple[str, str]]:
    return [(m.op, m.path) for m in plan.steps]


def test_default_plan_is_copy_on_write_home_tmp_and_empty_run() -> None:
    plan = mounts.plan("/root", "/root/proj", kind=kinds({"/root/.ssh": "dir", "/root/.netrc": "file"}))
    assert ops(plan) == [
        (O, "/home"), (O, "/tmp"), (O, "/root"), (T, "/run"), (T, "/var/tmp"),
        ("h", "/root"), (H, "/root/.ssh"), (F, "/root/.netrc"),
    ]  # fmt: skip
    assert plan.shares == ()
    modes = {m.path: m.mode for m in plan.steps if m.op == T}
    assert modes == {"/run": 0o755, "/var/tmp": 0o1777}


def test_a_home_under_home_needs_no_overlay_of_its_own() -> None:
    plan = mounts.plan("/home/alice", "/home/alice", kind=kinds({}))
    assert ops(plan)[:4] == [(O, "/home"), (O, "/tmp"), (T, "/run"), (T, "/var/tmp")]
    assert (O, "/home/alice") not in ops(plan)


@pytest.mark.parametrize(
    "cwd, extra",
    [
        ("/srv/project", [(O, "/srv/project")]),  # on the read-only root: made copy-on-write
        ("/var/tmp/build", [(O, "/var/tmp/build")]),  # under a fresh tmpfs: shown anyway
        ("/tmp/work", []),  # already copy-on-write
        ("/", []),
    ],
)
def test_the_working_directory_is_always_shown(cwd: str, extra: list[tuple[str, str]]) -> None:
    plan = mounts.plan("/home/u", cwd, kind=kinds({}))
    base = [(O, "/home"), (O, "/tmp"), (T, "/run"), (T, "/var/tmp")]
    assert ops(plan) == base + extra + [("h", "/home/u")]


def test_a_hidden_working_directory_is_an_error_that_names_the_way_out() -> None:
    with pytest.raises(UsageError, match=r"/home/u/.ssh/keys is hidden.*--unhide /home/u/.ssh"):
        mounts.plan("/home/u", "/home/u/.ssh/keys", kind=kinds({}))


def test_private_paths_are_empty_tmpfs() -> None:
    plan = mounts.plan("/home/u", "/srv", private=["/tmp", "/home/u"], kind=kinds({}))
    steps = {m.path: m for m in plan.steps if m.op == T}
    assert steps["/tmp"].mode == 0o1777 and steps["/home/u"] == MountStep(T, "/home/u", tag="u", mode=0o700)
    assert (O, "/tmp") not in ops(plan)


def test_hide_and_unhide() -> None:
    existing = {"/home/u/.ssh": "dir", "/home/u/.aws": "dir", "/home/u/notes": "file", "/etc/secret": "file"}
    plan = mounts.plan("/home/u", "/home/u", hide=["notes", "/etc/secret"], unhide=["~/.ssh"], kind=kinds(existing))
    hidden = [(m.op, m.path) for m in plan.steps if m.op in (H, F)]
    assert hidden == [(H, "/home/u/.aws"), (F, "/home/u/notes"), (F, "/etc/secret")]


def test_shares_are_exported_by_tag_and_mounted_after_the_defaults() -> None:
    shares = [
        mounts.Share(Path("/data"), "/mnt/data", "ro"),
        mounts.Share(Path("/srv/out"), "/tmp/out", "rw"),
        mounts.Share(Path("/srv/src"), "/tmp", "cow"),  # replaces the default /tmp overlay
    ]
    plan = mounts.plan("/home/u", "/home/u", shares=shares, tmpfs=[("/mnt/scratch", "64M")],
                       kind=kinds({"/mnt": "dir", "/tmp": "dir"}))  # fmt: skip
    assert [(tag, s.host) for tag, s in plan.shares] == [("share0", Path("/data")), ("share1", Path("/srv/out")), ("share2", Path("/srv/src"))]
    assert (O, "/tmp") not in ops(plan)
    user = [(m.op, m.path, m.tag, m.size) for m in plan.steps if m.op in "RWCT" and m.path not in ("/run", "/var/tmp")]
    assert user == [
        ("C", "/tmp", "share2", ""), ("R", "/mnt/data", "share0", ""), ("W", "/tmp/out", "share1", ""),
        (T, "/mnt/scratch", "", "64M"),
    ]  # fmt: skip
    # Mount points missing on the read-only root are made first; /tmp/out is
    # inside a copy-on-write mount, where the guest can make it itself.
    assert [m.path for m in plan.steps if m.op == D] == ["/mnt/data", "/mnt/scratch"]
    assert plan.steps[0].op == D


def test_secrets_in_a_shared_home_are_looked_up_in_the_share() -> None:
    share = mounts.Share(Path("/srv/h"), "/home/u", "rw")
    plan = mounts.plan("/home/u", "/home/u", shares=[share], kind=kinds({"/srv/h/.ssh": "dir"}))
    assert [(m.op, m.path) for m in plan.steps if m.op in (H, F)] == [(H, "/home/u/.ssh")]


def test_mounting_over_a_file_is_refused() -> None:
    with pytest.raises(UsageError, match="not a directory"):
        mounts.plan("/home/u", "/", tmpfs=[("/etc/passwd", "")], kind=kinds({"/etc/passwd": "file"}))


def test_share_syntax(tmp_path: Path) -> None:
    (tmp_path / "a:b").mkdir()
    (tmp_path / "plain").mkdir()
    cwd = str(tmp_path)
    assert mounts.parse_share("plain", cwd) == mounts.Share(tmp_path / "plain", str(tmp_path / "plain"), "cow")
    assert mounts.parse_share("plain:rw", cwd) == mounts.Share(tmp_path / "plain", str(tmp_path / "plain"), "rw")
    assert mounts.parse_share("plain:/mnt/x", cwd).guest == "/mnt/x"
    assert mounts.parse_share("plain:/mnt/x:ro", cwd) == mounts.Share(tmp_path / "plain", "/mnt/x", "ro")
    # A last field of ro/rw/cow is always the mode; \: escapes a colon.
    assert mounts.parse_share("a\\:b:/g:cow", cwd) == mounts.Share(tmp_path / "a:b", "/g", "cow")
    assert mounts.parse_share(f"{tmp_path}/a\\:b", cwd).host == tmp_path / "a:b"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("missing", "is not a directory"),
        ("plain:relative", "is not absolute"),
        ("plain:/g:rw:extra", "expected HOST[:GUEST]"),
        ("plain:/", "over the guest's root"),
        ("", "expected HOST"),
    ],
)
def test_bad_shares(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match=needle.replace("[", r"\[")):
        mounts.parse_share(text, str(tmp_path))


def test_tmpfs_syntax() -> None:
    assert mounts.parse_tmpfs("/scratch") == ("/scratch", "")
    assert mounts.parse_tmpfs("/scratch:256M") == ("/scratch", "256M")
    assert mounts.parse_tmpfs("/a\\:b:1g") == ("/a:b", "1g")
    with pytest.raises(UsageError):
        mounts.parse_tmpfs("/a:lots")
    with pytest.raises(UsageError):
        mounts.parse_tmpfs("relative")


def test_a_secret_that_is_a_symlink_is_hidden_where_it_points() -> None:
    links = {"/home/u/.netrc": "/home/u/dotfiles/netrc"}
    plan = mounts.plan("/home/u", "/home/u", kind=kinds({"/home/u/dotfiles/netrc": "file"}),
                       resolve=lambda p: links.get(p, p))  # fmt: skip
    assert [(m.op, m.path) for m in plan.steps if m.op in (H, F)] == [(F, "/home/u/dotfiles/netrc")]


def test_every_homes_secrets_are_hidden_on_the_root() -> None:
    existing = {"/home/alice/.ssh": "dir", "/root/.netrc": "file", "/home/bob/.aws": "dir", "/srv/svc/.kube": "dir"}
    plan = mounts.plan("/root", "/root", kind=kinds(existing), homes=["/home/alice", "/home/bob", "/root", "/srv/svc"])
    hidden = [(op, p) for op, p in ops(plan) if op in (H, F)]
    assert sorted(hidden) == sorted([(H, "/home/alice/.ssh"), (F, "/root/.netrc"), (H, "/home/bob/.aws"), (H, "/srv/svc/.kube")])


def test_a_shared_home_has_its_secrets_hidden_at_the_guest_path_too(tmp_path: Path) -> None:
    existing = {"/root/.ssh": "dir", "/root/.netrc": "file", "/home/alice/.ssh": "dir"}
    shares = [mounts.Share(Path("/root"), "/mnt/h", "ro"), mounts.Share(Path("/"), "/hostroot", "ro")]
    plan = mounts.plan("/home/u", "/home/u", shares=shares, kind=kinds(existing), homes=["/root", "/home/alice"])
    hidden = {p for op, p in ops(plan) if op in (H, F)}
    assert hidden == {
        "/root/.ssh", "/root/.netrc", "/home/alice/.ssh",  # on the root
        "/mnt/h/.ssh", "/mnt/h/.netrc",  # /root shared at /mnt/h
        "/hostroot/root/.ssh", "/hostroot/root/.netrc", "/hostroot/home/alice/.ssh",  # / shared at /hostroot
    }  # fmt: skip


def test_a_deeper_mount_shadows_a_shares_secret() -> None:
    # /mnt/h/.ssh is a tmpfs of the user's own: the share's .ssh is not there to hide.
    shares = [mounts.Share(Path("/root"), "/mnt/h", "ro")]
    plan = mounts.plan("/home/u", "/home/u", shares=shares, tmpfs=[("/mnt/h/.ssh", "")], kind=kinds({"/root/.ssh": "dir"}), homes=["/root"])
    assert (H, "/mnt/h/.ssh") not in ops(plan) and (H, "/root/.ssh") in ops(plan)


def test_unhide_shows_one_home_or_view_on_purpose() -> None:
    existing = {"/root/.ssh": "dir", "/home/alice/.ssh": "dir"}
    shares = [mounts.Share(Path("/root"), "/mnt/h", "ro")]
    plan = mounts.plan("/home/u", "/home/u", shares=shares, kind=kinds(existing), homes=["/root", "/home/alice"],
                       unhide=["/home/alice/.ssh", "/mnt/h/.ssh"])  # fmt: skip
    hidden = {p for op, p in ops(plan) if op in (H, F)}
    assert hidden == {"/root/.ssh"}


@pytest.mark.parametrize("path", [".bashrc", "/etc", "/home/u/.sshx"])
def test_unhide_of_a_path_that_is_not_hidden_is_refused(path: str) -> None:
    with pytest.raises(UsageError, match=r"--unhide .*: not a hidden path"):
        mounts.plan("/home/u", "/home/u", kind=kinds({}), unhide=[path])


def test_host_homes_are_real_existing_directories_with_root() -> None:
    homes = mounts.host_homes()
    assert "/root" in homes
    assert all(h.startswith("/") and h != "/" and Path(h).is_dir() and str(Path(h).resolve()) == h for h in homes)


def _no_lookup(path: str) -> NoReturn:
    raise AssertionError(f"a remote host's plan looked up {path} here")


def test_a_remote_hosts_plan_looks_nothing_up_here_and_keeps_an_empty_start_empty() -> None:
    # The runner's remote plan: the home an empty private tmpfs, the command starting in it.
    plan = mounts.plan("/root", "/root", private=("/root",), kind=_no_lookup, resolve=_no_lookup, homes=(), local=False)
    steps = ops(plan)
    assert (T, "/root") in steps and (O, "/root") not in steps  # never the host's /root: libvirt's QEMU user may not read it
    home = next(m for m in plan.steps if m.op == T and m.path == "/root")
    assert (home.tag, home.mode) == ("u", 0o700)  # the caller's own (the init chowns a "u" tmpfs to the command's user)
    assert steps[0] == (D, "/root")  # made first: that host may have no such directory
    assert (O, "/tmp") in steps and (O, "/home") in steps
    assert [s for s in steps if s[0] in (H, F)] == []  # the home's secrets: nothing there to hide


def test_a_remote_home_under_home_needs_no_mount_point_made() -> None:
    plan = mounts.plan("/home/al", "/home/al", private=("/home/al",), kind=_no_lookup, resolve=_no_lookup, local=False)
    assert (T, "/home/al") in ops(plan) and D not in [op for op, _ in ops(plan)]


def test_a_remote_workdir_outside_the_home_is_shown_copy_on_write() -> None:
    plan = mounts.plan("/root", "/srv/build", private=("/root",), kind=_no_lookup, resolve=_no_lookup, local=False)
    assert (O, "/srv/build") in ops(plan)


def test_remote_hidden_paths_and_mount_points_are_left_to_the_guest() -> None:
    plan = mounts.plan(
        "/root", "/root", private=("/root",), tmpfs=(("/scratch", ""),), hide=("/etc/secret",),
        kind=_no_lookup, resolve=_no_lookup, local=False,
    )  # fmt: skip
    steps = ops(plan)
    # Whichever of a directory or a file it is there, the init applies the step that fits.
    assert (H, "/etc/secret") in steps and (F, "/etc/secret") in steps
    assert (D, "/scratch") in steps
