"""The package, its tests and its benchmarks type-check under mypy --strict (the project's rule; pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def benchmark_scripts() -> list[str]:
    """benchmarks/ holds Python scripts without a suffix beside the .py ones."""
    out = []
    for p in sorted((REPO / "benchmarks").iterdir()):
        if p.is_file() and (p.suffix == ".py" or (not p.suffix and p.read_bytes()[:40].startswith(b"#!/usr/bin/env python3"))):
            out.append(str(p.relative_to(REPO)))
    return out


def mypy(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MYPYPATH=str(REPO / "tests"))
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=600, check=False)


def test_mypy_strict_is_clean_on_the_package_tests_and_tools() -> None:
    proc = mypy("sandbox", "tests", "tools")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_is_clean_on_the_benchmarks() -> None:
    # Apart: a script named like a library (benchmarks/libvirt) would stand for it in one run.
    for script in benchmark_scripts():
        proc = mypy("--scripts-are-modules", script)
        assert proc.returncode == 0, proc.stdout + proc.stderr
