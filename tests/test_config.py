"""User defaults: every run option's default from ~/.config/sandbox/config.toml or the environment, read by the flag's own parser."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import SANDBOX, run_sandbox
from sandbox.cli import main as cli, config, options
from sandbox.core.errors import UsageError

PATH = "/home/u/.config/sandbox/config.toml"


@pytest.fixture(autouse=True)
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("SANDBOX_ACCEL", raising=False)
    monkeypatch.delenv("SANDBOX_CONNECT", raising=False)
    config.forget()


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config" / "sandbox" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    config.forget()  # read once per process
    return path


def by_key(settings: tuple[config.Setting, ...]) -> dict[str, config.Setting]:
    return {s.key: s for s in settings}


def test_flag_then_environment_then_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.accel(None) == "auto"
    write_config(tmp_path, 'accel = "tcg"\n')
    assert config.accel(None) == "tcg"
    monkeypatch.setenv("SANDBOX_ACCEL", "auto")
    config.forget()
    assert config.accel(None) == "auto"
    assert config.accel("kvm") == "kvm"


def test_settings_are_read_by_the_flags_own_parser() -> None:
    file = {"memory": "1G", "cpus": 1, "net": "user", "timeout": 30, "cold": True, "pvh": False, "hide": [".a", ".b"],
            "tmpfs": ["/scratch:64M"], "home": "/tmp", "kernel": "/boot/vmlinuz", "memory-limit": "2G"}  # fmt: skip
    s = by_key(config.resolve(file, PATH, {}))
    assert s["memory"].value == 1024 and s["memory"].written == "1G" and s["memory"].source == PATH
    assert (s["cpus"].value, s["net"].value, s["timeout"].value) == (1, "user", 30.0)
    assert s["cold"].value is True and s["pvh"].value is False and s["hide"].value == [".a", ".b"]
    assert s["tmpfs"].value == [("/scratch", "64M")] and s["home"].value == Path("/tmp").resolve()
    assert s["kernel"].value == Path("/boot/vmlinuz") and s["memory-limit"].value == 2048
    assert s["machine"].source == config.DEFAULT and s["machine"].value == "auto"
    # Every option of the tables has a setting; --name and -d are not among them.
    assert set(s) == {o.key for o in options.SETTABLE} and not {"name", "detach", "rm", "no-confine"} & set(s)


def test_the_environment_comes_before_the_file() -> None:
    s = by_key(config.resolve({"accel": "kvm", "connect": "qemu:///system"}, PATH, {"SANDBOX_ACCEL": "tcg"}))
    assert (s["accel"].value, s["accel"].source) == ("tcg", "SANDBOX_ACCEL")
    assert (s["connect"].value, s["connect"].source) == ("qemu:///system", PATH)


@pytest.mark.parametrize(
    "file, message",
    [
        ({"memory": "50M"}, f'{PATH}: memory = "50M": \'50M\' is too small: the guest kernel needs 96M at least'),
        ({"memory": "lots"}, f"{PATH}: memory = \"lots\": bad size 'lots' (e.g. 512M, 2G)"),
        ({"cpus": 0}, f"{PATH}: cpus = 0: bad CPU count '0'"),
        ({"net": ["user"]}, f'{PATH}: net = ["user"]: expected a string or a number'),
        ({"timeout": -1}, f"{PATH}: timeout = -1: must be a finite positive number: '-1'"),
        ({"cold": "yes"}, f'{PATH}: cold = "yes": expected true or false'),
        ({"hide": ".a"}, f'{PATH}: hide = ".a": expected a list of strings, e.g. ["a", "b"]'),
        ({"machine": "pc"}, f"{PATH}: machine = \"pc\": invalid choice: 'pc' (choose from 'auto', 'microvm', 'q35')"),
        ({"tb-size": 1.5}, f"{PATH}: tb-size = 1.5: invalid int value: '1.5'"),
        ({"home": "/nonexistent/dir"}, f'{PATH}: home = "/nonexistent/dir": /nonexistent/dir: not a directory'),
        ({"share": ["/nonexistent/x"]}, f'{PATH}: share = ["/nonexistent/x"]: --share /nonexistent/x: /nonexistent/x is not a directory'),
        ({"image-tree": ["tree"]}, f'{PATH}: image-tree = ["tree"]: \'tree\': a path in a setting must be absolute (or start with ~)'),
        ({"home": "work/home"}, f'{PATH}: home = "work/home": \'work/home\': a path in a setting must be absolute (or start with ~)'),
        ({"colour": "red"}, f"{PATH}: unknown setting 'colour' (sandbox config lists them)"),
        ({"run": {"memory": "1G"}}, f"{PATH}: unknown setting 'run' (sandbox config lists them)"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_file_and_key(file: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError) as exc:
        config.resolve(file, PATH, {})
    assert str(exc.value) == message


def test_flags_override_the_file_and_lists_add_to_it(tmp_path: Path) -> None:
    write_config(tmp_path, 'memory = "1G"\ncold = true\nnet = "user"\nhide = [".a"]\ntimeout = 30\n')

    def parse(*argv: str) -> argparse.Namespace:
        return cli.build_parser("run", config.defaults()).parse_args(["run", *argv, "--", "true"])

    args = parse()
    assert (args.memory, args.cold, args.net, args.hide, args.timeout) == (1024, True, "user", [".a"], 30.0)
    args = parse("--memory", "256M", "--no-cold", "--net", "none", "--hide", ".b", "--timeout", "5")
    assert (args.memory, args.cold, args.net, args.hide, args.timeout) == (256, False, "none", [".a", ".b"], 5.0)
    vm = options.values(args, options.VM)
    assert vm["warm"] is True and vm["memory_mb"] == 256
    # Verbs without these options do not read the file.
    assert not hasattr(cli.build_parser("list", config.defaults()).parse_args(["list"]), "memory")


def test_sandbox_config_says_where_each_setting_comes_from(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'memory = "1G"\ncold = true\n')
    env = dict(os.environ, SANDBOX_ACCEL="tcg")
    out = subprocess.run([*SANDBOX, "config", "--json"], capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    d = json.loads(out)
    rows = {r["key"]: r for r in d["settings"]}
    assert d["file"] == str(path) and d["exists"] is True
    assert rows["memory"] == {"key": "memory", "value": "1G", "source": str(path)}
    assert rows["cold"]["value"] is True and rows["accel"] == {"key": "accel", "value": "tcg", "source": "SANDBOX_ACCEL"}
    assert rows["cpus"] == {"key": "cpus", "value": 1, "source": "default"}
    table = subprocess.run([*SANDBOX, "config"], capture_output=True, text=True, env=env, timeout=60, check=True).stdout.splitlines()
    assert table[0] == f"config file: {path}"
    assert table[1].split() == ["KEY", "VALUE", "SOURCE"]
    assert ["memory", '"1G"', str(path)] in [line.split() for line in table]
    write_config(tmp_path, "memory = 2\n")
    bad = subprocess.run([*SANDBOX, "run", "--", "true"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 125
    assert bad.stderr == f"sandbox: {path}: memory = 2: '2' is too small: the guest kernel needs 96M at least\n"


@pytest.mark.vm
def test_a_run_takes_its_defaults_from_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'memory = "256M"\ncold = true\n')
    env = dict(os.environ, XDG_CONFIG_HOME=str(path.parent.parent))
    proc = run_sandbox("sh", "-c", "grep MemTotal /proc/meminfo", run_opts=("--timings=json",), env=env)
    assert proc.returncode == 0, proc.stderr
    total_kb = int(proc.stdout.split()[1])
    assert 200_000 < total_kb < 262_144  # 256 MiB, less the kernel's own
    err = proc.stderr.decode()
    assert json.loads(err[err.index("{") :])["start"] == "cold"
