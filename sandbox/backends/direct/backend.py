"""The direct backend: the launcher runs QEMU itself, inside its walls, and restores it from a template when one fits.

Its attempts, in order: a restore of the template (warm); if there is
none, a cold boot that builds one on the way; if that build fails before
the command started, a plain cold boot; a cold boot that stalls is tried
once more.  No input is read before the command starts, so every
fallback loses nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from sandbox.core import cache
from sandbox.image import host, initramfs, kernel
from sandbox.backends.base import Attempt, BootOnce, BootSpec, Prepared, RunContext, RunResult, WarmStartFailed
from sandbox.core.errors import BootStallError, SandboxError, UsageError
from sandbox.image.guestinit import init_binary
from sandbox.plan.request import RunRequest
from sandbox.backends.direct import template
from sandbox.backends.direct.guest import DirectGuest, WarmStart, template_argv

log = logging.getLogger(__name__)

# A restore resumes in well under a second; one that makes no progress for
# this long is broken, and the run boots cold instead.
WARM_PROGRESS_TIMEOUT = 8.0
BOOT_RETRIES = 1  # a stalled cold boot is tried again this many times


class DirectBackend:
    """QEMU on this host (implements backend.Backend)."""

    name = "direct"
    confined_here = True
    local_files = True

    def __init__(self, request: RunRequest) -> None:
        self.request = request
        self.prepared: Prepared | None = None

    def __enter__(self) -> DirectBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def prepare(self, request: RunRequest) -> Prepared:
        """Resolve the kernel, QEMU and initramfs (all cached after the first run)."""
        m = request.machine
        accel, warning = host.choose_accel(m.accel or "auto")
        if warning and host.show_accel_notice(request.verbose):
            log.warning("%s", warning)
        qemu = host.qemu_info(m.qemu)
        machine = m.machine
        if machine == "auto":
            machine = "microvm" if qemu.microvm else "q35"
        elif machine == "microvm" and not qemu.microvm:
            raise UsageError(f"{qemu.path} has no microvm machine")
        kern = kernel.find_kernel(m.kernel)
        kernel.ensure_readable(kern.image)
        pvh_image = kernel.pvh_image(kern) if m.pvh else None
        image = pvh_image or kern.image
        init = init_binary()
        initrd = initramfs.cached(kern, init, initramfs.wanted_modules(machine, m.keyboard, net=request.net.mode != "none"))
        for stale in cache.prune_boot_images([p for p in (pvh_image, initrd, init) if p is not None]):
            log.info("removed unused cache entry %s", stale)
        tsc = host.tsc_khz() if accel == "tcg" else None
        cmdline = kernel.kernel_cmdline(accel, tsc, m.crypto_selftests, request.verbose, m.kernel_append, m.tracefs)
        self.prepared = Prepared(accel, qemu, machine, image, pvh_image is not None, initrd, cmdline, tsc)
        return self.prepared

    # ---- attempts --------------------------------------------------------

    def run(self, boot: BootSpec, ctx: RunContext, once: BootOnce) -> RunResult:
        """Warm when a template fits, else cold (building the template on the way); a stalled boot is retried."""
        store = self.store(boot)
        if store is not None:
            with restore_inputs(store, boot.memory_mb) as warm:
                if warm is not None:
                    try:
                        attempt = Attempt(1, "warm", WARM_PROGRESS_TIMEOUT, fallback=True, what="the restored guest")
                        return once(lambda: DirectGuest(boot, ctx, warm=warm), attempt)
                    except (WarmStartFailed, template.TemplateError) as exc:
                        log.warning("%s; booting cold", exc)
                        if not isinstance(exc, WarmStartFailed) or exc.template_broken:
                            store.invalidate("its guest failed")
                        ctx.timeline.new_boot()
            result = self._build(store, boot, ctx, once)
            if result is not None:
                return result
        for number in range(1, BOOT_RETRIES + 2):
            try:
                return once(lambda: DirectGuest(boot, ctx), Attempt(number, "cold"))
            except BootStallError as exc:
                if number > BOOT_RETRIES:
                    raise
                log.warning("%s; retrying", exc)
                ctx.timeline.new_boot()
        raise SandboxError("unreachable")  # pragma: no cover

    def _build(self, store: template.Store, boot: BootSpec, ctx: RunContext, once: BootOnce) -> RunResult | None:
        """A cold boot that builds the template on the way; None when none may be built now or the build failed."""
        assert self.prepared is not None
        builder = template.Builder.try_start(store, boot.memory_mb << 20, self.prepared.qemu.version)
        if builder is None:
            return None
        with builder:
            try:
                return once(lambda: DirectGuest(boot, ctx, builder=builder), Attempt(1, "cold, building the template", fallback=True, what="the guest building the warm-start template"))
            except (WarmStartFailed, BootStallError) as exc:
                # Whatever broke the build, this run still gets its plain cold
                # boot: nothing of the command ran and no input was read.
                log.warning("%s; booting cold without a template", exc)
                if isinstance(exc, WarmStartFailed) and not exc.stalled:
                    store.mark_failed(str(exc))
                ctx.timeline.new_boot()
                return None

    def store(self, boot: BootSpec) -> template.Store | None:
        """Where this run's template lives, or None when this run boots cold whatever there is."""
        prep = self.prepared
        assert prep is not None
        if not self.request.machine.warm or self.request.verbose >= 2:  # -vv asks for the boot log: there must be a boot
            return None
        identities = {
            "qemu": f"{cache.file_identity(Path(prep.qemu.path))}:{prep.qemu.version}",
            "kernel": cache.file_identity(prep.kernel_image),
            "initrd": cache.file_identity(prep.initrd),
        }
        try:
            store = template.Store(template.key(template_argv(boot), identities))
            for stale in template.prune(store.key):
                log.info("removed unused template %s", stale)
        except (OSError, SandboxError) as exc:
            log.info("warm start unavailable: %s", exc)
            return None
        return store

    def ready(self, request: RunRequest, boot: BootSpec) -> str | None:
        """The template this request restores from, if it is there (a line saying so); None when a run must build it."""
        store = self.store(boot)
        if store is None:
            raise UsageError("warm start is off for these options (--cold, or -vv which shows a whole boot)")
        found = store.load(boot.memory_mb << 20)
        if found is None:
            return None
        m = found.manifest
        return (f"template {found.key} ready: {m.ram_data_bytes / 2**20:.0f} MiB of guest RAM, "
                f"{m.state_bytes / 1024:.0f} KiB of device state, built in {m.build_seconds:.1f} s ({found.path})")  # fmt: skip

    def vouched_images(self, trees: list[str], images_dir: str) -> tuple[dict[str, str], list[str]]:
        return {}, []  # no watcher here: a run walks its trees itself


@contextlib.contextmanager
def restore_inputs(store: template.Store, memory_mb: int) -> Iterator[WarmStart | None]:
    """The template's RAM and device state for one restore (None: there is no template to use)."""
    found = store.load(memory_mb << 20)
    if found is None:
        yield None
        return
    try:
        state_fd = os.open(found.state, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        store.invalidate(f"cannot read its device state: {exc.strerror}")
        yield None
        return
    try:
        ram = template.RestoreRam(found, store.root)
    except OSError as exc:
        os.close(state_fd)
        log.info("warm start unavailable: %s", exc)
        yield None
        return
    with ram:
        try:
            yield WarmStart(ram, state_fd)
        finally:
            os.close(state_fd)
