"""`resexp` as a user runs it: the command in this process (the process itself where that is the point),
files on disk, TensorBoard events read back."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import SHRINK, assert_one_line_error, resexp, resexp_process, scalars


def test_help_lists_the_subcommands(tmp_path):
    result = resexp_process("--help", cwd=tmp_path)  # the process's exit codes
    assert result.returncode == 0 and "train" in result.stdout
    assert resexp_process(cwd=tmp_path).returncode == 2


def test_console_script_is_installed(tmp_path):
    script = shutil.which("resexp", path=str(Path(sys.executable).parent))
    assert script, "the resexp console script is not installed next to this Python"
    result = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout


def test_unknown_subcommand_is_a_one_line_error(tmp_path):
    assert_one_line_error(resexp("trian", cwd=tmp_path), "'trian'", "train")


def test_train_writes_events_metrics_and_config(tmp_path):
    run_dir = tmp_path / "run"
    result = resexp("train", *SHRINK, "model=plain20", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    series = scalars(run_dir)
    assert {"error/train", "error/test", "loss/train", "loss/test", "lr"} <= set(series)
    assert [step for step, _ in series["error/test"]] == [2, 4]
    assert [step for step, _ in series["error/train"]] == [2, 4]
    # Milestones [2, 3]: steps 1-2 at 0.1, step 3 at 0.01, step 4 at 0.001.
    assert [value for _, value in series["lr"]] == pytest.approx([0.1, 0.001])
    assert all(0 <= value <= 100 for _, value in series["error/train"] + series["error/test"])
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["net"] == "plain20" and metrics["shortcut"] is None  # plain: the option has no effect
    assert metrics["params"] == 269_722 and metrics["iterations"] == 4
    assert metrics["final"]["error/test"] == pytest.approx(series["error/test"][-1][1])
    assert metrics["best"]["error/test"] == pytest.approx(min(v for _, v in series["error/test"]))
    assert metrics["images_per_s"] > 0 and metrics["wall_time_s"] >= metrics["train_time_s"] > 0

    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["model"]["depth"] == 20 and config["model"]["residual"] is False
    log = (run_dir / "train.log").read_text()
    assert "has no effect" not in log and "it 4/4" in log  # the user set no shortcut: nothing to say of one
    assert "it 4/4" in result.stdout  # not a terminal: plain log lines instead of a progress bar


def test_multirun_makes_one_directory_per_run(tmp_path):
    sweep = tmp_path / "sweep"
    result = resexp("train", "-m", *SHRINK, "model=plain20,resnet20", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = sorted(path.parent for path in sweep.glob("*/metrics.json"))
    assert [run.name for run in runs] == ["plain20", "resnet20-A"]  # what the sweep varies, and nothing else
    nets = [json.loads((run / "metrics.json").read_text())["net"] for run in runs]
    assert nets == ["plain20", "resnet20-A"]
    assert all(len(list(run.glob("events.out.tfevents.*"))) == 1 for run in runs)
    # The runs trained at once (the shared-GPU launcher); each log file still holds its own run only.
    plain, residual = ((run / "train.log").read_text() for run in runs)
    assert "plain20: it 4/4" in plain and "resnet20-A" not in plain
    assert "resnet20-A: it 4/4" in residual and "plain20" not in residual
    assert "plain20: it 4/4" in result.stdout and "resnet20-A: it 4/4" in result.stdout


def test_a_sweep_larger_than_max_runs_trains_in_batches(tmp_path):
    sweep = tmp_path / "sweep"
    result = resexp(
        "train", "-m", *SHRINK, "seed=0,1", "hydra.launcher.max_runs=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(path.read_text())["seed"] for path in sweep.glob("*/metrics.json")) == [0, 1]
    assert result.stdout.index("resnet20-A_seed0: done") < result.stdout.index("resnet20-A_seed1: it 2/4")  # in turn


def test_runs_that_set_torchs_algorithms_otherwise_train_in_batches_of_their_own(tmp_path, monkeypatch):
    """Deterministic algorithms and fp32's TF32 are the process's settings: runs of one batch, which train at
    once, would all train with the last-prepared run's. Each run trains with its own."""
    import threading

    import torch

    from resexp import jobs

    seen, loop = {}, jobs.train_loop

    def recording(model, *args, **kwargs):
        seen[threading.current_thread().name] = torch.are_deterministic_algorithms_enabled()
        return loop(model, *args, **kwargs)

    monkeypatch.setattr(jobs, "train_loop", recording)
    sweep = tmp_path / "sweep"
    args = ["-m", *SHRINK, "model.depth=8", "deterministic=true,false", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    try:
        result = resexp("train", *args, cwd=tmp_path)
    finally:
        torch.use_deterministic_algorithms(False)
    assert result.returncode == 0, result.stderr
    expected = {
        f"resnet8-A_deterministic-{flag}_seed{seed}": flag == "True" for flag in ("True", "False") for seed in (0, 1)
    }
    assert seen == expected


def test_compiled_eager_steps_of_a_batch_compile_before_its_threads_start(tmp_path, monkeypatch):
    """Dynamo is not made for first compiles in several threads at once: a compiled step that stays eager
    (the CPU, on_nonfinite=skip, cuda_graph=false) is compiled, by one step undone, where it is built."""
    import threading

    import torch

    first_calls = []

    def compile_recording(module, **options):  # torch.compile, without compiling: the thread of each first call
        calls = []

        def compiled(*args, **kwargs):
            if not calls:
                first_calls.append(threading.current_thread().name)
            calls.append(1)
            return module(*args, **kwargs)

        return compiled

    monkeypatch.setattr(torch, "compile", compile_recording)
    sweep = tmp_path / "sweep"
    result = resexp(
        "train", "-m", *SHRINK, "model.depth=8", "compile=true", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert first_calls == ["MainThread", "MainThread"]


def test_default_run_directory_names_the_net_and_what_the_command_line_set(tmp_path):
    result = resexp("train", *SHRINK, "model=resnet32", "shortcut=B", "seed=1", "device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # as a sweep's runs are named: not by the keys the net's name says, nor by where or how it ran (device)
    [run] = list((tmp_path / "outputs").glob("*/*_resnet32-B_data-synthetic_iterations4_milestones2-3_seed1"))
    assert (run / "metrics.json").is_file()


def test_validation_split_logs_val_error(tmp_path):
    run_dir = tmp_path / "run"
    result = resexp("train", *SHRINK, "data.val_size=256", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {"error/val", "loss/val", "error/test"} <= set(scalars(run_dir))
    assert "error/val" in json.loads((run_dir / "metrics.json").read_text())["final"]


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("model=nope", ["model='nope' is not one of the model configs", "resnet56", "plain20"]),
        ("-m model=resnet20,nope", ["model='nope'"]),
        ("-m model=plain20 shortcut=Z", ["shortcut='Z' is not an option"]),
        ("-m model.depth=20,21", ["model.depth=21 is not a CIFAR depth"]),  # the valid run is taken back too
        ("-m model.depth=20,26 precision=fp16", ["precision='fp16' is not an option"]),
        ("-m model.depth=20,26 hydra.launcher.max_runs=0", ["hydra.launcher.max_runs=0 must be a positive integer"]),
        (
            "data=imagenet1k",
            [
                "data='imagenet1k' is not one of the data configs",
                "cifar10, cifar100, imagenet, imagenet_packed, imagenette, synthetic",
            ],
        ),
        (
            "experiment=fig7",
            [
                "experiment='fig7' is not one of the experiment configs",
                "cifar10_fig6, cifar10_gating, cifar10_preact, cifar10_relatives, cifar10_table6, imagenet_packed_budget",
            ],
        ),
        ("shortcut=X", ["shortcut='X' is not an option", "identity (A), projection (B), full (C) or gated"]),
        ("model.depth=21", ["model.depth=21 is not a CIFAR depth", "6n+2"]),
        ("schedule.iterations=0", ["schedule.iterations=0 must be a positive integer"]),
        ("device=tpu", ["device='tpu'", "auto, cpu, cuda"]),
        ("schedule.batch_size=0", ["schedule.batch_size=0 must be a positive integer"]),
        ("schedule.milestones=[2,9]", ["schedule.milestones=[2, 9] must be increasing iterations within the run's 4"]),
        ("checkpoint_every=-1", ["checkpoint_every=-1 must be a positive integer"]),
        ("on_nonfinite=ignore", ["on_nonfinite='ignore' is not an option; choose stop or skip"]),
        ("modle.depth=20", ["modle.depth is no key of resexp's configs; did you mean model.depth?"]),
        ("iterations=100", ["iterations is no key of resexp's configs; did you mean schedule.iterations?"]),
        ("+iterations=100", ["iterations is no key", "did you mean schedule.iterations?"]),
        ("+modle=resnet20", ["modle is no key", "did you mean model?"]),
        (
            "data=cifar10 data.root=/nonexistent data.download=false",
            ["CIFAR-10 not found: /nonexistent/cifar-10-batches-py lacks data_batch_1", "data.root"],
        ),
    ],
)
def test_bad_input_is_a_one_line_error_and_leaves_nothing_behind(tmp_path, override, fragments):
    run_dir = tmp_path / "outputs" / "run"
    flags = [arg for arg in override.split() if arg.startswith("-")]
    overrides = [arg for arg in override.split() if not arg.startswith("-")]
    result = resexp(
        "train", *flags, *SHRINK, *overrides, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}", cwd=tmp_path
    )
    assert_one_line_error(result, *fragments)
    assert not run_dir.exists()


@pytest.mark.parametrize("flags", [[], ["-m", "seed=0,1"]], ids=["run", "sweep"])
def test_bad_input_leaves_no_empty_folders_in_the_default_directories(tmp_path, flags):
    earlier = tmp_path / "outputs" / "2026-01-01" / "run" / "metrics.json"  # what was there stays
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    result = resexp("train", *flags, *SHRINK, "schedule.batch_size=0", cwd=tmp_path)
    assert_one_line_error(result, "schedule.batch_size=0 must be a positive integer")
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*")) == [
        "outputs",
        "outputs/2026-01-01",
        "outputs/2026-01-01/run",
        "outputs/2026-01-01/run/metrics.json",
    ]


def test_hydra_flags_work(tmp_path):
    result = resexp("train", "model=plain56", "--cfg", "job", "--resolve", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["model"]["depth"] == 56 and config["shortcut"] == "identity"
    assert not (tmp_path / "outputs").exists()  # printing the config runs nothing
    help_text = resexp("train", "--help", cwd=tmp_path)
    assert help_text.returncode == 0 and "model: " in help_text.stdout and "resnet1202" in help_text.stdout


def test_benchmark_script_runs(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent.parent / "scripts" / "benchmark.py"),
            "--nets",
            "plain8",
            "resnet8",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--group",
            "2",
            "--twins",
            "--grad-norms-every",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    result = json.loads(out.read_text())
    assert [row["net"] for row in result["rows"]] == ["plain8", "resnet8"]
    assert all(
        row["common_ms"] > 0
        and row["resexp_ms"] > 0
        and row["grouped_ms_per_run"] > 0
        and row["twins_ms_per_run"] > 0
        and row["grad_norms_ms"] > 0
        for row in result["rows"]
    )
    assert result["together"]["ms"] > 0 and result["together"]["twins_grouped_ms"] > 0
