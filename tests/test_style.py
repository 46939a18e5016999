"""The code passes the project's linter and formatter settings (pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def ruff(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ruff", *args]
    return subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_lint_passes():
    result = ruff("check", "service", "rules", "tests", "bench")
    assert result.returncode == 0, result.stdout[-4000:]


def test_ruff_format_is_applied():
    result = ruff("format", "--check", "service", "rules", "tests", "bench")
    assert result.returncode == 0, result.stdout[-4000:]
