"""One run over several processes: torchrun's two processes on the CPU (gloo), as DDP runs them on GPUs;
SLURM's variables as submitit's tasks see them; and Hydra's other launchers and sweepers."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    CLOSE,
    alone,
    assert_one_line_error,
    assert_same,
    assert_same_run,
    batches,
    ddp_step,
    nets,
    process_group_of_one,
    resexp,
    wait_for,
)

from resexp import checkpoint, config, distributed, launch, runs
from resexp.data import Shard, synthetic
from resexp.data.imagenet_folders import EpochOrder
from resexp.errors import Interrupted
from resexp.models import NetSpec
from resexp.train import ECHO_S, stop_requests

WORKER = Path(__file__).with_name("ddp_worker.py")
# Small and slow enough to be stopped midway; a global batch of 16: 8 images per process.
TINY = [
    "data=synthetic",
    "schedule.batch_size=16",
    "schedule.iterations=12",
    "schedule.milestones=[6,9]",
    "optim.lr=0.01",
    "log_every=2",
    "eval_points=2",
    "checkpoint_every=5",
]


def command(processes: int, *args: str) -> list[str]:
    """`resexp train ARGS` through the test worker (ddp_worker.py): under torchrun, or alone."""
    if processes == 1:
        return [sys.executable, str(WORKER), "train", *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
    return [*torchrun, "--standalone", str(WORKER), "train", *args]  # a free port: tests run side by side (-n)


def train(processes: int, run_dir: Path, *extra: str, **instruments: str) -> subprocess.CompletedProcess:
    """Train TINY into `run_dir` with the worker's instruments (RESEXP_TEST_...: FLOAT64, WEIGHTS, ...)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **{f"RESEXP_TEST_{k.upper()}": v for k, v in instruments.items()}}
    args = command(processes, *TINY, *extra, f"hydra.run.dir={run_dir}")
    return subprocess.run(args, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300)


def weights(folder: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"rank{rank}.pt", weights_only=True)


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    """TINY trained by two processes without a stop; each rank's final weights in <dir>/weights/."""
    base = tmp_path_factory.mktemp("two")
    (base / "weights").mkdir()
    result = train(2, base / "run", weights=str(base / "weights"))
    assert result.returncode == 0, result.stderr
    return base


@pytest.mark.slow
def test_two_processes_train_one_run_that_rank_0_writes(two):
    run_dir = two / "run"
    assert sorted(path.name for path in run_dir.iterdir()) == sorted(
        [runs.HYDRA, runs.LOG, runs.CHECKPOINT, runs.METRICS, *(p.name for p in run_dir.glob("events.out.tfevents.*"))]
    )
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1, "one TensorBoard file: rank 0's"
    assert len(list(run_dir.parent.iterdir())) == 2, "no other directory beside the run's and the weights'"
    log = (run_dir / runs.LOG).read_text()
    assert log.count("done: ") == 1 and "rank 1" not in log  # one process logged the run
    assert "on 2 processes (cpu, torchrun)" in log
    metrics = json.loads((run_dir / runs.METRICS).read_text())
    assert (metrics["processes"], metrics["batch_size"]) == (2, 16)
    rank0, rank1 = weights(two / "weights", 0), weights(two / "weights", 1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the ranks ended with different weights"
    saved = checkpoint.load(run_dir / runs.CHECKPOINT)["model"]
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)


@pytest.mark.slow
def test_sync_bn_is_one_process_with_the_global_batch(tmp_path):
    """BN over the global batch makes two processes of 8 images one process of 16, to rounding: the
    float64 computations agree closely, and the float32 one of two processes is no further from the
    float64 reference than the single process's own float32 computation is (a margin of 4)."""
    short = ["schedule.iterations=4", "schedule.milestones=[3]", "eval_points=1"]
    found = {}
    for processes, precision in [(1, "float32"), (1, "float64"), (2, "float32"), (2, "float64")]:
        folder = tmp_path / f"{processes}-{precision}"
        folder.mkdir()
        extra = {"float64": "1"} if precision == "float64" else {}
        sync = ["sync_bn=true"] if processes > 1 else []  # alone, BN is over the global batch already
        result = train(processes, folder / "run", *short, *sync, weights=str(folder), **extra)
        assert result.returncode == 0, result.stderr
        found[processes, precision] = weights(folder)
    reference = found[1, "float64"]
    assert largest_difference(found[2, "float64"], reference) < 1e-9
    own = largest_difference(found[1, "float32"], reference)  # float32's rounding over these steps
    assert 0 < own < 1e-2
    assert largest_difference(found[2, "float32"], reference) <= 4 * own


