import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from sandbox.image import host
from sandbox.core.errors import UsageError


def test_kvm_needs_extension_vendor_module_and_device() -> None:
    assert host.kvm_problem({"vmx"}, {"kvm_intel", "kvm"}, True) is None
    assert host.kvm_problem({"svm"}, {"kvm_amd"}, True) is None
    # kvm_pvm offers /dev/kvm without vmx/svm: a stock kernel hangs there
    assert "vmx/svm" in (host.kvm_problem({"sse2"}, {"kvm", "kvm_pvm"}, True) or "")
    assert "kvm_intel" in (host.kvm_problem({"vmx"}, {"kvm"}, True) or "")
    assert "/dev/kvm" in (host.kvm_problem({"vmx"}, {"kvm_intel"}, False) or "")


def test_tcg_on_request_and_auto_matches_what_the_host_offers() -> None:
    assert host.choose_accel("tcg") == ("tcg", None)
    problem = host.kvm_problem(host.cpu_flags(), host.loaded_modules(), os.access("/dev/kvm", os.R_OK | os.W_OK))
    accel, warning = host.choose_accel("auto")
    if problem is None:  # a host with working KVM
        assert (accel, warning) == ("kvm", None) and host.choose_accel("kvm") == ("kvm", None)
        return
    assert accel == "tcg" and warning and "TCG" in warning and problem in warning
    with pytest.raises(UsageError, match="not usable"):
        host.choose_accel("kvm")


def test_qemu_probe_is_cached_by_binary_identity_and_finds_microvm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    info = host.qemu_info()
    assert info.microvm and info.seccomp and info.version
    records = list((tmp_path / "sandbox").glob("qemu-*.json"))
    assert len(records) == 1
    # The second call reads the record: a doctored one shows it was used.
    records[0].write_text(json.dumps(dict(asdict(info), version="doctored")))
    assert host.qemu_info().version == "doctored"


def test_tsc_rate_is_plausible() -> None:
    khz = host.tsc_khz()
    assert khz is not None and 500_000 < khz < 10_000_000


def test_the_tcg_notice_is_shown_once_per_user_terminal_or_not_and_with_verbose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pty
    import sys

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w") as tty:
            monkeypatch.setattr(sys, "stderr", tty)
            assert host.show_accel_notice(0) is True
            assert (tmp_path / "state" / "sandbox" / "accel-notice-shown").exists()
            assert host.show_accel_notice(0) is False  # a terminal does not bring it back
            assert host.show_accel_notice(1) is True
    finally:
        os.close(master)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "other-user"))
    assert host.show_accel_notice(0) is True
