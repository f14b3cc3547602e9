"""Runtime dirs are never another user's: real directories, no VM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.core import runbase, runtime


def test_a_fresh_dir_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "sandbox-1000"
    assert runbase.private_dir(path)
    assert path.stat().st_mode & 0o777 == 0o700
    assert runbase.private_dir(path)  # and is accepted again


@pytest.mark.parametrize("planted", ["symlink", "world-writable", "other-owner", "file"])
def test_a_planted_dir_is_refused_and_left_alone(tmp_path: Path, planted: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    path = tmp_path / "sandbox-1000"
    if planted == "symlink":
        path.symlink_to(victim)
    elif planted == "world-writable":
        path.mkdir()
        path.chmod(0o777)
    elif planted == "other-owner":
        if os.geteuid() != 0:
            pytest.fail("making another user's directory needs root")
        path.mkdir(mode=0o700)
        os.chown(path, 65534, 65534)
    else:
        path.write_text("")
    assert not runbase.private_dir(path)
    assert list(victim.iterdir()) == []
    assert path.is_symlink() == (planted == "symlink")


def test_runtime_base_falls_back_to_a_fresh_private_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (xdg / "sandbox").symlink_to(victim)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    monkeypatch.setattr(runtime, "_fallback", None)
    with runtime.runtime_dir() as rundir:
        base = rundir.parent
        assert base != victim and base != xdg / "sandbox"
        assert base.stat().st_mode & 0o777 == 0o700 and base.stat().st_uid == os.geteuid()
        assert (rundir / "qemu.log").parent == rundir
    assert not base.exists(), "the fallback base is removed with its run"
    assert list(victim.iterdir()) == []
    assert "is not a private directory of yours" in caplog.text