@pytest.mark.slow
def test_a_sigterm_stops_both_processes_at_one_step_and_the_run_resumes_exactly(two, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESEXP_TEST_STEP_SECONDS": "0.3"}
    process = subprocess.Popen(
        command(2, *TINY, f"hydra.run.dir={run_dir}"), cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    wait_for(run_dir / runs.CHECKPOINT, process)  # iteration 5 of 12
    process.send_signal(signal.SIGTERM)  # torchrun hands it to both processes
    _, err = process.communicate(timeout=120)
    stopped = [line for line in err.splitlines() if "stopped by SIGTERM at iteration" in line]
    assert len(stopped) == 2 and len({line.split("iteration ")[1].split(",")[0] for line in stopped}) == 1, err
    assert "resume: torchrun --nproc-per-node=2 -m resexp train" in stopped[0]
    iteration = checkpoint.load(run_dir / runs.CHECKPOINT)["progress"]["iteration"]
    assert 5 < iteration < 12
    result = train(2, run_dir)
    assert result.returncode == 0, result.stderr
    assert_same_run(run_dir, two / "run")


def test_a_signal_that_arrives_twice_at_once_is_one_stop_request_and_a_later_one_stops_at_once(monkeypatch):
    """A terminal's Ctrl-C reaches torchrun's processes directly and again through torchrun."""
    clock = [100.0]
    monkeypatch.setattr("resexp.train.time", SimpleNamespace(monotonic=lambda: clock[0]))
    with stop_requests() as stops:
        signal.raise_signal(signal.SIGINT)
        clock[0] += ECHO_S / 2
        signal.raise_signal(signal.SIGINT)  # the echo: noted once, and the run goes on to its checkpoint
        assert stops == [signal.SIGINT]
        clock[0] += ECHO_S
        with pytest.raises(Interrupted):  # a second Ctrl-C by the user: at once
            signal.raise_signal(signal.SIGINT)


def test_resuming_with_another_number_of_processes_is_refused_in_one_line(two, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / runs.CHECKPOINT).write_bytes((two / "run" / runs.CHECKPOINT).read_bytes())
    result = resexp("train", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line_error(
        result, "was trained by 2 processes, and this command runs 1", "with torchrun --nproc-per-node"
    )


def test_a_batch_that_the_processes_cannot_share_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "WORLD", distributed.World(0, 3, 0, "torchrun"))
    with pytest.raises(
        distributed.ResexpError, match=r"schedule.batch_size=16 does not split over 3 processes.*15, 18"
    ):
        distributed.local_batch(16)
    with pytest.raises(distributed.ResexpError, match="hydra/launcher=basic"):
        distributed.refuse("the shared_gpu launcher", "add hydra/launcher=basic")


def test_a_sweep_on_the_shared_gpu_launcher_is_refused_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "WORLD", distributed.World(0, 2, 0, "torchrun"))
    result = resexp("train", "-m", *TINY, "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert_one_line_error(result, "the shared_gpu launcher", "not under torchrun", "hydra/launcher=basic")
    assert not (tmp_path / "sweep").exists()
    monkeypatch.setattr(distributed, "WORLD", distributed.World(0, 2, 0, "torchrun"))
    result = resexp(
        "train",
        "-m",
        *TINY,
        "seed=1,2",
        "hydra.launcher.group_runs=true",
        f"hydra.sweep.dir={tmp_path / 's'}",
        cwd=tmp_path,
    )
    assert_one_line_error(result, "hydra.launcher.group_runs=true", "not under torchrun")


def test_the_shards_of_the_processes_make_the_single_process_stream():
    """CIFAR's device stream and ImageNet's sampler: the ranks' batches, put together, are the batches of
    one process, images and augmentation alike; the evaluation shards cover the set once."""
    make = dict(num_classes=10, train_size=64, test_size=40, val_size=0, eval_batch_size=8, seed=3)
    whole = synthetic(**make, batch_size=16, device=torch.device("cpu"))
    parts = [synthetic(**make, batch_size=16, device=torch.device("cpu"), shard=Shard(r, 2)) for r in range(2)]
    for _ in range(6):  # past an epoch's end (4 batches of 16)
        x, y = next(whole.train)
        pieces = [next(part.train) for part in parts]
        assert torch.equal(torch.cat([p[0] for p in pieces]), x) and torch.equal(torch.cat([p[1] for p in pieces]), y)
    seen = [y for part in parts for _, y in part.evals["test"]]
    assert sum(len(y) for y in seen) == 40 and torch.equal(
        torch.cat(seen).sort().values, torch.cat([y for _, y in whole.evals["test"]]).sort().values
    )
    orders = [EpochOrder(50, seed=1, batch_size=8, shard=Shard(r, 2)) for r in range(2)]
    alone = list(EpochOrder(50, seed=1, batch_size=8))
    assert len(alone) == 48  # whole global batches only
    together = [pair for k in range(6) for order in orders for pair in list(order)[4 * k : 4 * k + 4]]
    assert together == alone


def test_the_ddp_step_of_one_rank_is_the_step_alone(monkeypatch):
    """DDP's forward and its averaged gradients over a single rank: the same training, to float64 rounding."""
    shape = (8, 3, 32, 32)
    [(model, sgd)], [(twin, twin_sgd, alone_step)] = nets(1), alone(nets(1), shape)
    with process_group_of_one("gloo"):
        step = ddp_step(model, sgd, shape, monkeypatch, precision="fp32", cuda_graph=False)
        for iteration in range(3):
            (x,), (y,) = batches(1, iteration)
            torch.testing.assert_close(step(x, y), alone_step(x, y), **CLOSE)
    assert_same(model, twin, sgd, twin_sgd)


def test_global_batch_norm_is_batch_norm_alone():
    """Without other processes GlobalBatchNorm is BatchNorm2d, and it keeps BatchNorm2d's state_dict."""
    model = NetSpec(8, True, "basic", "cifar", "identity", 10).build().double()
    twin = distributed.sync_batch_norm(
        NetSpec(8, True, "basic", "cifar", "identity", 10).build().double(), torch.device("cpu")
    )
    twin.load_state_dict(model.state_dict())
    assert any(isinstance(m, distributed.GlobalBatchNorm) for m in twin.modules())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(model(x), twin(x))


def test_a_slurm_task_of_submitit_maps_to_its_rank_and_world(monkeypatch):
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[017-018]",
    }
    assert distributed.from_env(slurm) == distributed.World(5, 16, 1, "slurm")
    # what start() exports for torch.distributed's env:// from the same variables (submitit's helper)
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        # set, then unset: monkeypatch removes what export() sets once the test ends (a RANK left behind
        # would make a later run wait for 15 others)
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    pytest.importorskip("submitit", reason="hydra-submitit-launcher is not installed (pip install 'resexp[slurm]')")
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    assert distributed.from_env(dict(os.environ)) == distributed.World(5, 16, 1, "torchrun")
    assert (os.environ["MASTER_ADDR"], os.environ["LOCAL_WORLD_SIZE"]) == ("gpu017", "8")
    # a SLURM batch script is task 0 of the job's tasks, but no rank; torchrun's variables come first
    assert distributed.from_env({**slurm, "SUBMITIT_EXECUTOR": ""}) == distributed.World()
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    assert distributed.from_env(torchrun) == distributed.World(3, 4, 3, "torchrun")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_submitit = pytest.mark.skipif(
    not installed("hydra_plugins.hydra_submitit_launcher"), reason="hydra-submitit-launcher is not installed"
)


@needs_submitit
def test_the_slurm_launcher_config_composes_one_task_per_gpu():
    cfg = config.compose(
        "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2", hydra_node=True
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.nodes, launcher.max_num_timeout > 0) == (4, 2, True)


def sweep(tmp_path: Path, *overrides: str) -> Path:
    """A finished sweep of two-iteration runs of TINY's net, one log line per iteration, with `overrides`."""
    folder = tmp_path / "sweep"
    short = [*TINY[:4], "schedule.iterations=2", "schedule.milestones=[1]", "log_every=1", "eval_points=1"]
    result = resexp("train", "-m", *short, *overrides, f"hydra.sweep.dir={folder}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.mark.slow
@needs_submitit
def test_a_submitit_local_sweep_trains_and_names_its_runs(tmp_path):
    folder = sweep(tmp_path, "seed=7,8", "hydra/launcher=submitit_local")
    console = "".join(path.read_text() for path in folder.glob(".submitit/*/*_log.out"))
    for seed in (7, 8):
        assert runs.read_metrics(folder / f"resnet20-A_seed{seed}").seed == seed
        # each of the run's lines (its size, two iterations, the test error, done) names it, once
        assert console.count(f"resnet20-A_seed{seed}: ") == 5, console


@pytest.mark.skipif(
    not installed("hydra_plugins.hydra_joblib_launcher"), reason="hydra-joblib-launcher is not installed"
)
def test_a_joblib_sweep_trains_its_runs_in_processes_and_names_their_lines(tmp_path):
    folder = sweep(tmp_path, "seed=1,2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    for seed in (1, 2):
        assert runs.read_metrics(folder / f"resnet20-A_seed{seed}").seed == seed
        assert f"resnet20-A_seed{seed}: done: " in (folder / f"resnet20-A_seed{seed}" / runs.LOG).read_text()
    assert not list(folder.rglob(runs.LOCK)), "a worker process that lives on holds no lock"


@pytest.mark.skipif(not installed("hydra_plugins.hydra_optuna_sweeper"), reason="hydra-optuna-sweeper is not installed")
def test_the_optuna_sweeper_minimises_the_test_error_of_runs(tmp_path):
    folder = sweep(tmp_path, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "optim.lr=interval(0.01,0.1)")
    best = (folder / "optimization_results.yaml").read_text()
    errors = [runs.read_metrics(path.parent).final["error/test"] for path in folder.glob("*/metrics.json")]
    assert len(errors) == 2 and f"best_value: {min(errors)}" in best


# --- `resexp train --nproc-per-node=N`: torchrun's launch, and what the user sees is resexp's


def launched(*args: str, cwd: Path) -> subprocess.Popen:
    """`resexp train --nproc-per-node=2 TINY ARGS`, as a process to signal or kill."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "resexp", "train", "--nproc-per-node=2", *TINY, *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker(launcher: subprocess.Popen, rank: int) -> int:
    """The PID of the process of `rank` that the launcher started (/proc: its children and their RANK)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no process of rank {rank}")


def test_a_refusal_under_resexps_launch_is_one_line_and_exit_2(tmp_path):
    process = launched("schedule.batch_size=15", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    _, err = process.communicate(timeout=300)
    assert_one_line_error(subprocess.CompletedProcess([], process.returncode, "", err), "does not split over 2")


def test_the_line_and_exit_code_are_the_process_that_ended_of_itself_not_one_torchrun_stopped(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def failure(rank: int, exitcode: int, timestamp: int) -> ProcessFailure:
        made = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(tmp_path / "none"))
        made.timestamp = timestamp  # torchrun's whole seconds: a tie is the common case
        return made

    refused_while_stopped = {0: failure(0, -signal.SIGTERM, 7), 1: failure(1, 2, 7)}
    assert launch.first_failure(refused_while_stopped)[0] == 1
    # a SIGKILL from outside names its rank even where a peer's lost-connection exit came first
    lost = {0: failure(0, 1, 5), 1: failure(1, -signal.SIGKILL, 6)}
    assert launch.first_failure(lost)[0] == 1
    # of two that ended of themselves, the earlier; where only torchrun's SIGTERMs are left, the earliest
    assert launch.first_failure({0: failure(0, 2, 9), 1: failure(1, 1, 8)})[0] == 1
    assert launch.first_failure({0: failure(0, -signal.SIGTERM, 9), 1: failure(1, -signal.SIGTERM, 8)})[0] == 1


def test_resexps_launch_on_one_node_takes_a_free_port_unless_told_where_to_meet():
    given, port = launch.meeting_point(["--nproc-per-node=2"])
    assert given == "--nproc-per-node=2" and port.startswith("--master-port=") and int(port.split("=")[1]) > 0
    for given in (["--nnodes=2", "--rdzv-endpoint=node1:29500"], ["--master_port", "29501"], ["--standalone"]):
        assert launch.meeting_point(["--nproc-per-node=2", *given]) == ["--nproc-per-node=2", *given]


def test_a_sigterm_to_resexps_launch_is_one_line_with_the_command_that_resumes(tmp_path):
    run_dir = tmp_path / "run"
    process = launched(
        "schedule.iterations=100000", "schedule.milestones=[50000]", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    wait_for(run_dir / runs.CHECKPOINT, process, timeout=300)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    [line] = err.strip().splitlines()
    assert line.startswith("resexp: stopped by SIGTERM at iteration ")
    assert "resume: resexp train --nproc-per-node=2 data=synthetic" in line and f"hydra.run.dir={run_dir}" in line


def test_a_killed_process_is_one_line_naming_its_rank_and_the_command_that_resumes(tmp_path):
    run_dir = tmp_path / "run"
    process = launched(
        "schedule.iterations=100000", "schedule.milestones=[50000]", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    wait_for(run_dir / runs.CHECKPOINT, process, timeout=300)
    os.kill(worker(process, 1), signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGKILL, err
    [line] = err.strip().splitlines()
    assert line.startswith("resexp: rank 1 was killed by SIGKILL; error: another process of the run ended or was lost")
    assert "the last checkpoint stands; resume: resexp train --nproc-per-node=2" in line
