"""The CUDA-only paths, on a GPU (`pytest -m gpu`; skipped where CUDA is missing): the CUDA-graph step, the
shared-GPU launcher's streams, and the grouped step captured as a graph. What these paths compute is the
eager step's, which the CPU tests check (test_step.py, test_group.py); here the CUDA code must give the
same numbers. Float64 where two computations of one step are compared, as on the CPU."""

import json

import pytest
import torch
from helpers import (
    CLOSE,
    DENSE,
    GATED,
    RESNEXT,
    SHRINK,
    WIDE,
    alone,
    assert_same,
    batches,
    ddp_step,
    nets,
    process_group_of_one,
    resexp,
)

from resexp import checkpoint, jobs, runs
from resexp.group import make_group_step
from resexp.step import GraphedStep, make_step, set_lr

pytestmark = pytest.mark.gpu
SHAPE = (8, 3, 32, 32)
RATES = (0.1, 0.1, 0.01, 0.0, 0.05)  # a drop, a step that must not move, a rise: no capture again


RELATIVES = {"resnet": {}, "wide-preact": WIDE, "resnext": RESNEXT, "gated": GATED, "densenet": DENSE}


@pytest.mark.parametrize("net", RELATIVES.values(), ids=RELATIVES.keys())
def test_the_cuda_graph_step_equals_eager_steps_and_follows_the_rate_without_capturing_again(net):
    [(graphed_model, graphed_sgd)], [(eager_model, eager_sgd, eager)] = (
        nets(1, "cuda", **net),
        alone(nets(1, "cuda", **net), SHAPE),
    )
    graphed = make_step(graphed_model, graphed_sgd, SHAPE, precision="fp32", cuda_graph=True)
    assert isinstance(graphed, GraphedStep)
    graph = graphed.graph
    for iteration, lr in enumerate(RATES):
        set_lr(graphed_sgd, lr)
        set_lr(eager_sgd, lr)
        (x,), (y,) = batches(1, iteration, device="cuda")
        torch.testing.assert_close(graphed(x, y).clone(), eager(x, y), **CLOSE)
    assert graphed.graph is graph
    assert_same(graphed_model, eager_model, graphed_sgd, eager_sgd)


def test_the_bf16_cuda_graph_step_trains_as_the_eager_one():
    # The real runs' precision: bf16 autocast, whose weight cache must not outlive the capture.
    pairs = [(model.float(), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)) for model, _ in nets(2, "cuda")]
    pairs[1][0].load_state_dict(pairs[0][0].state_dict())
    graphed = make_step(*pairs[0], SHAPE, precision="bf16", cuda_graph=True)
    eager = make_step(*pairs[1], SHAPE, precision="bf16", cuda_graph=False)
    for iteration in range(4):
        (x,), (y,) = batches(1, iteration, device="cuda")
        x = x.float()
        # Both run the same kernels (cuDNN's choice for the shapes), bf16 rounding aside: 8 bits of mantissa
        torch.testing.assert_close(graphed(x, y).clone(), eager(x, y), rtol=2e-2, atol=2e-2)
    for name, tensor in pairs[0][0].state_dict().items():
        torch.testing.assert_close(tensor, pairs[1][0].state_dict()[name], rtol=2e-2, atol=2e-3, msg=name)


def test_dropout_draws_new_masks_at_each_replay_of_the_cuda_graph():
    [(model, sgd)] = nets(1, "cuda", **WIDE, dropout=0.3)
    graphed = make_step(model, sgd, SHAPE, precision="fp32", cuda_graph=True)
    set_lr(sgd, 0.0)  # the weights stay: only the masks can change the loss
    (x,), (y,) = batches(1, 0, device="cuda")
    losses = [graphed(x, y).clone()[0].item() for _ in range(3)]
    assert len(set(losses)) == 3, losses


def test_the_ddp_step_captures_nccls_allreduce_in_a_cuda_graph_or_says_why_not(monkeypatch, caplog):
    """The DDP step of a torchrun run on GPUs, on one GPU (a single rank's NCCL group): captured as a
    graph where torch can capture DDP's allreduce, else eager with a logged reason; the eager step's
    numbers either way."""
    [(model, sgd)], [(twin, twin_sgd, eager)] = nets(1, "cuda"), alone(nets(1, "cuda"), SHAPE)
    with process_group_of_one("nccl"):
        step = ddp_step(model, sgd, SHAPE, monkeypatch, precision="fp32", cuda_graph=True)
        assert isinstance(step, GraphedStep) or "could not be captured" in caplog.text
        for iteration, lr in enumerate(RATES):
            set_lr(sgd, lr)
            set_lr(twin_sgd, lr)
            (x,), (y,) = batches(1, iteration, device="cuda")
            torch.testing.assert_close(step(x, y).clone(), eager(x, y), **CLOSE)
    assert_same(model, twin, sgd, twin_sgd)


