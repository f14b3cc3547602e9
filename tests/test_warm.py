"""Warm start end to end: restored guests behave as booted ones, differ from each other, and never fail a run.

The module has a cache of its own (XDG_CACHE_HOME), so that breaking and
rebuilding templates here touches no other run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SANDBOX, popen, run_tracked

pytestmark = [pytest.mark.vm]


class Cache:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.env = dict(os.environ, XDG_CACHE_HOME=str(base))

    @property
    def templates(self) -> list[Path]:
        root = self.base / "sandbox" / "templates"
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(".holders")) if root.exists() else []

    def run(self, *args: str, opts: tuple[str, ...] = (), input: bytes | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess[bytes], dict[str, object]]:
        """A run with --timings=json; (the process, its timings) with the timings cut from stderr."""
        proc = run_tracked([*SANDBOX, "run", "--timings=json", *opts, "--", *args], input=input, env=self.env, timeout=timeout)
        err = proc.stderr.decode(errors="replace")
        at = err.rfind('{\n  "start"')
        timings = json.loads(err[at:]) if at >= 0 else {}
        proc.stderr = err[:at].encode() if at >= 0 else proc.stderr
        return proc, timings

    def template(self) -> Path:
        found = self.templates
        assert len(found) == 1, found
        return found[0]


@pytest.fixture(scope="module")
def cache() -> Iterator[Cache]:
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"sandbox-warm-tests-{os.getpid()}"
    base.mkdir()
    c = Cache(base)
    try:
        proc, t = c.run("true")  # builds the init, initramfs, kernel copy and the template
        assert proc.returncode == 0, proc.stderr
        assert t["start"] == "cold, building the template"
        yield c
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _other_lines(stderr: bytes) -> str:
    return "\n".join(ln for ln in stderr.decode().splitlines() if "KVM unavailable" not in ln)


CASES = {
    "streams": (["sh", "-c", r"printf 'out\000\377'; printf 'err\n' >&2; exit 3"], None),
    "stdin bytes": (["sh", "-c", "cat; echo; echo $((1+1))"], bytes(range(256)) * 64),
    "signal": (["sh", "-c", "kill -TERM $$"], None),
    "not found": (["no-such-command-here"], None),
    "environment": (["sh", "-c", "pwd; echo $SANDBOX_TEST_VAR; id -u; umask"], None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_warm_and_cold_runs_agree(cache: Cache, case: str) -> None:
    argv, data = CASES[case]
    cache.env["SANDBOX_TEST_VAR"] = "x y\tz"
    warm, tw = cache.run(*argv, input=data)
    cold, tc = cache.run(*argv, opts=("--cold",), input=data)
    assert (tw["start"], tc["start"]) == ("warm", "cold")
    assert (warm.returncode, warm.stdout, _other_lines(warm.stderr)) == (cold.returncode, cold.stdout, _other_lines(cold.stderr))
    expected_status = {"streams": 3, "stdin bytes": 0, "signal": 143, "not found": 127, "environment": 0}[case]
    assert warm.returncode == expected_status, warm.stderr
    if case == "stdin bytes":
        assert warm.stdout == bytes(range(256)) * 64 + b"\n2\n"


def test_timeout_and_boot_phases_when_warm(cache: Cache) -> None:
    start = time.monotonic()
    proc, _ = cache.run("sleep", "30", opts=("--timeout", "3"))
    assert proc.returncode == 124 and time.monotonic() - start < 10
    proc, t = cache.run("true")
    assert t["start"] == "warm"
    spans = t["spans_ms"]
    assert isinstance(spans, dict)
    assert "restore" in spans and "kernel" not in spans and "modules" not in spans


UNIQUE = "head -c 16 /dev/urandom | od -An -tx1; cat /proc/sys/kernel/random/uuid /proc/sys/kernel/random/boot_id; grep stack /proc/self/maps"


def test_clones_of_one_template_differ(cache: Cache) -> None:
    procs = [popen([*SANDBOX, "run", "--timings=json", "--", "sh", "-c", UNIQUE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cache.env) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert b'"start": "warm"' in err
        outs.append(out.decode().splitlines())
    a, b = outs
    assert len(a) == len(b) == 4, outs
    for i, what in enumerate(("random bytes", "uuid", "boot_id", "stack address of the same program")):
        assert a[i] != b[i], (what, a[i])
    assert re.fullmatch(r"[0-9a-f]+-[0-9a-f]+ rw-p .*\[stack\]", a[3]), a[3]


def test_guest_clock_is_the_hosts(cache: Cache) -> None:
    proc = popen([*SANDBOX, "run", "--", "date", "+%s.%N"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cache.env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    arrived = time.time()
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    guest = float(line)
    # The guest prints before the host reads it: the guest's clock is at
    # most a little behind the host's arrival time, never ahead of it.
    assert arrived - 1.0 < guest <= arrived + 0.05, (guest, arrived)


def test_guest_writing_all_its_ram_leaves_the_template_alone(cache: Cache) -> None:
    ram = cache.template() / "ram"
    before = hashlib.sha256(ram.read_bytes()).hexdigest()
    fill = "b = bytearray(b'\\xa5') * (400 << 20); print(sum(b[::1 << 20]))"
    proc, t = cache.run("/usr/bin/python3", "-c", fill, opts=("--memory", "512M"), timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert t["start"] == "warm"
    assert int(proc.stdout) == 0xA5 * 400
    assert hashlib.sha256(ram.read_bytes()).hexdigest() == before


def _corrupt(template: Path, how: str) -> None:
    if how == "truncated RAM":
        os.truncate(template / "ram", 1 << 20)
    elif how == "garbage in RAM":
        with (template / "ram").open("r+b") as f:
            for offset in range(0, 64 << 20, 1 << 20):
                f.seek(offset)
                f.write(os.urandom(1 << 20))
    elif how == "garbage device state":
        size = (template / "state").stat().st_size
        (template / "state").write_bytes(os.urandom(size))
    elif how == "another version":
        manifest = json.loads((template / "manifest.json").read_text())
        manifest["format"] += 1
        (template / "manifest.json").write_text(json.dumps(manifest))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated RAM", "garbage in RAM", "garbage device state", "another version"])
def test_a_broken_template_means_a_cold_run_and_a_new_template(cache: Cache, how: str) -> None:
    old = cache.template()
    old_created = json.loads((old / "manifest.json").read_text())["created"]
    _corrupt(old, how)
    proc, t = cache.run("sh", "-c", "echo still works; exit 7", input=b"")
    assert proc.returncode == 7 and proc.stdout == b"still works\n", proc.stderr
    assert t["start"] == "cold, building the template"
    new = cache.template()
    assert json.loads((new / "manifest.json").read_text())["created"] != old_created
    proc, t = cache.run("true")
    assert proc.returncode == 0 and t["start"] == "warm"


def test_two_first_runs_build_one_template(cache: Cache) -> None:
    for found in cache.templates:
        shutil.rmtree(found)
    procs = [popen([*SANDBOX, "run", "--timings=json", "--", "echo", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cache.env) for i in range(2)]
    starts = []
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0 and out == f"{i}\n".encode(), err
        starts.append(json.loads(err[err.rfind(b'{\n  "start"') :])["start"])
    assert sorted(starts) == ["cold", "cold, building the template"]
    assert len(cache.templates) == 1
    proc, t = cache.run("true")
    assert proc.returncode == 0 and t["start"] == "warm"


def test_a_host_memory_limit_met_while_warm_is_named_and_keeps_the_template(cache: Cache) -> None:
    template = cache.template()
    proc, _ = cache.run("/usr/bin/python3", "-c", "b = bytearray(b'x') * (200 << 20)", opts=("--memory-limit", "64M"))
    assert proc.returncode == 125
    assert "out-of-memory killer: --memory-limit 64M is too small" in proc.stderr.decode(), proc.stderr
    assert cache.template() == template  # the limit was the user's; the template is fine
    proc, t = cache.run("true")
    assert proc.returncode == 0 and t["start"] == "warm"


def _drop_templates_but(cache: Cache, keep: Path) -> None:
    """Later tests expect the module's one template: remove what a test built for other options."""
    for found in cache.templates:
        if found != keep:
            shutil.rmtree(found)


