"""The faults past a kill: a second process on a run, a stop while a run is being prepared, damaged
checkpoints and metrics, non-finite weights, and the settings that may change on resume."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import SHRINK, assert_one_line_error, assert_same_run, copy_of, files_of, resexp, start, wait_for

from resexp import checkpoint, lock, runs
from resexp.data import synthetic
from resexp.errors import ResexpError
from resexp.logs import LogLines
from resexp.models import build_model
from resexp.step import make_step
from resexp.train import Loop, Schedule, train


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A small finished run (SHRINK) that tests copy, never change."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert resexp("train", *SHRINK, f"hydra.run.dir={run_dir}", cwd=run_dir.parent).returncode == 0
    return run_dir


# --- Two processes, one run directory


@pytest.mark.slow
def test_a_second_process_on_a_training_run_is_refused_naming_the_first_and_changes_nothing(tmp_path, straight):
    run_dir = tmp_path / "run"
    first = start(run_dir)
    wait_for(run_dir / runs.CHECKPOINT, first)
    first.send_signal(signal.SIGSTOP)  # paused mid-training, so that it is still there, whatever the machine
    try:
        second = start(run_dir)  # a resubmitted job: the same command, the same directory
        _, stderr = second.communicate(timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert_one_line_error(
        subprocess.CompletedProcess([], second.returncode, "", stderr),
        f"{run_dir} is in use by process {first.pid} on {os.uname().nodename}",
    )
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert_same_run(run_dir, straight)  # the first went on undisturbed, to the same result as alone
    assert not (run_dir / runs.LOCK).exists()  # a process that ends removes its lock file


HOLDER = """
import sys, time
from pathlib import Path
from resexp import lock
lock.hold(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def test_a_sweep_directory_is_held_too_and_a_killed_holder_blocks_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(sweep)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    refused = resexp("train", "-m", *SHRINK, "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert_one_line_error(refused, f"{sweep} is in use by process {holder.pid} on ")
    assert sorted(path.name for path in sweep.iterdir()) == [runs.LOCK]  # Hydra wrote nothing there
    holder.kill()  # SIGKILL: its lock file stays, and blocks nothing
    holder.wait()
    lock.hold(sweep)
    assert f"process {os.getpid()} on " in (sweep / runs.LOCK).read_text()
    lock.release()
    assert not sweep.joinpath(runs.LOCK).exists()


def test_holding_a_lock_twice_in_one_process_is_one_hold_and_each_is_let_go_alone(tmp_path):
    one, other = tmp_path / "one", tmp_path / "other"
    lock.hold(one)
    lock.hold(one)
    lock.hold(other)
    assert len(lock.HELD) == 2
    lock.release(one)  # a run that ended: the rest of its process's runs keep theirs
    assert not (one / runs.LOCK).exists() and (other / runs.LOCK).exists()
    lock.release()
    assert not lock.HELD and not (other / runs.LOCK).exists()


# --- A stop while a run is being prepared

# resexp with its synthetic data slow to make: the run is in its preparation until the signal comes.
SLOW_DATA = """
import sys, time
from pathlib import Path
import resexp.data
made, marker = resexp.data.synthetic, Path(sys.argv[1])
def slow(**kwargs):
    marker.touch()
    time.sleep(120)
    return made(**kwargs)
resexp.data.synthetic = slow
from resexp.cli import main
main(sys.argv[2:])
"""


def stopped_while_preparing(tmp_path: Path, signum: int, run_dir: Path) -> str:
    marker = tmp_path / "preparing"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_DATA, str(marker), "train", *SHRINK, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(marker, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr
    [line] = stderr.strip().splitlines()  # no traceback
    return line


def test_sigterm_while_a_new_run_is_prepared_takes_back_its_directory(tmp_path):
    run_dir = tmp_path / "run"
    line = stopped_while_preparing(tmp_path, signal.SIGTERM, run_dir)
    assert line.startswith("resexp: stopped by SIGTERM while no run was training; nothing half-made is left")
    assert "resume: resexp train data=synthetic" in line and f"hydra.run.dir={run_dir}" in line
    assert not run_dir.exists()


def test_ctrl_c_while_a_run_is_prepared_for_resuming_leaves_it_byte_for_byte(tmp_path, finished):
    run_dir = copy_of(finished, tmp_path / "run")
    (run_dir / runs.METRICS).unlink()  # a run to resume from its (last) checkpoint
    before = files_of(run_dir)
    line = stopped_while_preparing(tmp_path, signal.SIGINT, run_dir)
    assert line.startswith("resexp: stopped by SIGINT while no run was training")
    assert files_of(run_dir) == before


# --- Damaged checkpoints


def rewritten(source: Path, target: Path, change: dict[str, bytes]) -> None:
    """`source`'s zip archive with some records' bytes replaced, every checksum made to match: damage
    that only reading the records themselves can find."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            name = info.filename.split("/", 1)[1]
            new.writestr(info, change.get(name, old.read(info)))


def tensor_record(path: Path) -> tuple[zipfile.ZipInfo, int]:
    """The largest tensor's record in a checkpoint, and where its bytes start in the file."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        with open(path, "rb") as file:
            file.seek(info.header_offset + 26)
            name_length, extra_length = (int.from_bytes(file.read(2), "little") for _ in range(2))
    return info, info.header_offset + 30 + name_length + extra_length


def test_one_flipped_byte_inside_a_tensor_is_found_by_its_checksum(tmp_path, finished):
    run_dir = copy_of(finished, tmp_path / "run")
    (run_dir / runs.METRICS).unlink()
    path = run_dir / runs.CHECKPOINT
    info, start_of_data = tensor_record(path)
    damaged = bytearray(path.read_bytes())
    damaged[start_of_data + info.file_size // 2] ^= 0x10
    path.write_bytes(damaged)
    with pytest.raises(ResexpError, match=f"{path} is damaged: .*{info.filename} does not match the checksum"):
        checkpoint.load(path)
    result = resexp("train", *SHRINK, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line_error(result, "is damaged", "move it away to start this run over")


@pytest.mark.parametrize(
    "make, message",
    [
        # a pickle that passes its checksum and breaks torch's unpickler (an IndexError inside it)
        (lambda good, path: rewritten(good, path, {"data.pkl": b"."}), "is not a readable resexp checkpoint"),
        (lambda good, path: torch.save({"version": 1}, path), "is not a whole resexp checkpoint: it has no 'identity'"),
        (
            lambda good, path: torch.save({**checkpoint.load(good), "model": [1, 2]}, path),
            "it has a list as its 'model'",
        ),
        (
            lambda good, path: torch.save({**checkpoint.load(good), "model": {}}, path),
            "is damaged: its model does not fit this run (Error(s) in loading state_dict",
        ),
        (
            lambda good, path: torch.save({**checkpoint.load(good), "progress": {"iterations": 3}}, path),
            "is damaged: its progress does not fit this run",
        ),
    ],
    ids=["unpickler-indexerror", "version-only", "model-of-another-type", "model-empty", "progress-foreign"],
)
def test_checkpoints_damaged_inside_are_one_line(tmp_path, finished, make, message):
    run_dir = copy_of(finished, tmp_path / "run")
    (run_dir / runs.METRICS).unlink()
    path = run_dir / runs.CHECKPOINT
    make(finished / runs.CHECKPOINT, path)
    before = files_of(run_dir)
    result = resexp("train", *SHRINK, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line_error(result, str(path), message)
    assert files_of(run_dir) == before


# --- Damaged metrics.json


def damaged_metrics(good: str) -> dict[str, str]:
    whole = json.loads(good)
    return {
        "truncated": good[: len(good) // 2],
        "empty": "",
        "garbage": "\x00\x01junk",
        "a-list": "[1, 2]",
        "missing-key": json.dumps({k: v for k, v in whole.items() if k != "final"}),
        "wrong-type": json.dumps({**whole, "depth": "twenty"}),
        "wrong-type-inside": json.dumps({**whole, "final": {"error/test": "low"}}),
        "null": json.dumps({**whole, "params": None}),
        "no-test-error": json.dumps({**whole, "final": {}}),
    }


@pytest.mark.parametrize("damage", list(damaged_metrics("{}")))
def test_a_damaged_metrics_json_is_one_line_and_the_checkpoint_writes_it_again(tmp_path, finished, damage):
    run_dir = copy_of(finished, tmp_path / "run")
    good = (finished / runs.METRICS).read_text()
    (run_dir / runs.METRICS).write_text(damaged_metrics(good)[damage])
    result = resexp("train", *SHRINK, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line_error(result, f"{run_dir / runs.METRICS} is truncated or malformed", "move it away")
    report = resexp("report", str(run_dir), "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert report.returncode == 0 and "truncated or malformed" in (tmp_path / "report" / "results.md").read_text()

    (run_dir / runs.METRICS).unlink()  # as the line advises
    assert resexp("train", *SHRINK, f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    again, before = json.loads((run_dir / runs.METRICS).read_text()), json.loads(good)
    assert {k: v for k, v in again.items() if k != "wall_time_s"} == {
        k: v for k, v in before.items() if k != "wall_time_s"
    }


# --- Non-finite losses and weights


class Overflowing:
    """A training step that, on the given calls, makes a NaN loss (the weights untouched), or, after an
    update of finite loss, leaves a weight infinite: what too high a rate does."""

    def __init__(self, step, model, nan_loss_at=(), inf_weight_at=()):
        self.step, self.model, self.nan_loss_at, self.inf_weight_at, self.calls = (
            step, model, set(nan_loss_at), set(inf_weight_at), 0
        )  # fmt: skip

    def __call__(self, x, y):
        self.calls += 1
        stats = self.step(x, y)
        if self.calls in self.nan_loss_at:
            stats = stats.clone()
            stats[0] = float("nan")
        if self.calls in self.inf_weight_at:
            with torch.no_grad():
                self.model.fc.weight[0, 0] = float("inf")
        return stats


def train_faulty(tmp_path, on_nonfinite, **faults):
    torch.manual_seed(0)
    model = build_model(8, True, "basic", "cifar", "identity", 10).to(memory_format=torch.channels_last)
    data = synthetic(
        num_classes=10, train_size=64, test_size=16, val_size=0, eval_batch_size=16, batch_size=8, seed=0,
        device=torch.device("cpu"),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = make_step(model, optimizer, (8, 3, 32, 32), precision="fp32", cuda_graph=False)
    schedule = Schedule(iterations=10, milestones=(), gamma=0.1, warmup_lr=None, warmup_until_error=80)
    loop = Loop(
        schedule, 0.1, eval_every=5, log_every=2, checkpoint_every=2, on_nonfinite=on_nonfinite, precision="fp32"
    )
    faulty = Overflowing(step, model, **faults)
    return model, train(
        model, optimizer, faulty, data, loop, run_dir=tmp_path, screen=LogLines(10), stops=[], identity={}
    )


def finite(path: Path) -> bool:
    state = checkpoint.load(path)
    return all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point())


def test_a_nan_loss_stops_the_run_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(
        ResexpError,
        match=f"the training loss became non-finite at iteration 6; {tmp_path / 'checkpoint.pt'} \\(iteration 4\\) "
        "is kept; set on_nonfinite=skip to skip such steps; or start over at a lower optim.lr$",
    ):
        train_faulty(tmp_path, "stop", nan_loss_at={6})
    assert checkpoint.load(tmp_path / "checkpoint.pt")["progress"]["iteration"] == 4 and finite(
        tmp_path / "checkpoint.pt"
    )


def test_on_nonfinite_skip_skips_the_bad_step_and_finishes(tmp_path):
    # The loss alone was NaN: the step left the weights alone, and the run goes on.
    model, summary = train_faulty(tmp_path, "skip", nan_loss_at={6})
    assert summary["skipped_steps"] == 1 and all(p.isfinite().all() for p in model.parameters())
    assert checkpoint.load(tmp_path / "checkpoint.pt")["progress"]["iteration"] == 10


@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_weights_gone_non_finite_are_never_saved_nor_finished_with(tmp_path, on_nonfinite):
    # Iteration 5's update overflowed with a finite loss: the checkpoint of iteration 6 would hold it.
    with pytest.raises(
        ResexpError, match="the weights became non-finite by iteration 5 \\(fc.weight\\); .*iteration 4"
    ):
        train_faulty(tmp_path, on_nonfinite, inf_weight_at={5})
    assert checkpoint.load(tmp_path / "checkpoint.pt")["progress"]["iteration"] == 4 and finite(
        tmp_path / "checkpoint.pt"
    )
    assert not (tmp_path / runs.METRICS).exists()


def test_a_diverging_rate_advises_a_command_that_runs(tmp_path):
    # Each advised command is run as given, until one trains to the end: far below a rate that diverges.
    command, advised = ["train", *SHRINK, "optim.lr=1e5", f"hydra.run.dir={tmp_path / 'run'}"], []
    for _ in range(6):
        result = resexp(*command, cwd=tmp_path)
        if result.returncode == 0:
            break
        assert_one_line_error(result, "became non-finite")
        assert "belongs to another experiment" not in result.stderr
        advice = result.stderr.split("to start over at a tenth of the rate: ", 1)[1].strip()
        command = shlex.split(advice)[1:]  # without the word resexp
        advised.append(command)
    assert result.returncode == 0 and advised, result.stderr
    assert all(not finite_dir.joinpath(runs.CHECKPOINT).exists() or finite(finite_dir / runs.CHECKPOINT)
               for finite_dir in tmp_path.iterdir() if finite_dir.is_dir())  # fmt: skip


# --- What may change on resume


def test_settings_that_do_not_change_the_experiment_do_not_block_a_resume(tmp_path, finished):
    run_dir = copy_of(finished, tmp_path / "run")
    cadence = ["log_every=1", "eval_points=3", "on_nonfinite=skip", "checkpoint_every=2", "data.eval_batch_size=16"]
    again = resexp("train", *SHRINK, *cadence, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 0 and "finished already" in again.stdout, again.stderr
    refused = resexp("train", *SHRINK, "optim.momentum=0.8", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line_error(refused, "belongs to another experiment", "optim.momentum: 0.9 there, 0.8 now")


def test_a_checkpoint_that_recorded_cadence_in_its_identity_still_resumes():
    # resexp 0.2.0 recorded log_every and eval_points as part of a run's identity.
    saved = {"seed": 0, "optim.lr": 0.1, "log_every": 100, "eval_points": 64}
    checkpoint.check_same_run(Path("checkpoint.pt"), saved, {"seed": 0, "optim.lr": 0.1})
    with pytest.raises(ResexpError, match="optim.lr: 0.1 there, 0.2 now"):
        checkpoint.check_same_run(Path("checkpoint.pt"), saved, {"seed": 0, "optim.lr": 0.2})


def test_an_older_checkpoint_without_the_bottlenecks_stride_resumes_as_the_3x3_block_it_trained():
    cifar = {"model.block": "basic", "seed": 0}  # basic blocks: the stride changes nothing, any value resumes
    checkpoint.check_same_run(Path("checkpoint.pt"), cifar, {**cifar, "model.bottleneck_stride": "1x1"})
    imagenet = {"model.block": "bottleneck", "seed": 0}
    checkpoint.check_same_run(Path("checkpoint.pt"), imagenet, {**imagenet, "model.bottleneck_stride": "3x3"})
    with pytest.raises(ResexpError, match=re.escape("model.bottleneck_stride: '3x3' there, '1x1' now")):
        checkpoint.check_same_run(Path("checkpoint.pt"), imagenet, {**imagenet, "model.bottleneck_stride": "1x1"})
