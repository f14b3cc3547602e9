"""The pure and file-level parts of warm start: keys, argv, the store's checks, copies, sharing, pruning."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.wire import protocol
from sandbox.plan import timings
from sandbox.backends.direct import argv as qemuargv
from sandbox.backends.direct import template
from sandbox.backends.base import BootSpec, Share
from sandbox.backends.direct.guest import template_argv

BOOT = BootSpec(
    qemu="/usr/bin/qemu-system-x86_64", accel="tcg", machine="microvm", kernel_image=Path("/cache/vmlinux.pvh"),
    pvh=True, initrd=Path("/cache/initramfs.cpio"), cmdline="console=ttyS0 quiet", memory_mb=512, cpus=1,
    tb_size_mb=24, cpu_model=None, seccomp=True, x11=False, shares=(),
)  # fmt: skip


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    yield tmp_path / "sandbox" / "templates"


def test_template_argv_ignores_what_only_the_host_sees() -> None:
    base = template_argv(BOOT)
    assert template_argv(dataclasses.replace(BOOT, seccomp=False)) == base
    assert template_argv(dataclasses.replace(BOOT, x11=True)) == base  # the X11 port is always there
    assert template_argv(dataclasses.replace(BOOT, kernel_image=Path("/elsewhere/vmlinux"))) == base
    ro = Share("share0", Path("/home/u/a"), readonly=True)
    rw = Share("share0", Path("/srv/b"), readonly=False)
    assert template_argv(dataclasses.replace(BOOT, shares=(ro,))) == template_argv(dataclasses.replace(BOOT, shares=(rw,)))


@pytest.mark.parametrize(
    "change",
    [
        {"memory_mb": 1024}, {"cpus": 2}, {"cmdline": "console=ttyS0"}, {"accel": "kvm"}, {"machine": "q35"},
        {"tb_size_mb": 64}, {"cpu_model": "max"}, {"shares": (Share("share0", Path("/x")),)},
    ],
)  # fmt: skip
def test_template_key_changes_with_what_shapes_the_guest(change: dict[str, object]) -> None:
    files = {"qemu": "q1", "kernel": "k1", "initrd": "i1"}
    assert template.key(template_argv(dataclasses.replace(BOOT, **change)), files) != template.key(template_argv(BOOT), files)  # type: ignore[arg-type]


def test_template_key_changes_with_the_files() -> None:
    argv = template_argv(BOOT)
    files = {"qemu": "q1", "kernel": "k1", "initrd": "i1"}
    keys = {template.key(argv, files)} | {template.key(argv, files | {name: "other"}) for name in files}
    assert len(keys) == 4


def test_argv_for_restore_and_build() -> None:
    base = dict(qemu="qemu", accel="tcg", machine="microvm", kernel=Path("k"), initrd=Path("i"), cmdline="c", memory_mb=256)
    restore = qemuargv.build_argv(qemuargv.MachineSpec(**base, ram=qemuargv.GuestRam("/proc/self/fd/7", False), incoming=True))  # type: ignore[arg-type]
    assert "memory-backend-file,id=mem0,size=256M,mem-path=/proc/self/fd/7,share=off" in restore
    assert restore[restore.index("-incoming") + 1] == "defer"
    assert restore[restore.index("-machine") + 1].endswith(",memory-backend=mem0")
    build = qemuargv.build_argv(qemuargv.MachineSpec(**base, ram=qemuargv.GuestRam("/tmp/a,b", True)))  # type: ignore[arg-type]
    assert "memory-backend-file,id=mem0,size=256M,mem-path=/tmp/a,,b,share=on" in build
    assert "-incoming" not in build
    cold = qemuargv.build_argv(qemuargv.MachineSpec(**base))  # type: ignore[arg-type]
    assert not any("memory-backend" in a for a in cold) and "-incoming" not in cold


def _sparse(path: Path, size: int, pages: dict[int, bytes]) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for nr, data in pages.items():
            f.seek(nr * template.PAGE)
            f.write(data)


def test_copies_keep_holes_and_skip_zero_pages(tmp_path: Path) -> None:
    size = 64 * template.PAGE
    src = tmp_path / "src"
    _sparse(src, size, {0: b"a" * template.PAGE, 5: bytes(template.PAGE), 6: b"\x01" + bytes(template.PAGE - 1), 63: b"z"})
    fd = os.open(src, os.O_RDONLY)
    try:
        for copy, expect_bytes in ((template.copy_data, None), (template.copy_nonzero_pages, 3 * template.PAGE)):
            dst_path = tmp_path / copy.__name__
            dst = os.open(dst_path, os.O_RDWR | os.O_CREAT)
            os.ftruncate(dst, size)
            copied = copy(fd, dst, size)
            os.close(dst)
            assert dst_path.read_bytes() == src.read_bytes()
            if expect_bytes is not None:
                assert copied == expect_bytes  # the all-zero page 5 is left a hole
                assert os.stat(dst_path).st_blocks * 512 <= 4 * template.PAGE
    finally:
        os.close(fd)


def test_punching_frees_the_zero_pages_of_the_source_and_keeps_its_data() -> None:
    # A memfd, as the guest RAM of a template build is: written all over
    # (the guest zeroed its free memory), a few pages with data.
    size = 256 * template.PAGE
    fd = os.memfd_create("punch-test", os.MFD_CLOEXEC)
    dst = os.memfd_create("punch-dst", os.MFD_CLOEXEC)
    try:
        os.ftruncate(dst, size)
        os.pwrite(fd, bytes(size), 0)
        data = {3: b"x" * template.PAGE, 200: b"y" + bytes(template.PAGE - 1)}
        for nr, page in data.items():
            os.pwrite(fd, page, nr * template.PAGE)
        before = os.fstat(fd).st_blocks
        assert template.copy_nonzero_pages(fd, dst, size, punch=True) == 2 * template.PAGE
        assert os.fstat(fd).st_blocks * 512 == 2 * template.PAGE < before * 512
        assert os.pread(fd, size, 0) == os.pread(dst, size, 0)  # the same bytes, zero pages as holes
        assert os.pread(fd, template.PAGE, 200 * template.PAGE) == data[200]
    finally:
        os.close(fd)
        os.close(dst)


def _fake_template(store: template.Store, memory: int, **manifest: object) -> None:
    tmp = store.root / "tmp-fake"
    tmp.mkdir()
    _sparse(tmp / "ram", memory, {1: b"guest"})
    (tmp / "state").write_bytes(b"QEVM" + bytes(100))
    m = template.Manifest(format=template.FORMAT, key=store.key, memory_bytes=memory, ram_data_bytes=4096,
                          state_bytes=104, state_sha256="x", build_seconds=1.0, qemu_version="7.2", created=0.0)  # fmt: skip
    (tmp / "manifest.json").write_text(json.dumps(dataclasses.asdict(m) | manifest))
    os.rename(tmp, store.path)


@pytest.mark.parametrize(
    "damage",
    ["none", "no manifest", "bad json", "other format", "other memory", "short ram", "short state", "missing state"],
)
def test_store_uses_only_a_whole_matching_template(cache_home: Path, damage: str) -> None:
    store = template.Store("k" * 20)
    memory = 1 << 20
    _fake_template(store, memory, **({"format": template.FORMAT + 1} if damage == "other format" else {}))
    if damage == "no manifest":
        (store.path / "manifest.json").unlink()
    elif damage == "bad json":
        (store.path / "manifest.json").write_text("{")
    elif damage == "short ram":
        os.truncate(store.path / "ram", memory - 4096)
    elif damage == "short state":
        os.truncate(store.path / "state", 50)
    elif damage == "missing state":
        (store.path / "state").unlink()
    loaded = store.load(2 * memory if damage == "other memory" else memory)
    if damage == "none":
        assert loaded is not None and loaded.manifest.memory_bytes == memory
    else:
        assert loaded is None
        # A broken template is taken away (a missing manifest is an unfinished one: left for its builder).
        assert store.path.exists() == (damage == "no manifest")


def test_one_builder_at_a_time(cache_home: Path) -> None:
    store = template.Store("b" * 20)
    first = template.Builder.try_start(store, 1 << 20, "7.2")
    assert first is not None
    try:
        assert template.Builder.try_start(store, 1 << 20, "7.2") is None
    finally:
        first.close()
    again = template.Builder.try_start(store, 1 << 20, "7.2")
    assert again is not None
    again.close()
    _fake_template(store, 1 << 20)
    assert template.Builder.try_start(store, 1 << 20, "7.2") is None  # one exists now


def test_restore_ram_is_sealed_and_shared_while_held(cache_home: Path) -> None:
    store = template.Store("s" * 20)
    memory = 1 << 20
    _fake_template(store, memory)
    found = store.load(memory)
    assert found is not None
    first = template.RestoreRam(found, store.root)
    try:
        assert not first.shared
        first.fill()
        assert os.pread(first.fd, 5, template.PAGE) == b"guest"
        assert fcntl.fcntl(first.fd, fcntl.F_GET_SEALS) & template.SEALS == template.SEALS
        with pytest.raises(PermissionError):
            os.pwrite(first.fd, b"evil", 0)
        second = template.RestoreRam(found, store.root)
        try:
            assert second.shared
            assert os.fstat(second.fd).st_ino == os.fstat(first.fd).st_ino
        finally:
            second.close()
    finally:
        first.close()
    third = template.RestoreRam(found, store.root)  # the holder is gone: a copy of its own
    try:
        assert not third.shared
    finally:
        third.close()


def test_a_dead_holder_is_dropped(cache_home: Path) -> None:
    store = template.Store("d" * 20)
    _fake_template(store, 1 << 20)
    holders = store.root / f"{store.key}.holders"
    holders.mkdir()
    (holders / "999999999").write_text("5 1 2")
    assert template.Holders(store.root, store.key).borrow() is None
    assert not (holders / "999999999").exists()


def test_prune_keeps_the_recent_and_the_one_in_use(cache_home: Path) -> None:
    stores = [template.Store(f"{i:020d}") for i in range(template.KEEP + 2)]
    for age, store in enumerate(stores):
        _fake_template(store, 1 << 20)
        os.utime(store.path / "manifest.json", (0, time.time() - 60 * age))  # stores[0] used last
    stale_build = stores[0].root / ".build-x-999999999"
    stale_build.mkdir()
    orphans = [stores[0].root / f"gone{suffix}" for suffix in template.SIDE_FILES]
    for orphan in orphans:
        orphan.mkdir() if orphan.suffix == ".holders" else orphan.touch()
        os.utime(orphan, (0, time.time() - 8 * 86400))
    young = stores[0].root / "building.lock"
    young.touch()
    in_use = stores[-1].key  # the oldest, but this run's own
    removed = {p.name for p in template.prune(in_use)}
    assert removed == {stores[-2].key, stale_build.name, *(o.name for o in orphans)}
    assert young.exists()
    assert all(s.path.exists() for s in stores[: template.KEEP] + [stores[-1]])


def test_warm_timings_have_a_restore_span() -> None:
    phases = {"launcher_start": 0.0, "qemu_exec": 0.2, "spec_read": 0.35, "root_mounted": 0.4, "command_exec": 0.5,
              "command_exit": 0.6, "poweroff": 0.62, "qemu_reaped": 0.65}  # fmt: skip
    spans = timings.spans(phases)
    assert spans["restore"] == pytest.approx(0.15)
    assert spans["mount"] == pytest.approx(0.05)
    assert "kernel" not in spans
    cold = dict(phases, kernel_entry=0.3, init_start=1.0, modules_loaded=1.2, spec_read=1.21, root_mounted=1.3)
    assert "restore" not in timings.spans(cold)
    assert timings.spans(cold)["mount"] == pytest.approx(0.1)
    assert json.loads(timings.to_json(phases, start="warm"))["start"] == "warm"
    assert "(warm start)" in timings.format_table(phases, "warm")


def test_rebase_keeps_stamps_from_before_a_pause() -> None:
    t = timings.Timeline()
    t.stamp_host("qemu_exec", 10.0)
    t.observe(1_000_000_000, 11.0)
    t.stamp_guest("init_start", 900_000_000)
    t.rebase()
    t.observe(1_500_000_000, 13.0)  # the guest's clock stood still for 1.5 s
    t.stamp_guest("root_mounted", 1_500_000_000)
    p = t.phases()
    assert p["init_start"] == pytest.approx(10.9)
    assert p["root_mounted"] == pytest.approx(13.0)


def test_spec_carries_entropy_and_time() -> None:
    spec = protocol.CommandSpec(argv=("true",), env=(), cwd="/", home="/", uid=0, gid=0, entropy=b"\x01\xff", realtime_ns=123)
    body = protocol.encode_spec(spec)
    assert b"r01ff\0" in body and b"t123\0" in body
    assert protocol.clock_message(5) == b"C 5\n"