@pytest.mark.parametrize("memory", ["768M", "2G"])
def test_every_memory_size_runs_built_warm_and_cold(cache: Cache, memory: str) -> None:
    keep = cache.template()
    try:
        starts = []
        for opts in ((), (), ("--cold",)):
            proc, t = cache.run("sh", "-c", "echo ran; exit 4", opts=("--memory", memory, *opts), timeout=240)
            assert (proc.returncode, proc.stdout) == (4, b"ran\n"), proc.stderr
            assert _other_lines(proc.stderr) == "", proc.stderr
            starts.append(t["start"])
        assert starts == ["cold, building the template", "warm", "cold"]
    finally:
        _drop_templates_but(cache, keep)


def test_a_template_building_run_gives_its_zeroed_memory_back(cache: Cache) -> None:
    keep = cache.template()
    name = f"zeroed-{os.getpid()}"
    try:
        proc = run_tracked([*SANDBOX, "run", "--name", name, "-d", "--memory", "1G", "--", "sh", "-c", "echo up; sleep 60"], env=cache.env)
        assert proc.returncode == 0, proc.stderr
        deadline = time.monotonic() + 120
        log = b""
        while b"up" not in log and time.monotonic() < deadline:
            log = run_tracked([*SANDBOX, "logs", name], env=cache.env).stdout
            time.sleep(0.5)
        info = json.loads(run_tracked([*SANDBOX, "info", name, "--json"], env=cache.env).stdout)
        assert info["start"] == "cold, building the template"
        # The guest zeroed ~1 GiB before the template was taken; QEMU keeps
        # only what the guest really holds (about 100 MiB), not all of it.
        assert info["rss_mib"] < 300, info
    finally:
        run_tracked([*SANDBOX, "rm", "-f", name], env=cache.env)
        _drop_templates_but(cache, keep)


def test_a_failing_template_build_is_a_cold_run_and_is_not_retried(cache: Cache) -> None:
    keep = cache.template()
    # The zeroing before the template meets the OOM killer, and this makes it a panic.
    opts = ("--memory", "256M", "--kernel-append", "sysctl.vm.panic_on_oom=2 sysctl.vm.min_free_kbytes=131072")
    try:
        proc, t = cache.run("sh", "-c", "cat; exit 3", opts=opts, input=b"input kept")
        assert (proc.returncode, proc.stdout) == (3, b"input kept"), proc.stderr
        assert t["start"] == "cold"
        assert "the guest building the warm-start template failed before the command started (guest kernel panic" in proc.stderr.decode()
        proc, t = cache.run("true", opts=opts)
        assert (proc.returncode, t["start"], _other_lines(proc.stderr)) == (0, "cold", "")
        root = cache.base / "sandbox" / "templates"
        failed = [p.name.removesuffix(".failed") for p in root.glob("*.failed")]
        assert len(failed) == 1 and not (root / failed[0]).exists()
        assert not (root / f"{failed[0]}.lock").exists()  # no lock left for a template that never was
    finally:
        _drop_templates_but(cache, keep)
