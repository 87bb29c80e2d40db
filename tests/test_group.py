"""Runs of the same layers (seeds; plain nets beside their residual twins) trained as one grouped network
(resexp/group.py): each copy must train exactly as its run would alone, and a group sweep must stop,
resume and report as any sweep."""

import copy
import json
import signal
import threading

import pytest
import torch
from helpers import (
    CLOSE,
    DENSE,
    GATED,
    RESNEXT,
    RUN,
    RUN_ITERATIONS,
    SHRINK,
    WIDE,
    alone,
    assert_same,
    batches,
    nets,
    resexp,
    stop_midway,
)

from resexp import checkpoint, runs
from resexp.group import Lockstep, make_group_step
from resexp.step import set_lr


# ResNet-50 on 32-pixel images at batch 8 (its last BN over 1x1 maps) is so ill-conditioned that weights
# 1e-7 apart give gradients percents apart: it takes one step, as does the other ImageNet-stem net.
@pytest.mark.parametrize(
    "net, steps",
    [
        ({}, 3),
        ({"shortcut": "projection"}, 3),
        ({"residual": False}, 3),
        ({"residual": [False, True, False]}, 3),  # Fig. 6's twins: plain copies beside a residual one
        ({"residual": [True, False, True], "depth": 18, "stem": "imagenet"}, 1),  # Table 2's, as ResNet-50 below
        ({"depth": 50, "block": "bottleneck", "stem": "imagenet", "shortcut": "projection"}, 1),
        ({"residual": [False, True, False], "preactivation": True}, 3),  # He et al. 2016's units, masked
        ({"depth": 11, "block": "bottleneck", "shortcut": "projection", "preactivation": True}, 3),
        (WIDE, 3),  # Wide ResNet's
        (RESNEXT, 3),  # ResNeXt's grouped 3x3 convs: K copies of C groups are K * C groups
        (GATED, 3),  # Highway's gates: K copies' gate convs as one grouped 1x1 conv, each with its biases
        (DENSE, 3),  # DenseNet's concatenations: each copy's new maps beside its own input's
    ],
    ids=[
        "option-A",
        "option-B",
        "plain",
        "plain-beside-residual",
        "plain-beside-residual-imagenet",
        "bottleneck-imagenet-stem",
        "preact-plain-beside-residual",
        "preact-bottleneck-cifar",
        "wide-preact",
        "resnext",
        "gated",
        "densenet",
    ],
)
def test_each_copy_of_a_group_trains_as_its_run_alone(net, steps):
    pairs = nets(3, **net)
    twins = alone(pairs, (8, 3, 32, 32))
    step = make_group_step(
        [m for m, _ in pairs], [o for _, o in pairs], (8, 3, 32, 32), precision="fp32", cuda_graph=True
    )
    schedule = [(0.1, 0.1, 0.1), (0.1, 0.0, 0.01), (0.01, 0.05, 0.1)]  # each run its own rate
    for iteration, rates in enumerate(schedule[:steps]):
        xs, ys = batches(3, iteration)
        for (_, optimizer), (_, twin_optimizer, _), lr in zip(pairs, twins, rates):
            set_lr(optimizer, lr)
            set_lr(twin_optimizer, lr)
        stats = step(torch.cat(xs, 1), torch.stack(ys))
        for k, ((_, _, twin_step), x, y) in enumerate(zip(twins, xs, ys)):
            torch.testing.assert_close(stats[k], twin_step(x, y), **CLOSE)
    for (model, optimizer), (twin, twin_optimizer, _) in zip(pairs, twins):
        assert_same(model, twin, optimizer, twin_optimizer)


