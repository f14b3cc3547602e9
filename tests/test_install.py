"""Installing as a user would: the wheel `pip install .` builds holds the whole package, and runs from a fresh venv.

CI installs the checkout editable, which imports straight from the tree and
so never sees a package or data file the wheel leaves out.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, run_tracked
from sandbox import __version__

# What a build reads besides the package sources: none of it ships.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".mypy_cache", ".pytest_cache")


def package_dirs() -> dict[str, str]:
    """Package name -> its source directory, as pyproject.toml maps them."""
    with open(REPO / "pyproject.toml", "rb") as f:
        mapping: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return mapping


def source_files(directory: str) -> list[str]:
    """The files under `directory` (relative to it) that belong to the tree: tracked or not ignored."""
    proc = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard", "--", directory],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode == 0:
        files = proc.stdout.splitlines()
    else:  # not a git checkout (e.g. an unpacked sdist): what is there, without bytecode
        root = REPO / directory
        files = [str(p.relative_to(REPO)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return [str(Path(f).relative_to(directory)) for f in files if (REPO / f).is_file()]


def expected_in_wheel() -> set[str]:
    """Every file of every package directory, at the path it must have inside the wheel."""
    mapping = package_dirs()
    expected = set()
    for name, directory in mapping.items():
        # A directory mapped on its own (guest-init/ inside sandbox/, were it there) is counted once, as itself.
        nested = [d for d in mapping.values() if d != directory and Path(d).is_relative_to(directory)]
        for rel in source_files(directory):
            if not any((Path(directory) / rel).is_relative_to(d) for d in nested):
                expected.add(f"{name.replace('.', '/')}/{rel}")
    return expected


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports() -> set[str]:
    """Top-level names of the modules the package imports that are neither its own nor the standard library's."""
    found: set[str] = set()
    for path in (REPO / "sandbox").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"sandbox", "__future__"}


def test_every_module_the_package_imports_is_declared() -> None:
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    declared = {_normalized(re.split(r"[ \[<>=!~;]", r, maxsplit=1)[0]) for r in requirements}
    providers = importlib.metadata.packages_distributions()
    # A module not installed here is assumed to come from the distribution of its own name.
    undeclared = {
        module for module in third_party_imports()
        if not {_normalized(d) for d in providers.get(module, [module])} & declared
    }  # fmt: skip
    assert {"psutil", "Xlib"} <= third_party_imports()
    assert undeclared == set()


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A temporary directory outside the checkout, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-wheel-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(workdir: Path) -> Path:
    """The wheel `pip wheel .` builds, from a copy of the tree (the build writes build/ and *.egg-info into it)."""
    src = workdir / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCES, symlinks=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(workdir / "dist"), str(src)],
        cwd=workdir, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (found,) = (workdir / "dist").glob("sandbox-*.whl")
    return found


