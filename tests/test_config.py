"""The accelerator chosen once (environment or config file), and the TCG notice shown once."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox import config, host
from sandbox.errors import UsageError


@pytest.fixture(autouse=True)
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SANDBOX_ACCEL", raising=False)
    config._file.cache_clear()


def test_flag_then_environment_then_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.accel(None) == "auto"
    path = tmp_path / "config" / "sandbox" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text('accel = "tcg"\n')
    config._file.cache_clear()  # read once per process
    assert config.accel(None) == "tcg"
    monkeypatch.setenv("SANDBOX_ACCEL", "auto")
    assert config.accel(None) == "auto"
    assert config.accel("kvm") == "kvm"


def test_bad_values_name_their_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_ACCEL", "fast")
    with pytest.raises(UsageError, match="SANDBOX_ACCEL: accelerator 'fast'"):
        config.accel(None)
    monkeypatch.delenv("SANDBOX_ACCEL")
    path = tmp_path / "config" / "sandbox" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text("accel = \n")
    config._file.cache_clear()
    with pytest.raises(UsageError, match="config.toml"):
        config.accel(None)


def test_the_tcg_notice_is_shown_once_unless_verbose() -> None:
    # stderr is not a terminal under pytest's capture
    assert host.show_accel_notice(0) is True
    assert host.show_accel_notice(0) is False
    assert host.show_accel_notice(1) is True