def test_a_run_that_leaves_the_group_is_left_as_it_was():
    # Run 1 stops after one step (its thread ends); run 0 trains on alone, and must not carry run 1 along.
    pairs, signals = nets(2), []
    twins = alone(pairs, (8, 3, 32, 32))
    lockstep = Lockstep(
        make_group_step(
            [m for m, _ in pairs], [o for _, o in pairs], (8, 3, 32, 32), precision="fp32", cuda_graph=False
        ),
        [o for _, o in pairs],
        signals,
    )
    xs, ys = zip(*(batches(2, seed) for seed in range(3)))

    def work(k: int, steps: int) -> None:
        try:
            for t in range(steps):
                lockstep.step(k, xs[t][k], ys[t][k])
                if k == 0 and t == 1:
                    signals.append(signal.SIGTERM)  # read at the next group step, by every run at once
        finally:
            lockstep.leave(k)

    threads = [threading.Thread(target=work, args=(k, steps)) for k, steps in ((0, 3), (1, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert lockstep.stops == [signal.SIGTERM]
    for k, steps in ((0, 3), (1, 1)):
        twin, twin_optimizer, twin_step = twins[k]
        for t in range(steps):
            twin_step(xs[t][k], ys[t][k])
        model, optimizer = pairs[k]
        for name, param in model.named_parameters():
            torch.testing.assert_close(param, dict(twin.named_parameters())[name], **CLOSE, msg=f"run {k}: {name}")


def test_skip_nonfinite_in_a_group_skips_only_the_run_whose_loss_is_not_finite():
    pairs = nets(2)
    before = [copy.deepcopy(model.state_dict()) for model, _ in pairs]
    step = make_group_step(
        [m for m, _ in pairs],
        [o for _, o in pairs],
        (8, 3, 32, 32),
        precision="fp32",
        cuda_graph=False,
        skip_nonfinite=True,
    )
    xs, ys = batches(2, 0)
    stats = step(torch.cat([xs[0] * float("nan"), xs[1]], 1), torch.stack(ys))
    assert not torch.isfinite(stats[0, 0]) and torch.isfinite(stats[1, 0])
    moved = [
        any(not torch.equal(p, before[k][name]) for name, p in model.named_parameters())
        for k, (model, _) in enumerate(pairs)
    ]
    assert moved == [False, True]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sweep, members, grouped_as",
    [
        (["seed=0,1"], ["resnet20-A_seed0", "resnet20-A_seed1"], "resnet20-A_seed0, resnet20-A_seed1"),
        (
            ["model=plain20,resnet20"],
            ["plain20", "resnet20-A"],
            "plain20, resnet20-A",
        ),  # Fig. 6's twins
        (
            ["model=plain20,resnet20", "shortcut=B"],
            ["plain20", "resnet20-B"],
            None,
        ),  # B's projections: not twins
        (
            ["seed=0,1", "model=wrn16-8", "model.widths=[16,32,64,128]", "model.dropout=0.3"],
            ["wrn16-2-B-preact-dropout0.3_seed0", "wrn16-2-B-preact-dropout0.3_seed1"],
            None,
        ),  # dropout: a group would draw other masks than its runs alone
    ],
    ids=["seeds", "plain-and-residual", "plain-and-option-B", "dropout-seeds"],
)
def test_a_sweep_with_group_runs_matches_the_same_sweep_without(tmp_path, sweep, members, grouped_as):
    sweeps = {}
    for grouped in ("true", "false"):
        sweeps[grouped] = tmp_path / grouped
        # lr 0.01: at 0.1 plain-20 amplifies float rounding (grouped convolutions sum in another order)
        # to 1e-3 in 4 steps; in float64 the two agree to 1e-15.
        result = resexp(
            "train",
            "-m",
            *SHRINK,
            "optim.lr=0.01",
            *sweep,
            f"hydra.launcher.group_runs={grouped}",
            f"hydra.sweep.dir={sweeps[grouped]}",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        assert ("train as one network" in result.stdout) == (grouped == "true" and grouped_as is not None)
        assert grouped_as is None or (f"{grouped_as} train as one network" in result.stdout) == (grouped == "true")
    for run in members:
        one, other = (sweeps[grouped] / run for grouped in ("true", "false"))
        a, b = (json.loads((path / "metrics.json").read_text()) for path in (one, other))
        assert (a["net"], a["seed"], a["iterations"]) == (b["net"], b["seed"], 4)
        # Grouped convolutions sum in another order: float32 rounding moves the losses by about 3e-7 in
        # 4 steps (measured on a 2-core machine of CI's kind), and might flip an image whose top two logits tie. A run fed
        # another run's batches or rate would be off by percents.
        for key, value in b["final"].items():
            if key.startswith("loss/"):
                assert a["final"][key] == pytest.approx(value, rel=1e-4), key
            else:  # error %, of 256 test images or of the last 2 batches of 128
                assert abs(a["final"][key] - value) <= 100 / 256 + 1e-9, key
        saved = [checkpoint.load(path / runs.CHECKPOINT)["model"] for path in (one, other)]
        assert saved[0].keys() == saved[1].keys()  # a plain run saves no gate of its group
        for name, tensor in saved[1].items():
            torch.testing.assert_close(saved[0][name], tensor, rtol=1e-3, atol=1e-4, msg=name)
            # its slice, not the group's
            assert saved[0][name].untyped_storage().nbytes() == tensor.untyped_storage().nbytes(), name


def test_max_runs_counts_a_group_as_one_training(tmp_path):
    # Two runs, one group: max_runs=1 must not split them into two batches of one run each.
    result = resexp(
        "train",
        "-m",
        *SHRINK,
        "seed=0,1",
        "hydra.launcher.max_runs=1",
        "hydra.launcher.group_runs=true",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "resnet20-A_seed0, resnet20-A_seed1 train as one network" in result.stdout
    assert len(list((tmp_path / "sweep").glob("*/metrics.json"))) == 2


@pytest.mark.slow
def test_a_stopped_group_checkpoints_its_runs_at_one_iteration_and_resumes_them_as_a_group(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *RUN, "seed=0,1", "hydra.launcher.group_runs=true", f"hydra.sweep.dir={sweep}"]
    stop_midway(args, sweep, 2)
    runs_dirs = sorted(p.parent for p in sweep.glob("*/checkpoint.pt"))
    stopped_at = {checkpoint.load(run / runs.CHECKPOINT)["progress"]["iteration"] for run in runs_dirs}
    assert len(runs_dirs) == 2 and len(stopped_at) == 1 and 0 < min(stopped_at) < RUN_ITERATIONS

    again = resexp("train", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("resuming") == 2 and "train as one network" in again.stdout
    assert [json.loads((run / "metrics.json").read_text())["iterations"] for run in runs_dirs] == [RUN_ITERATIONS] * 2


def test_a_group_step_runs_on_the_groups_stream_also_when_a_leaving_run_sets_it_off(monkeypatch):
    """A run that leaves its group does so after its training's stream context has ended: the group step
    it sets off must still run on the group's stream, where the other runs' reads are ordered."""
    from resexp import group

    entered = []

    class Recorder:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            entered.append(self.stream)

        def __exit__(self, *args):
            return False

    monkeypatch.setattr(group, "on_stream", Recorder)
    pairs = nets(2)
    step = make_group_step(
        [m for m, _ in pairs], [o for _, o in pairs], (8, 3, 32, 32), precision="fp32", cuda_graph=False
    )
    lockstep = Lockstep(step, [o for _, o in pairs], [])
    lockstep.stream = "the group's stream"  # what jobs.run_steps gives a group training beside others
    xs, ys = batches(2, 0)
    worker = threading.Thread(target=lockstep.step, args=(0, xs[0], ys[0]))
    worker.start()
    while not lockstep.arrived:
        threading.Event().wait(0.01)
    lockstep.leave(1)  # run 1 leaves, from outside any stream: run 0 waits, so this runs the group step
    worker.join(timeout=60)
    assert entered == ["the group's stream"] and lockstep.rounds == 1