def test_the_wheel_holds_every_package_and_file_of_the_tree(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = expected_in_wheel()
    source_packages = {str(Path(f).parent) for f in expected if f.endswith("/__init__.py")}
    wheel_packages = {str(Path(f).parent) for f in names if f.endswith("/__init__.py")}
    # sandbox/libvirt was once missing: every `sandbox run` died importing it.
    assert {"sandbox/backends/libvirt", "sandbox/guest_init"} <= source_packages
    assert source_packages - wheel_packages == set()
    assert sorted(expected - names) == []


@pytest.mark.vm
def test_the_installed_wheel_runs_a_sandbox(wheel: Path, workdir: Path) -> None:
    venv = workdir / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # This pip installs into the new venv: the wheel and its dependencies, from PyPI.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", str(wheel)],
        cwd=workdir, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # As a user's shell would have it: no path into the checkout, a cwd outside it.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sandbox.image.guestinit as g; print(g._source_dir())"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    sandbox = str(venv / "bin" / "sandbox")
    ok = run_tracked([sandbox, "run", "--", "sh", "-c", "echo hi"], cwd=workdir, env=env)
    assert (ok.returncode, ok.stdout) == (0, b"hi\n"), ok.stderr
    failed = run_tracked([sandbox, "run", "--", "sh", "-c", "echo oops >&2; exit 7"], cwd=workdir, env=env)
    assert failed.returncode == 7, failed.stderr
    assert b"oops\n" in failed.stderr


def _login_path(key: str) -> str:
    """Debian's PATH for root (ENV_SUPATH) or a user (ENV_PATH), from /etc/login.defs."""
    for line in Path("/etc/login.defs").read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == key:
            return fields[1].removeprefix("PATH=")
    pytest.fail(f"no {key} in /etc/login.defs")


def test_setup_makes_sandbox_and_man_sandbox_ours(tmp_path: Path) -> None:
    # setup.sh's own line, staged under DESTDIR instead of writing /usr/local.
    lines = [line for line in (REPO / "setup.sh").read_text().splitlines() if "sandbox.cli.install" in line and not line.startswith("#")]
    assert len(lines) == 1, lines
    proc = subprocess.run(["sh", "-c", lines[0]], cwd=REPO, env=dict(os.environ, DESTDIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    local = tmp_path / "usr" / "local"
    assert (local / "bin" / "sandbox").resolve() == (REPO / ".venv" / "bin" / "sandbox").resolve()

    # policycoreutils (setup.sh installs it) has /usr/bin/sandbox and sandbox(8): ours come first.
    for key in ("ENV_SUPATH", "ENV_PATH"):
        path = _login_path(key)
        assert "/usr/local/bin" in path.split(":")
        found = subprocess.run(["sh", "-c", "command -v sandbox && sandbox --version"], env={"PATH": path.replace("/usr/local/bin", str(local / "bin"))},
                               capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert found.stdout == f"{local}/bin/sandbox\nsandbox {__version__}\n", (key, found.stderr)
    man = subprocess.run(["man", "-w", "sandbox"], env=dict(os.environ, MANPATH=f"{local}/share/man:/usr/share/man"),
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert man.stdout.strip() == f"{local}/share/man/man1/sandbox.1", man.stderr
    assert "/usr/local/share/man" in subprocess.run(["manpath"], capture_output=True, text=True, check=True).stdout.strip().split(":")

    # bash-completion (setup.sh installs it) loads ours on the first <Tab> after `sandbox`.
    loader = Path("/usr/share/bash-completion/bash_completion")
    assert loader.exists(), "bash-completion is not installed (./setup.sh installs it)"
    loaded = subprocess.run(["bash", "--norc", "--noprofile", "-c", f"source {loader}; __load_completion sandbox && complete -p sandbox"],
                            env=dict(os.environ, XDG_DATA_DIRS=f"{local}/share:/usr/share"),
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert loaded.stdout.strip() == "complete -F _sandbox sandbox", loaded.stderr

    # Again: it replaces its own link and files (setup.sh runs again on every update).
    again = subprocess.run(["sh", "-c", lines[0]], cwd=REPO, env=dict(os.environ, DESTDIR=str(tmp_path)),
                           capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert again.returncode == 0, again.stderr


def test_install_refuses_to_replace_a_file_it_did_not_put_there(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sandbox").write_text("#!/bin/sh\n")
    proc = subprocess.run([sys.executable, "-m", "sandbox.cli.install", "--prefix", str(tmp_path)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 125
    assert proc.stderr == f"sandbox: {tmp_path}/bin/sandbox exists and is not a link (another installation?): remove it, or choose another --prefix\n"
    assert (tmp_path / "bin" / "sandbox").read_text() == "#!/bin/sh\n"


def test_install_says_when_another_sandbox_comes_first_on_path(tmp_path: Path) -> None:
    # As with a PATH that has /usr/bin (SELinux's sandbox) before the prefix.
    other = tmp_path / "other" / "sandbox"
    other.parent.mkdir()
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    prefix = tmp_path / "prefix"
    env = dict(os.environ, PATH=f"{other.parent}:{prefix / 'bin'}")
    proc = subprocess.run([sys.executable, "-m", "sandbox.cli.install", "--prefix", str(prefix)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"note: `sandbox` on this PATH is {other}: put {prefix / 'bin'} first"
    assert (prefix / "bin" / "sandbox").resolve() == (Path(sys.executable).parent / "sandbox").resolve()
