"""The code keeps one format and passes the linter (pyproject.toml [tool.ruff]): `ruff format .` and
`ruff check --fix .` mend what these find."""

import subprocess
import sys

import pytest
from helpers import REPO


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff_passes(command):
    result = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
