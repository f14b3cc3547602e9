"""The user's own files in the guest (issue 10), end to end: every test boots a real VM.

The guest sees the host's files, copy-on-write under /home, the home, /tmp
and the working directory; its writes vanish; secrets are hidden; shares
are ro, rw or cow; a read-write share never changes owners or modes.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SANDBOX, Nobody, popen, run_sandbox, run_tracked, stderr_lines

pytestmark = [pytest.mark.vm]

PROBE = "sbt-" + uuid.uuid4().hex[:8]


def _project(where: Path, owner: str | None) -> Path:
    project = where / f"{PROBE} project"
    project.mkdir(parents=True)
    (project / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (project / "run.sh").chmod(0o755)
    (project / "keep.txt").write_text("host\n")
    if owner:
        for p in (project, project / "run.sh", project / "keep.txt"):
            shutil.chown(p, owner, owner if owner != "nobody" else "nogroup")
    return project


# In the guest: run a script by relative path, read a host file, then
# write, change and delete in the cwd, the home and /tmp.
SCRIPT = f"""
./run.sh && cat keep.txt && pwd
echo guest > new.txt && echo changed > keep.txt && rm keep.txt && echo cwd-writes-ok
echo x > "$HOME/{PROBE}-home" && echo y > /tmp/{PROBE}-tmp && echo home-tmp-writes-ok
"""


def _check_host_unchanged(project: Path, home: Path) -> None:
    assert (project / "keep.txt").read_text() == "host\n", "a deletion in the guest reached the host"
    assert not (project / "new.txt").exists()
    assert not (home / f"{PROBE}-home").exists() and not Path(f"/tmp/{PROBE}-tmp").exists()


@pytest.fixture
def srv_dir() -> Iterator[Path]:
    path = Path("/srv") / PROBE
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("where", ["tmp", "home", "srv"])
def test_the_cwd_is_visible_copy_on_write_as_root(where: str, tmp_path: Path, srv_dir: Path) -> None:
    home = Path(os.environ.get("HOME", "/root"))
    base = {"tmp": tmp_path, "home": home, "srv": srv_dir}[where]
    project = _project(base, None)
    try:
        proc = run_sandbox("sh", "-c", SCRIPT, cwd=project)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.decode().splitlines() == ["ran", "host", str(project), "cwd-writes-ok", "home-tmp-writes-ok"]
        _check_host_unchanged(project, home)
    finally:
        shutil.rmtree(project, ignore_errors=True)


@pytest.mark.parametrize("where", ["tmp", "home", "srv"])
def test_the_cwd_is_visible_copy_on_write_as_a_normal_user(where: str, nobody: Nobody, srv_dir: Path) -> None:
    tmp = Path("/tmp") / f"{PROBE}-nobody"
    tmp.mkdir()
    shutil.chown(tmp, "nobody", "nogroup")
    shutil.chown(srv_dir, "nobody", "nogroup")
    base = {"tmp": tmp, "home": nobody.home, "srv": srv_dir}[where]
    project = _project(base, "nobody")
    try:
        proc = nobody.run("run", "--", "sh", "-c", SCRIPT, cwd=project)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.decode().splitlines() == ["ran", "host", str(project), "cwd-writes-ok", "home-tmp-writes-ok"]
        _check_host_unchanged(project, nobody.home)
    finally:
        shutil.rmtree(project, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_cwd_that_cannot_be_shown_is_an_error_that_names_the_reason(srv_dir: Path) -> None:
    gone = srv_dir / "gone"
    gone.mkdir()
    proc = run_tracked(["sh", "-c", f'cd "{gone}" && rmdir "{gone}" && exec "$@"', "sh", *SANDBOX, "run", "--", "true"])
    assert proc.returncode == 125
    assert proc.stderr.decode().strip() == "sandbox: the working directory cannot be shown in the sandbox: No such file or directory"
    home = srv_dir / "home"
    (home / ".ssh").mkdir(parents=True)
    proc = run_sandbox("true", cwd=home / ".ssh", env=dict(os.environ, HOME=str(home)))
    assert proc.returncode == 125
    assert stderr_lines(proc) == [
        f"sandbox: the working directory {home}/.ssh is hidden in the sandbox (--unhide {home}/.ssh shows it)"
    ]


def test_secrets_are_hidden_and_can_be_unhidden(srv_dir: Path) -> None:
    home = srv_dir / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY\n")
    (home / "dotfiles").mkdir()
    (home / "dotfiles" / "netrc").write_text("machine example.com password hunter2\n")
    (home / ".netrc").symlink_to("dotfiles/netrc")  # hidden where it points
    (home / ".bashrc").write_text("# my rc\n")
    (home / "notes").write_text("secret notes\n")
    env = dict(os.environ, HOME=str(home))
    script = "cd; cat .bashrc; ls -A .ssh | wc -l; cat .ssh/id_ed25519 2>/dev/null || echo no-key; wc -c < .netrc; wc -c < notes"
    proc = run_sandbox("sh", "-c", script, env=env, run_opts=("--hide", "notes"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode().splitlines()
    assert out == ["# my rc", "0", "no-key", "0", "0"], out
    proc = run_sandbox("sh", "-c", "cat ~/.ssh/id_ed25519", env=env, run_opts=("--unhide", ".ssh"))
    assert proc.stdout == b"PRIVATE KEY\n", proc.stderr


@pytest.fixture
def other_user(srv_dir: Path) -> Iterator[Path]:
    """Another account of the passwd database, with a key in its home; its home."""
    home = srv_dir / "alice"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("ALICE KEY\n")
    (home / ".netrc").write_text("machine example.com password alice\n")
    name = f"sbt{os.getpid()}"
    subprocess.run(["useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield home
    finally:
        subprocess.run(["userdel", name], check=True)


def test_every_homes_secrets_are_hidden_wherever_the_guest_sees_them(other_user: Path) -> None:
    home = other_user
    key, netrc = home / ".ssh" / "id_ed25519", home / ".netrc"
    views = [f"{key}", f"{netrc}", f"/mnt/h/.ssh/id_ed25519", "/mnt/h/.netrc", f"/hostroot{key}", f"/hostroot{netrc}"]
    script = "for f in " + " ".join(views) + '; do echo "$f: $(cat $f 2>/dev/null | wc -c)"; done'
    shares = ("--share", f"{home}:/mnt/h:ro", "--share", "/:/hostroot:ro")
    proc = run_sandbox("sh", "-c", script, cwd="/", run_opts=shares)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == [f"{v}: 0" for v in views]
    # --unhide shows one of them on purpose, and only that one.
    proc = run_sandbox("sh", "-c", script, cwd="/", run_opts=(*shares, "--unhide", f"/hostroot{home}/.ssh"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == [f"{v}: {10 if v == f'/hostroot{key}' else 0}" for v in views]


def test_unhide_of_a_path_that_is_not_hidden_is_refused() -> None:
    proc = run_sandbox("true", run_opts=("--unhide", ".bashrc"))
    assert proc.returncode == 125
    assert len(stderr_lines(proc)) == 1 and stderr_lines(proc)[0].startswith("sandbox: --unhide ")
    assert "not a hidden path" in stderr_lines(proc)[0]


def test_shares_in_each_mode_and_tmpfs(tmp_path: Path) -> None:
    ro, rw, cow = (tmp_path / n for n in ("ro", "rw", "cow"))
    odd = tmp_path / "odd:name,x"
    for d in (ro, rw, cow, odd):
        d.mkdir()
        (d / "f").write_text(f"{d.name}\n")
    guest_ro, guest_cow, scratch = f"/mnt/{PROBE}-ro", f"/srv/{PROBE}-cow", f"/mnt/{PROBE}-scratch"
    script = f"""
