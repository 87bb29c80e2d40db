"""ResNet-20 on the real CIFAR-10 for a few hundred iterations on the CPU, as a user would run it."""

import json

import pytest
from helpers import resexp


@pytest.mark.slow
def test_resnet20_learns_cifar10(tmp_path, cifar_root):
    run_dir = tmp_path / "run"
    result = resexp(
        "train",
        f"data.root={cifar_root}",
        "schedule.iterations=200",
        "schedule.milestones=[100,150]",  # the paper's drops at 50% and 75% of the run
        "eval_points=1",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # Chance is 90% error; 200 steps of the paper's recipe (scaled) reached 56.6% test error and 61.0%
    # training error on a 2-core machine of CI's kind when this test was written (300 steps: 52.0%).
    assert metrics["final"]["error/test"] < 70
    assert metrics["final"]["error/train"] < 75
    print(
        f"ResNet-20, 200 iterations on CPU: test error {metrics['final']['error/test']:.2f}%, {metrics['images_per_s'] / 128:.2f} it/s"
    )
