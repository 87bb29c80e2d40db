"""What the tests share: the real config, composed and shrunk; the resexp command, run in this process or
as a process of its own; TensorBoard curves read back; runs fabricated on disk as resexp writes them;
small float64 nets and batches for comparing two computations of the same step."""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter

from resexp import checkpoint, cli, config, distributed, runs
from resexp.models import DenseNetSpec, build_model, model_name
from resexp.step import Step, make_step

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
MODELS = sorted(path.stem for path in (CONF / "model").glob("*.yaml"))
DATASETS = sorted(path.stem for path in (CONF / "data").glob("*.yaml"))
# Small and fast: a few iterations on random images, evaluated twice.
SHRINK = ["data=synthetic", "schedule.iterations=4", "schedule.milestones=[2,3]", "log_every=2", "eval_points=2"]
# Long enough to be stopped midway (a few seconds on two cores), small enough to be cheap.
RUN_ITERATIONS = 60
RUN = [
    "data=synthetic",
    "schedule.batch_size=16",
    f"schedule.iterations={RUN_ITERATIONS}",
    "schedule.milestones=[30,45]",
    "log_every=5",
    "eval_points=4",
    "checkpoint_every=7",
]


# Small relatives for nets(): a Wide ResNet's pre-activation net twice as wide, and a ResNeXt whose 3x3
# convs have 4 groups.
WIDE = {"preactivation": True, "shortcut": "projection", "widths": (16, 32, 64, 128)}
RESNEXT = {
    "depth": 11,
    "block": "bottleneck",
    "shortcut": "projection",
    "widths": (8, 8, 16, 16),
    "cardinality": 4,
    "base_width": 16,
}


# Highway networks' gates on ResNet's shortcuts, starting half open so that both of their paths count.
GATED = {"shortcut": "gated", "gate_bias": 0.0}
# A small DenseNet-BC (Huang et al. 2017): one bottleneck layer per dense block, 4 new maps each.
DENSE = {"arch": "densenet", "depth": 10, "block": "bottleneck", "growth_rate": 4, "compression": 0.5}


def nets(count: int, device: str = "cpu", **net) -> list[tuple[torch.nn.Module, torch.optim.SGD]]:
    """`count` nets of one kind with different initial weights, in float64 (so that two computations of
    the same numbers agree to rounding on any CPU), each with the paper's SGD; a list value
    (residual=[False, True, False]) sets that key per net; arch="densenet": DenseNetSpec's keys."""
    pairs = []
    for seed in range(count):
        torch.manual_seed(seed)
        own = {key: value[seed] if isinstance(value, list) else value for key, value in net.items()}
        if own.pop("arch", "resnet") == "densenet":
            model = DenseNetSpec(**{"num_classes": 10, **own}).build()
        else:
            defaults = {"depth": 8, "residual": True, "block": "basic", "stem": "cifar", "shortcut": "identity"}
            model = build_model(**{**defaults, "num_classes": 10, **own})
        model = model.to(device, torch.float64, memory_format=torch.channels_last)
        pairs.append((model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)))
    return pairs


def alone(pairs, shape: tuple[int, ...]) -> list[tuple[torch.nn.Module, torch.optim.SGD, Step]]:
    """Copies of the runs, each with its own eager step, as they would train outside a group."""
    copies = []
    for model, _ in pairs:
        twin = copy.deepcopy(model)
        optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        copies.append((twin, optimizer, make_step(twin, optimizer, shape, precision="fp32", cuda_graph=False)))
    return copies


def batches(count: int, seed: int, size: int = 8, pixels: int = 32, device: str = "cpu"):
    """`count` float64 batches of random images and labels, (size, 3, pixels, pixels) and (size,)."""
    generator = torch.Generator().manual_seed(seed)
    xs = [torch.randn(size, 3, pixels, pixels, generator=generator, dtype=torch.float64) for _ in range(count)]
    ys = [torch.randint(0, 10, (size,), generator=generator) for _ in range(count)]
    return [x.to(device, memory_format=torch.channels_last) for x in xs], [y.to(device) for y in ys]


