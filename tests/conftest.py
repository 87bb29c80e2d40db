"""Shared helpers: the real config, composed and shrunk; and the resexp command as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
MODELS = sorted(path.stem for path in (CONF / "model").glob("*.yaml"))
DATASETS = sorted(path.stem for path in (CONF / "data").glob("*.yaml"))
# Small and fast: a few iterations on random images, evaluated twice.
SHRINK = ["data=synthetic", "schedule.iterations=4", "schedule.milestones=[2,3]", "log_every=2", "eval_points=2"]


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def resexp(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m resexp ARGS` in `cwd`, with output captured (not a terminal: plain log lines)."""
    return subprocess.run(
        [sys.executable, "-m", "resexp", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def cifar_root() -> Path:
    """The folder holding cifar-10-batches-py/, from RESEXP_DATA (set by .ci/run)."""
    root = os.environ.get("RESEXP_DATA")
    if not root or not (Path(root) / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip("RESEXP_DATA does not point at a folder holding cifar-10-batches-py/")
    return Path(root)
