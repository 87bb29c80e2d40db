"""The warm-ups: He et al. 2016's fixed 400 iterations at 0.01, and the 2015 paper's 0.01 until the training
error is below 80%, judged on a fixed window of iterations whatever log_every is."""

import pytest
import torch
from helpers import RUN, resexp, scalars

from resexp.train import WARMUP_WINDOW, Schedule, warmup_over


def schedule(**warmup) -> Schedule:
    return Schedule(iterations=1000, milestones=(), gamma=0.1, warmup_lr=0.01, warmup_until_error=80, **warmup)


def test_he_2016s_warm_up_lasts_its_iterations_whatever_the_error():
    window = torch.tensor([0.0, 128.0])  # no error at all
    assert not warmup_over(399, schedule(warmup_iterations=400), window)
    assert warmup_over(400, schedule(warmup_iterations=400), torch.tensor([128.0, 128.0]))


def test_the_2015_warm_up_is_judged_on_a_window_of_iterations_not_at_log_points():
    window = torch.tensor([10.0, 128.0])  # 8% error: a lucky start
    for iteration in range(1, WARMUP_WINDOW):
        assert not warmup_over(iteration, schedule(), window)  # not judged before the window is full
    assert window.tolist() == [10.0, 128.0]
    window.copy_(torch.tensor([85.0 * 128, 100.0 * 128]))  # 85% over the window: still warming up
    assert not warmup_over(WARMUP_WINDOW, schedule(), window)
    assert window.tolist() == [0.0, 0.0]  # the next window starts afresh
    window.copy_(torch.tensor([70.0 * 128, 100.0 * 128]))
    assert warmup_over(2 * WARMUP_WINDOW, schedule(), window)


def test_a_run_with_a_fixed_warm_up_trains_at_0_01_then_at_the_base_rate(tmp_path):
    args = [*RUN, "schedule.warmup_min_depth=1", "schedule.warmup_iterations=7", f"hydra.run.dir={tmp_path / 'run'}"]
    result = resexp("train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warm-up over at iteration 7" in result.stdout
    rates = dict(scalars(tmp_path / "run")["lr"])
    assert rates[5] == pytest.approx(0.01) and rates[10] == pytest.approx(0.1)  # TensorBoard's float32, every 5
