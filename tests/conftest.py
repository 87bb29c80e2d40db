"""Fixtures: the local data copies (RESEXP_DATA, set by .ci/run); the `gpu` marker's skip where CUDA is missing;
under pytest-xdist (`pytest -n auto`, the README's command), each worker's share of the cores, and the `slow`
tests handed out first."""

from __future__ import annotations

import os
from pathlib import Path

# Each of N xdist workers gets 1/N of the cores: torch's threads default to all of them, and N processes each
# spinning threads on every core train slower than one does. Set before torch starts its thread pool, and
# inherited by the processes the tests start (resexp train, torchrun's workers).
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // int(workers)))

import pytest  # noqa: E402
import torch  # noqa: E402

if workers:  # where a plugin imported torch before this file: its pool is sized here instead
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The longest first: xdist hands tests out in this order, so the workers end together rather than one
    # of them starting a minute of training while the other has nothing left (a stable sort keeps the rest).
    items.sort(key=lambda item: "slow" not in item.keywords)
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


@pytest.fixture
def imagenet_odd(tmp_path, imagenet_sample) -> Path:
    """An ImageNet root: train/ and val/ both the sample, and in one class of each the files nvJPEG does not
    take (greyscale, CMYK, progressive, a PNG named .JPEG: data.decode=gpu decodes them in its workers)."""
    import shutil

    from PIL import Image

    base = tmp_path / "imagenet"
    shutil.copytree(imagenet_sample / "val", base / "train")
    shutil.copytree(imagenet_sample / "val", base / "val")
    for split in ("train", "val"):
        folder = sorted((base / split).iterdir())[0]
        photo = Image.open(next(folder.iterdir())).convert("RGB")
        photo.convert("L").save(folder / "grey.JPEG")
        photo.convert("CMYK").save(folder / "cmyk.JPEG")
        photo.save(folder / "progressive.JPEG", progressive=True)
        photo.save(folder / "png.JPEG", format="PNG")  # ImageNet's training set holds one such file
    return base
