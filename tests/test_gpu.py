"""The CUDA-only paths, on a GPU (`pytest -m gpu`; skipped where CUDA is missing): the CUDA-graph step, the
shared-GPU launcher's streams, and the grouped step captured as a graph. What these paths compute is the
eager step's, which the CPU tests check (test_step.py, test_group.py); here the CUDA code must give the
same numbers. Float64 where two computations of one step are compared, as on the CPU."""

import json
import signal

import pytest
import torch
from helpers import (
    CLOSE,
    DENSE,
    GATED,
    RESNEXT,
    RUN,
    SHRINK,
    WIDE,
    alone,
    assert_same,
    assert_same_run,
    batches,
    ddp_step,
    nets,
    process_group_of_one,
    resexp,
    start,
    wait_for,
)
from test_decode import load

from resexp import checkpoint, jobs, runs
from resexp.evaluate import evaluate
from resexp.group import Lockstep, make_group_step
from resexp.probes import response_layers, step_gradient_norms
from resexp.step import EagerStep, GraphedStep, make_step, set_lr

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
        if torch.cuda.nccl.version() >= (2, 9, 6):  # NCCL that captures an allreduce: a graph, or a bug
            assert isinstance(step, GraphedStep), caplog.text
        else:
            assert "the CUDA graph of the DDP step could not be captured (" in caplog.text
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
    compared = sorted((tmp_path / "basic").glob("*_seed*"))
    assert len(compared) == 4
    for run in compared:
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


# --- Each CUDA-only path of issue 31, exercised where it runs


def test_every_graph_is_captured_on_a_stream_of_its_own():
    """Graphs sharing a capture stream share cuBLAS's stream-keyed workspace, and a shared-GPU batch replays
    them at once (pytorch/pytorch#193402)."""
    steps = [make_step(model, sgd, SHAPE, precision="fp32", cuda_graph=True) for model, sgd in nets(2, "cuda")]
    assert all(isinstance(step, GraphedStep) for step in steps)
    assert steps[0].capture_stream != steps[1].capture_stream


@pytest.mark.parametrize("where", ["alone", "group", "ddp"])
def test_gradient_norms_read_from_a_graphs_buffers_are_the_eager_steps(where, monkeypatch):
    """What grad_norms_every logs is read from the weights' .grad after a replay: the graph's own buffers,
    a group copy's views of the group's, or DDP's bucket views."""
    pairs, twins = nets(2, "cuda"), alone(nets(2, "cuda"), SHAPE)
    xs, ys = batches(2, 0, device="cuda")
    if where == "group":
        step = make_group_step([m for m, _ in pairs], [o for _, o in pairs], SHAPE, precision="fp32", cuda_graph=True)
        step(torch.cat(xs, 1), torch.stack(ys))
        runs_read = [0, 1]
    elif where == "ddp":
        with process_group_of_one("nccl"):
            step = ddp_step(*pairs[0], SHAPE, monkeypatch, precision="fp32", cuda_graph=True)
            step(xs[0], ys[0])
        runs_read = [0]
    else:
        step = make_step(*pairs[0], SHAPE, precision="fp32", cuda_graph=True)
        step(xs[0], ys[0])
        runs_read = [0]
    assert isinstance(step, GraphedStep)
    for k in runs_read:
        twins[k][2](xs[k], ys[k])
        read = step_gradient_norms(response_layers(pairs[k][0]))
        torch.testing.assert_close(read, step_gradient_norms(response_layers(twins[k][0])), rtol=1e-5, atol=1e-7)


def test_compile_inside_the_cuda_graph_trains_as_the_eager_step():
    [(model, sgd)], [(twin, twin_sgd, eager)] = nets(1, "cuda"), alone(nets(1, "cuda"), SHAPE)
    step = make_step(model, sgd, SHAPE, precision="fp32", cuda_graph=True, compile_model=True)
    assert isinstance(step, GraphedStep)
    for iteration in range(3):
        (x,), (y,) = batches(1, iteration, device="cuda")
        torch.testing.assert_close(
            step(x, y).clone(), eager(x, y), **CLOSE
        )  # fused kernels round otherwise, in float64
    assert_same(model, twin, sgd, twin_sgd)


def test_on_nonfinite_skip_on_cuda_trains_eagerly_and_skips_a_non_finite_step():
    [(model, sgd)] = nets(1, "cuda")
    step = make_step(model, sgd, SHAPE, precision="fp32", cuda_graph=True, skip_nonfinite=True)
    assert isinstance(step, EagerStep)  # it looks at each loss before updating: never a graph
    before = {name: tensor.clone() for name, tensor in model.state_dict().items() if "running" not in name}
    (x,), (y,) = batches(1, 0, device="cuda")
    stats = step(torch.full_like(x, float("nan")), y)
    assert not torch.isfinite(stats[0])
    assert all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in before.items())


def test_ten_crop_evaluation_on_cuda_is_the_cpus():
    """The ImageNet path's evaluation, (B, V, 3, H, W) batches of ten views, on the GPU."""
    [(model, _)] = nets(1, "cuda")
    generator = torch.Generator().manual_seed(0)
    views = [
        (torch.randn(4, 10, 3, 32, 32, generator=generator, dtype=torch.float64), torch.arange(4)) for _ in range(2)
    ]
    on_gpu = evaluate(model, views, torch.device("cuda"))
    on_cpu = evaluate(model.cpu(), views, torch.device("cpu"))
    assert on_gpu["views"] == 10
    for key in ("error", "error_top5", "loss"):
        assert on_gpu[key] == pytest.approx(on_cpu[key], rel=1e-9, abs=1e-9), key