@contextmanager
def process_group_of_one(backend: str) -> Iterator[None]:
    """A torch.distributed process group of this process alone, so that DDP's path runs without others
    (gloo on the CPU, NCCL on one GPU)."""
    torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def ddp_step(model, optimizer, shape, monkeypatch, **options) -> Step:
    """make_step's step for `model` in a process group (process_group_of_one), checked to be DDP's."""
    built = []
    parallel = distributed.parallel
    monkeypatch.setattr(distributed, "parallel", lambda net: built.append(parallel(net)) or built[-1])
    step = make_step(model, optimizer, shape, **options)
    assert [type(forward).__name__ for forward in built] == ["DistributedDataParallel"]
    return step


# In float64 each op rounds at 1e-16 on any CPU; a few steps of a net amplify that to 1e-14, and to
# 1e-10 for the ill-conditioned ResNet-50 of tests/test_group.py: far inside this tolerance, far
# outside which any other update lies.
CLOSE = dict(rtol=1e-7, atol=1e-9)


def assert_same(model, twin, optimizer, twin_optimizer) -> None:
    """Two nets trained alike: the same weights, BN statistics and momentum, to float64 rounding (CLOSE)."""
    for name, tensor in model.state_dict().items():  # weights, and BN's running statistics and count
        torch.testing.assert_close(tensor, twin.state_dict()[name], **CLOSE, msg=name)
    for p, q in zip(model.parameters(), twin.parameters()):
        momentum, twin_momentum = optimizer.state[p]["momentum_buffer"], twin_optimizer.state[q]["momentum_buffer"]
        torch.testing.assert_close(momentum, twin_momentum, **CLOSE)


def compose_config(*overrides: str) -> DictConfig:
    return config.compose(*overrides)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def resexp(*args: str, cwd: Path) -> Result:
    """`resexp ARGS` in this process (resexp.cli.main) with `cwd` as the working directory and its output
    captured: not a terminal, so plain log lines. What is about the process itself (signals, the console
    script) runs `resexp_process` instead."""
    out, err = io.StringIO(), io.StringIO()
    root, argv, here = logging.getLogger(), sys.argv[:], os.getcwd()
    handlers = root.handlers[:]
    code = 0
    try:
        os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            cli.main(list(args))
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
    finally:
        os.chdir(here)
        sys.argv = argv
        for handler in root.handlers[:]:  # the run's log file and console, which Hydra configured
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
    return Result(code, out.getvalue(), err.getvalue())


