"""Fixtures: the local data copies (RESEXP_DATA, set by .ci/run), and the `gpu` marker's skip where CUDA is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def straight(tmp_path_factory) -> Path:
    """RUN trained without a stop, in a directory of its own: what every stopped, killed or disturbed
    run must end up as."""
    from helpers import RUN, resexp

    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = resexp("train", *RUN, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture
def cifar_root() -> Path:
    """The folder holding cifar-10-batches-py/, from RESEXP_DATA (set by .ci/run)."""
    root = os.environ.get("RESEXP_DATA")
    if not root or not (Path(root) / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip("RESEXP_DATA does not point at a folder holding cifar-10-batches-py/")
    return Path(root)


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """The sample's class folders, from RESEXP_DATA (set by .ci/run)."""
    folder = Path(os.environ.get("RESEXP_DATA", "/nonexistent")) / "imagenet-sample"
    if not (folder / "val").is_dir():
        pytest.skip("RESEXP_DATA does not hold imagenet-sample/")
    return folder