def test_a_dropout_run_with_the_graph_stops_and_resumes_bit_identically(tmp_path):
    """Recapture on resume, the learning-rate tensors, undone warm-up and the CUDA generator put back before
    the first step: a stopped and resumed run with dropout is the run trained straight (deterministic)."""
    net = ["model.depth=8", "model.dropout=0.3", "device=cuda", "deterministic=true", "precision=fp32"]
    straight = tmp_path / "straight"
    assert resexp("train", *RUN, *net, f"hydra.run.dir={straight}", cwd=tmp_path).returncode == 0
    run_dir = tmp_path / "run"
    process = start(run_dir, *net)
    wait_for(run_dir / runs.CHECKPOINT, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    resumed = resexp("train", *RUN, *net, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    assert_same_run(run_dir, straight)


FAMILIES = {  # each family's net, small, through the CLI with the CUDA graph on
    "preact": ["model=resnet110-preact", "model.depth=20"],
    "wrn-dropout": ["model=wrn16-8", "model.widths=[16,32,64,128]", "model.dropout=0.3"],
    "resnext": ["model=resnext29-8x64d", "model.depth=11", "model.widths=[8,8,16,16]", "model.cardinality=4",
                "model.base_width=16"],
    "densenet": ["model=densenet-bc100-12", "model.depth=22", "model.growth_rate=4"],
    "gated": ["shortcut=gated", "model.depth=8"],
    "resnet110-warm-up": ["model=resnet110", "schedule.warmup_iterations=2"],  # the rate switches in the graph
}  # fmt: skip


@pytest.mark.parametrize("net", FAMILIES.values(), ids=FAMILIES.keys())
def test_each_family_trains_through_the_cli_with_its_step_captured(tmp_path, monkeypatch, net):
    built, make = [], jobs.make_step
    monkeypatch.setattr(jobs, "make_step", lambda *args, **kwargs: built.append(make(*args, **kwargs)) or built[-1])
    run_dir = tmp_path / "run"
    result = resexp(
        "train", *SHRINK, "schedule.batch_size=16", *net, "device=cuda", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert [type(step).__name__ for step in built] == ["GraphedStep"]
    metrics = json.loads((run_dir / runs.METRICS).read_text())
    assert all(value == value for value in metrics["final"].values())  # finite, not nan
    if "warm-up" in " ".join(net):
        assert "warm-up over at iteration 2" in result.stdout


def test_a_group_member_that_fails_leaves_its_group_training_beside_another(tmp_path, monkeypatch):
    """One run of a group fails before its first step: the others of its group train on, and so does a run
    beside the group on its own stream; the command names the failed run."""
    from resexp.errors import ResexpError

    loop = jobs.train_loop

    def failing(model, *args, **kwargs):
        if jobs.threading.current_thread().name.endswith("seed1"):
            raise ResexpError("this run fails on purpose")
        return loop(model, *args, **kwargs)

    monkeypatch.setattr(jobs, "train_loop", failing)
    sweep = tmp_path / "sweep"
    result = resexp(
        "train", "-m", *SHRINK, "model.depth=8,14", "seed=0,1", "device=cuda", "hydra.launcher.group_runs=true",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and "this run fails on purpose" in result.stderr
    finished = sorted(path.parent.name for path in sweep.glob(f"*/{runs.METRICS}"))
    assert finished == ["resnet14-A_seed0", "resnet8-A_seed0"]


def test_a_shared_gpu_sweep_of_more_runs_than_max_runs_trains_them_all(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *SHRINK, "model.depth=8", "seed=0,1,2", "device=cuda", "hydra.launcher.max_runs=2"]
    result = resexp("train", *args, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list(sweep.glob(f"*/{runs.METRICS}"))) == 3


def test_a_lockstep_on_cuda_runs_its_group_step_on_the_groups_stream():
    pairs = nets(2, "cuda")
    step = make_group_step([m for m, _ in pairs], [o for _, o in pairs], SHAPE, precision="fp32", cuda_graph=True)
    lockstep = Lockstep(step, [o for _, o in pairs], [])
    lockstep.stream = torch.cuda.Stream()
    seen = []
    replay = step.graph.replay
    step.graph.replay = lambda: seen.append(torch.cuda.current_stream()) or replay()
    xs, ys = batches(2, 0, device="cuda")
    lockstep.batches[0], lockstep.arrived = (xs[0], ys[0]), {0}  # run 0 waits at its step ...
    lockstep.leave(1)  # ... and run 1, leaving from this thread's default stream, runs the group step
    assert seen == [lockstep.stream]


def test_on_a_gpu_the_decoded_crops_are_the_cpu_paths_within_the_decoders_rounding(imagenet_odd):
    """nvJPEG's IDCT and upsampling and the CUDA resampler round otherwise than libjpeg-turbo and the CPU
    kernel: the same crops, pixels within a stated tolerance (mean absolute difference below 2 of 255; not
    yet measured on a GPU, the bound is a first guess to be confirmed by this test's first run)."""
    cpu = load(imagenet_odd, "cpu", lighting_std=0.0)
    gpu = load(imagenet_odd, "gpu", lighting_std=0.0, device=torch.device("cuda"))
    for _ in range(3):
        (x, y), (x2, y2) = next(cpu.train), next(gpu.train)
        difference = (x.double() - x2.cpu().double()).abs() * 255  # normalized pixels back to levels
        assert torch.equal(y, y2.cpu()) and difference.mean() < 2, difference.mean()
