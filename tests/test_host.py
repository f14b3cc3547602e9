import pytest

from sandbox import host
from sandbox.errors import UsageError


def test_kvm_needs_extension_vendor_module_and_device() -> None:
    assert host.kvm_problem({"vmx"}, {"kvm_intel", "kvm"}, True) is None
    assert host.kvm_problem({"svm"}, {"kvm_amd"}, True) is None
    # kvm_pvm offers /dev/kvm without vmx/svm: a stock kernel hangs there
    assert "vmx/svm" in (host.kvm_problem({"sse2"}, {"kvm", "kvm_pvm"}, True) or "")
    assert "kvm_intel" in (host.kvm_problem({"vmx"}, {"kvm"}, True) or "")
    assert "/dev/kvm" in (host.kvm_problem({"vmx"}, {"kvm_intel"}, False) or "")


def test_tcg_on_request_and_kvm_refused_when_unusable_here() -> None:
    assert host.choose_accel("tcg") == ("tcg", None)
    if host.kvm_problem(host.cpu_flags(), host.loaded_modules(), True) is None:
        pytest.fail("these tests expect a machine without hardware KVM (see DEVELOPERS.md)")
    accel, warning = host.choose_accel("auto")
    assert accel == "tcg" and warning and "TCG" in warning
    with pytest.raises(UsageError, match="not usable"):
        host.choose_accel("kvm")


def test_qemu_probe_is_cached_and_finds_microvm() -> None:
    info = host.qemu_info()
    assert info.microvm and info.version
    assert host.qemu_info() == info


def test_tsc_rate_is_plausible() -> None:
    khz = host.tsc_khz()
    assert khz is not None and 500_000 < khz < 10_000_000
