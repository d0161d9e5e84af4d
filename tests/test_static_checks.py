"""Static checks as tests: `ruff check .` and `mypy` (configured in pyproject.toml) must report nothing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_reports_nothing():
    r = run_tool("ruff", "check", ".")
    assert r.returncode == 0, f"ruff check . failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"


def test_mypy_reports_nothing():
    r = run_tool("mypy")
    assert r.returncode == 0, f"mypy failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
