from sandbox.wire.protocol import TTY_STDIN, TTY_STDOUT
from sandbox.image.kernel import kernel_cmdline
from sandbox.run.runner import tty_mask


def test_kernel_cmdline_knobs() -> None:
    tcg = kernel_cmdline("tcg", 2_600_003, False, 0, "foo=1")
    args = tcg.split()
    assert "tsc_early_khz=2600003" in args and "tsc=reliable" in args and "quiet" in args
    assert "cryptomgr.notests" in args and args[-1] == "foo=1" and "panic=-1" in args
    assert "initcall_blacklist=tracer_init_tracefs" in args
    kvm = kernel_cmdline("kvm", 2_600_003, True, 2, "").split()
    assert not any(a.startswith("tsc_early_khz") for a in kvm)  # kvm-clock knows better
    assert "tsc=reliable" not in kvm and "quiet" not in kvm and "cryptomgr.notests" not in kvm
    traced = kernel_cmdline("tcg", None, False, 0, "", tracefs=True).split()
    assert not any(a.startswith("initcall_blacklist") for a in traced)


def test_no_tty_when_forced_off() -> None:
    assert tty_mask(False) == 0


def test_forced_tty_with_a_pipe_keeps_stdin_a_pipe() -> None:
    import os

    r, w = os.pipe()
    saved = os.dup(0)
    try:
        os.dup2(r, 0)
        mask = tty_mask(True)
    finally:
        os.dup2(saved, 0)
        for fd in (r, w, saved):
            os.close(fd)
    assert mask & TTY_STDOUT and not mask & TTY_STDIN