def resexp_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m resexp ARGS` as a process of its own, in `cwd`, with output captured."""
    return subprocess.run([sys.executable, "-m", "resexp", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def start_process(*args: str, cwd: Path) -> subprocess.Popen:
    """`python -m resexp ARGS` started in `cwd`, its output piped, for a test to signal or kill."""
    command = [sys.executable, "-m", "resexp", *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    """`resexp train` of RUN into `run_dir`, as a process to signal or kill."""
    return start_process("train", *RUN, *extra, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until `path` exists, while `process` runs."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def copy_of(run_dir: Path, where: Path) -> Path:
    """A copy of a run directory, links, times and all (cp -a)."""
    where.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(run_dir), str(where)], check=True)
    return where


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file below `directory`, by its path there, with its bytes: a directory to compare byte for byte."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_run(a: Path, b: Path) -> None:
    """Two finished runs alike: bit for bit the same weights, final and best metrics, and curves."""
    wa, wb = (checkpoint.load(d / runs.CHECKPOINT)["model"] for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"
    ma, mb = (json.loads((d / runs.METRICS).read_text()) for d in (a, b))
    assert (ma["final"], ma["best"]) == (mb["final"], mb["best"])
    assert scalars(a) == scalars(b)  # the curves too: no point missing, none twice


def assert_resumes_bit_identical(tmp_path: Path, net: list[str]) -> None:
    """A RUN of `net` stopped by SIGTERM after its first checkpoint and started again ends as the same run
    trained straight through (dropout's masks too: they come from torch's generator, which checkpoints carry)."""
    import signal

    straight_dir = tmp_path / "straight"
    result = resexp("train", *RUN, *net, f"hydra.run.dir={straight_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "run"
    process = start(run_dir, *net)
    wait_for(run_dir / runs.CHECKPOINT, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM and not (run_dir / runs.METRICS).exists()
    resumed = resexp("train", *RUN, *net, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    assert_same_run(run_dir, straight_dir)


def stop_midway(args: list[str], sweep: Path, runs_to_wait_for: int) -> str:
    """Start `resexp train ARGS` (a sweep into `sweep`), SIGTERM it once `runs_to_wait_for` runs have each
    written a checkpoint, and return its stderr after it has stopped as a stopped sweep does."""
    import signal

    process = start_process("train", *args, cwd=sweep.parent)
    deadline = time.monotonic() + 180
    while len(list(sweep.glob(f"*/{runs.CHECKPOINT}"))) < runs_to_wait_for:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    return stderr


def assert_one_line_error(result: Result | subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("resexp: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run: tag -> (step, value) points."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def fake_run(
    run_dir: Path,
    *,
    depth: int,
    residual: bool,
    final_train: float,
    final_test: float,
    final_top5: float | None = None,
    seed: int = 0,
    data: str = "cifar10",
    shortcut: str = "identity",
    iterations: int = 64_000,
    batch_size: int | None = None,
    finished: bool = True,
    points: int = 32,
    model_keys: dict[str, Any] | None = None,
    preprocess: str | None = None,
) -> Path:
    """A run directory as resexp writes it (Hydra's config, TensorBoard curves, metrics.json through
    resexp.runs) with made-up numbers: curves that fall from 90% towards the final errors, with the
    paper's drops at 50% and 75%. `batch_size`: the paper's for the data unless given; `preprocess`:
    "normalize/pad" as saved since 0.9.0 (None: no key, as older runs, which trained with the paper's)."""
    (run_dir / runs.HYDRA).mkdir(parents=True)
    model = {"depth": depth, "residual": residual, "block": "basic", "stem": "cifar", "shortcut": "identity"}
    model.update(model_keys or {})  # e.g. block, bottleneck_stride, preactivation
    saved = {"model": model, "shortcut": shortcut, "seed": seed, "schedule": {"iterations": iterations}}
    if preprocess is not None:
        saved["preprocess"] = dict(zip(("normalize", "pad"), preprocess.split("/"), strict=True))
    (run_dir / runs.HYDRA / "config.yaml").write_text(yaml.safe_dump(saved))
    choices = {"hydra": {"runtime": {"choices": {"data": data}}}}
    (run_dir / runs.HYDRA / "hydra.yaml").write_text(yaml.safe_dump(choices))
    stop = iterations if finished else iterations // 2
    writer = SummaryWriter(str(run_dir))
    for index in range(1, points + 1):
        step = stop * index // points
        progress = step / iterations
        settle = 1 - math.exp(-6 * progress)
        drop = 0.45 if progress >= 0.5 else 1.0
        for tag, final in (("error/train", final_train), ("error/test", final_test)):
            value = 90 - (90 - final * (1 + 0.6 * drop)) * settle if progress < 1 else final
            writer.add_scalar(tag, value, step)
    writer.close()
    if finished:
        final = {"error/train": final_train, "error/test": final_test}
        if final_top5 is not None:  # ImageNet runs log the top-5 error too
            final["error_top5/test"] = final_top5
        option = shortcut if residual and model.get("arch") != "densenet" else None  # a DenseNet has none
        metrics = runs.Metrics(
            net=model_name(model, shortcut if residual else None, bottleneck_stride="3x3"), model=None, data=data,
            depth=depth, residual=residual, shortcut=option, params=1000 * depth, iterations=iterations,
            batch_size=batch_size or (256 if data == "imagenet" else 128),
            lr=0.1, seed=seed, precision="fp32", images_per_s=1.0, device="cpu", torch="-", python="-",
            resexp="-", final=final, best={}, skipped_steps=0, train_time_s=1.0, wall_time_s=1.0,
        )  # fmt: skip
        runs.write_metrics(run_dir, metrics)
    else:  # stopped where its curves end, as a stop leaves it: a checkpoint of that iteration (its progress)
        checkpoint.save(run_dir / runs.CHECKPOINT, {"progress": {"iteration": stop}})
    return run_dir