cat {guest_ro}/f; touch {guest_ro}/x 2>&1 | grep -c Read-only
cat {rw}/f; echo written > {rw}/new
cat {guest_cow}/f; echo cow > {guest_cow}/new && cat {guest_cow}/new
cat /mnt/{PROBE}-odd/f
df -k {scratch} | awk 'NR==2 {{print $2}}'; touch {scratch}/ok && echo scratch-ok
touch /usr/{PROBE} 2>&1 | grep -c Read-only
"""
    opts = (
        "--share", f"{ro}:{guest_ro}:ro", "--share", f"{rw}:rw", "--share", f"{cow}:{guest_cow}",
        "--share", f"{str(odd).replace(':', chr(92) + ':')}:/mnt/{PROBE}-odd:ro", "--tmpfs", f"{scratch}:8M",
    )  # fmt: skip
    proc = run_sandbox("sh", "-c", script, run_opts=opts)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["ro", "1", "rw", "cow", "cow", "odd:name,x", "8192", "scratch-ok", "1"]
    assert (rw / "new").read_text() == "written\n"
    assert not (cow / "new").exists()
    # Mount points the host lacks were made in the guest only.
    for p in (guest_ro, guest_cow, scratch, f"/mnt/{PROBE}-odd", f"/usr/{PROBE}"):
        assert not Path(p).exists(), p


def _snapshot(tree: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for root, dirs, files in os.walk(tree):
        for name in ["", *dirs, *files]:
            p = Path(root) / name
            st = p.lstat()
            out[str(p.relative_to(tree))] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    return out


@pytest.fixture
def owned_tree(srv_dir: Path) -> Path:
    """A tree with a setuid root binary, a 0600 file and another user's file, as a git repository."""
    tree = srv_dir / "tree"
    tree.mkdir()
    shutil.copy("/bin/true", tree / "suid")
    (tree / "suid").chmod(0o4755)
    (tree / "private").write_text("mine\n")
    (tree / "private").chmod(0o600)
    (tree / "theirs").write_text("theirs\n")
    os.chown(tree / "theirs", 1000, 1000)
    (tree / "sub").mkdir()
    (tree / "sub" / "existing").write_text("before\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tree)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "suid", "private", "sub"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    return tree


def test_root_home_share_keeps_owners_and_modes_and_git_works(owned_tree: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("root's read-write shares are what this checks")
    before = _snapshot(owned_tree)
    script = "cd && git status --short && echo more >> sub/existing && echo new > created && id -u"
    proc = run_sandbox("sh", "-c", script, run_opts=("--home", str(owned_tree)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["??", "theirs", "0"]
    after = _snapshot(owned_tree)
    assert after.pop("created") == (0, 0, 0o644)  # the tree's owner, by the command's umask
    assert {k: v for k, v in after.items() if not k.startswith(".git")} == {k: v for k, v in before.items() if not k.startswith(".git")}
    assert (owned_tree / "sub" / "existing").read_text() == "before\nmore\n"


def test_new_files_in_a_share_are_their_creators_as_on_the_host(srv_dir: Path) -> None:
    tree = srv_dir / "alice"
    tree.mkdir()
    os.chown(tree, 1000, 1000)
    script = f"echo hi > {tree}/new && setpriv --reuid=1000 --regid=1000 --clear-groups sh -c 'echo x > {tree}/hers' && cd {tree} && stat -c '%u %g %n' hers new"
    proc = run_sandbox("sh", "-c", script, run_opts=("--share", f"{tree}:rw"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == ["1000 1000 hers", "0 0 new"]  # the guest shows real owners
    assert [(p.name, p.stat().st_uid, p.stat().st_gid) for p in sorted(tree.iterdir())] == [("hers", 1000, 1000), ("new", 0, 0)]


# Each step as a user would type it; the same steps run directly on the
# host are the oracle for what they do to a read-write share.
SHARE_STEPS = [
    "echo more >> prog",  # root keeps the setuid bit (CAP_FSETID); others lose it
    "chown 1001 prog2",  # root may; chown clears setuid/setgid, as the host does
    "chgrp 1001 prog3",
    "echo x >> others",  # another user's 0644 file: root writes it, nobody may not
    "chmod 4711 mine",
    "chmod 0640 others",
    "touch -d @86400 others",
    "mkdir d && chmod 2775 d && echo hi > d/new",
    "chown 1000:1000 d/new",
    "ln -s prog link && chown -h 1000 link",
    "rm others2",
]


def _share_tree(tree: Path, owner: int, group: int) -> None:
    tree.mkdir()
    for name, mode, uid, gid in [("prog", 0o4755, owner, group), ("prog2", 0o4755, owner, group), ("prog3", 0o2755, owner, group),
                                 ("others", 0o644, 1000, 1000), ("others2", 0o644, 1000, 1000), ("mine", 0o644, owner, group)]:  # fmt: skip
        (tree / name).write_text(f"{name}\n")
        os.chown(tree / name, uid, gid)
        (tree / name).chmod(mode)
    os.chown(tree, owner, group)


def _tree_state(tree: Path) -> dict[str, tuple[int, int, str, str]]:
    out = {}
    for p in sorted(tree.rglob("*")):
        st = p.lstat()
        data = os.readlink(p) if p.is_symlink() else p.read_text() if p.is_file() else ""
        out[str(p.relative_to(tree))] = (st.st_uid, st.st_gid, stat.filemode(st.st_mode), data)
    out["."] = (tree.stat().st_uid, tree.stat().st_gid, stat.filemode(tree.stat().st_mode), "")
    return out


@pytest.mark.parametrize("who", ["root", "nobody"])
def test_a_read_write_share_behaves_as_the_host_does(who: str, srv_dir: Path, nobody: Nobody) -> None:
    owner = 0 if who == "root" else 65534
    os.chown(srv_dir, owner, owner)
    script = "; ".join(f"sh -c '{step}' 2>/dev/null; echo \"{step}: $?\"" for step in SHARE_STEPS) + "; date -r others +%s"
    host_tree, guest_tree = srv_dir / "host", srv_dir / "guest"
    _share_tree(host_tree, owner, owner)
    _share_tree(guest_tree, owner, owner)
    prefix = [] if who == "root" else nobody.prefix
    direct = subprocess.run([*prefix, "sh", "-c", script], cwd=host_tree, capture_output=True, check=False)
    if who == "root":
        proc = run_sandbox("sh", "-c", script, cwd=guest_tree, run_opts=("--share", f"{guest_tree}:rw"))
    else:
        proc = nobody.run("run", "--share", f"{guest_tree}:rw", "--", "sh", "-c", script, cwd=guest_tree)
    assert proc.returncode == direct.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == direct.stdout.decode().splitlines()
    guest, host = _tree_state(guest_tree), _tree_state(host_tree)
    if who == "root":
        # The one known difference (README, "Read-write shares"): the host's
        # kernel keeps a setuid bit on a write only for a writer holding
        # CAP_FSETID in its initial user namespace, and QEMU holds its
        # capabilities in a namespace of its own.
        assert host["prog"][2] == "-rwsr-xr-x" and guest["prog"][2] == "-rwxr-xr-x"
        guest["prog"] = host["prog"]
    assert guest == host


def test_kill_9_of_the_launcher_or_a_timeout_leaves_the_tree_as_the_command_left_it(owned_tree: Path) -> None:
    before = _snapshot(owned_tree)
    proc = popen([*SANDBOX, "run", "--share", f"{owned_tree}:rw", "--", "sh", "-c",
                  f"echo x > {owned_tree}/written; echo ready; sleep 600"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    after = _snapshot(owned_tree)
    assert after.pop("written") == (0, 0, 0o644)
    assert after == before
    # The next run reclaims what the killed launcher left (its runtime dir);
    # a timed-out run leaves the tree alone too.
    killed = proc.pid
    proc2 = run_sandbox("sh", "-c", f"echo y > {owned_tree}/late; sleep 600", run_opts=("--share", f"{owned_tree}:rw", "--timeout", "5"))
    assert proc2.returncode == 124, proc2.stderr
    assert not list(Path("/run/sandbox").glob(f"run-{killed}-*"))
    after = _snapshot(owned_tree)
    assert after.pop("written") == after.pop("late") == (0, 0, 0o644)
    assert after == before


def test_a_tree_without_idmapped_mounts_is_refused_with_the_way_out() -> None:
    proc = run_sandbox("true", run_opts=("--share", "/proc:/mnt/p:rw"))
    assert proc.returncode == 125
    assert stderr_lines(proc) == [
        "sandbox: cannot share /proc read-write with QEMU as an unprivileged user: its filesystem has no idmapped mounts "
        "(Invalid argument); --qemu-user root runs QEMU as root instead"
    ]


def test_private_gives_an_empty_tmpfs() -> None:
    proc = run_sandbox("sh", "-c", "ls -A /tmp | wc -l; touch /tmp/x && echo ok", cwd="/", run_opts=("--private", "/tmp"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"0\nok\n"


def test_a_normal_users_rw_share_writes_as_that_user(nobody: Nobody, srv_dir: Path) -> None:
    tree = srv_dir / "mine"
    tree.mkdir()
    shutil.chown(srv_dir, "nobody", "nogroup")
    shutil.chown(tree, "nobody", "nogroup")
    proc = nobody.run("run", "--share", f"{tree}:rw", "--", "sh", "-c", f"echo hi > {tree}/new")
    assert proc.returncode == 0, proc.stderr
    st = (tree / "new").stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert stderr_lines(proc) == []


def test_a_read_write_share_as_root_never_chowns(owned_tree: Path) -> None:
    # While it runs, too: the host sees the same owners throughout.
    before = _snapshot(owned_tree)
    proc = popen([*SANDBOX, "run", "--home", str(owned_tree), "--", "sh", "-c", "echo ready; sleep 600"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        assert _snapshot(owned_tree) == before
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    time.sleep(0.1)
    assert _snapshot(owned_tree) == before