def test_a_group_captured_as_a_cuda_graph_trains_each_copy_as_its_run_alone():
    pairs = nets(3, "cuda", residual=[False, True, True])  # a plain twin beside two residual runs
    twins = alone(pairs, SHAPE)
    step = make_group_step([m for m, _ in pairs], [o for _, o in pairs], SHAPE, precision="fp32", cuda_graph=True)
    assert isinstance(step, GraphedStep)
    for iteration, lr in enumerate(RATES[:3]):
        xs, ys = batches(3, iteration, device="cuda")
        for k, ((_, optimizer), (_, twin_optimizer, _)) in enumerate(zip(pairs, twins)):
            set_lr(optimizer, lr * (k + 1))  # each run its own rate
            set_lr(twin_optimizer, lr * (k + 1))
        stats = step(torch.cat(xs, 1), torch.stack(ys)).clone()
        for k, ((_, _, twin_step), x, y) in enumerate(zip(twins, xs, ys)):
            torch.testing.assert_close(stats[k], twin_step(x, y), **CLOSE)
    for (model, optimizer), (twin, twin_optimizer, _) in zip(pairs, twins):
        assert_same(model, twin, optimizer, twin_optimizer)


@pytest.fixture
def no_tf32():
    """fp32 as fp32 (no TensorFloat-32 kernels), so that two runs of one computation agree to rounding."""
    matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv


@pytest.mark.parametrize("group_runs", ["false", "true"])
def test_a_shared_gpu_sweep_trains_its_runs_on_streams_of_their_own_as_they_train_one_by_one(
    tmp_path, monkeypatch, no_tf32, group_runs
):
    made, new_stream = [], jobs.new_stream

    def recorded(device: torch.device) -> torch.cuda.Stream:
        made.append(new_stream(device))
        return made[-1]

    monkeypatch.setattr(jobs, "new_stream", recorded)
    sweep = ["-m", *SHRINK, "model.depth=8,14", "seed=0,1", "device=cuda", "precision=fp32", "optim.lr=0.01"]
    shared = resexp("train", *sweep, f"hydra.launcher.group_runs={group_runs}", "hydra.sweep.dir=shared", cwd=tmp_path)
    assert shared.returncode == 0, shared.stderr
    assert len(made) == len(set(made)) == (2 if group_runs == "true" else 4)  # one per training: a group's, or a run's
    basic = resexp("train", *sweep, "hydra/launcher=basic", "hydra.sweep.dir=basic", cwd=tmp_path)
    assert basic.returncode == 0, basic.stderr
    for run in (tmp_path / "basic").glob("*seed=*"):
        other = tmp_path / "shared" / run.name
        a, b = (json.loads((path / runs.METRICS).read_text())["final"] for path in (other, run))
        for key in b:  # cuDNN may pick other kernels in another run: float32 rounding, as on the CPU
            if key.startswith("loss/"):
                assert a[key] == pytest.approx(b[key], rel=1e-4), key
            else:  # error %: at most one of 256 test images, or of 2 batches of 128, flips
                assert abs(a[key] - b[key]) <= 100 / 256 + 1e-9, key
        saved = [checkpoint.load(path / runs.CHECKPOINT)["model"] for path in (other, run)]
        for name, tensor in saved[1].items():
            torch.testing.assert_close(saved[0][name], tensor, rtol=1e-3, atol=1e-4, msg=name)


def test_two_deterministic_runs_of_one_seed_agree_bit_for_bit(tmp_path):
    saved = []
    for name in ("one", "two"):
        run_dir = tmp_path / name
        result = resexp("train", *SHRINK, "deterministic=true", "device=cuda", f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        saved.append(checkpoint.load(run_dir / runs.CHECKPOINT)["model"])
    assert all(torch.equal(saved[0][key], saved[1][key]) for key in saved[0])
