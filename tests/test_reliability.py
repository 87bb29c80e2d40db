"""Kills, preemption, disk trouble, NaNs and hostile files: nothing written may be lost or run."""

import errno
import json
import os
import pickle
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    RUN,
    RUN_ITERATIONS,
    SHRINK,
    assert_resumes_bit_identical,
    assert_same_run,
    files_of,
    resexp,
    scalars,
    start,
    start_process,
    stop_midway,
    wait_for,
)
from torch.utils.tensorboard import SummaryWriter

from resexp import checkpoint, runs
from resexp.curves import open_writer
from resexp.errors import ResexpError
from resexp.runs import EVENTS


def test_sigterm_checkpoints_and_resume_is_bit_identical(tmp_path, straight):
    run_dir = tmp_path / "run"
    process = start(run_dir)
    wait_for(run_dir / "checkpoint.pt", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    [line] = stderr.strip().splitlines()
    assert line.startswith("resexp: stopped by SIGTERM at iteration ") and f"hydra.run.dir={run_dir}" in line
    stopped_at = int(line.split("at iteration ")[1].split(",")[0])
    assert checkpoint.load(run_dir / "checkpoint.pt")["progress"]["iteration"] == stopped_at < RUN_ITERATIONS
    assert not (run_dir / "metrics.json").exists()

    resumed = resexp("train", *RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)  # the same command again
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run_dir / 'checkpoint.pt'} at iteration {stopped_at}" in resumed.stdout
    assert_same_run(run_dir, straight)


@pytest.mark.slow
def test_sigkill_at_random_moments_always_leaves_a_resumable_run(tmp_path, straight):
    run_dir = tmp_path / "run"
    rng = random.Random(5)
    reached = []
    # Each attempt is killed once its log shows a later iteration than the last, and a moment after:
    # random, but before the run can end however fast the machine.
    for target in sorted(rng.sample(range(5, RUN_ITERATIONS - 15, 5), 4)):
        process = start(run_dir, "checkpoint_every=1")  # a checkpoint every step: kills land mid-write
        for line in process.stdout:
            shown = re.search(rf" it (\d+)/{RUN_ITERATIONS} .* it/s", line)
            if shown and int(shown.group(1)) >= target:
                break
        time.sleep(rng.uniform(0, 0.02))
        process.kill()
        process.communicate()
        state = checkpoint.load(run_dir / "checkpoint.pt")  # whole and readable, whatever the moment
        reached.append(state["progress"]["iteration"])
        # the killed process's lock file stays, naming it, and blocks nothing: the next attempt takes it over
        assert f"process {process.pid} on " in (run_dir / runs.LOCK).read_text()
    # each attempt resumed where the last stopped
    assert reached == sorted(reached) and reached[-1] < RUN_ITERATIONS, reached
    finished = resexp("train", *RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert_same_run(run_dir, straight)
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / runs.LOCK).exists()


def test_finished_runs_are_skipped_and_never_overwritten(tmp_path, straight):
    before = (straight / "metrics.json").read_bytes()
    again = resexp("train", *RUN, f"hydra.run.dir={straight}", cwd=tmp_path)
    assert again.returncode == 0 and "finished already" in again.stdout
    refused = resexp("train", *RUN, "resume=false", f"hydra.run.dir={straight}", cwd=tmp_path)
    assert refused.returncode == 2 and "already holds a run; resume=true continues it" in refused.stderr
    assert (straight / "metrics.json").read_bytes() == before


@pytest.mark.slow
def test_a_resumed_multirun_skips_finished_runs_and_resumes_the_rest(tmp_path):
    # Hydra's basic launcher: one run after another, so the first has finished when the second is stopped.
    sweep = tmp_path / "sweep"
    args = ["-m", *RUN, "model=plain20,resnet20", f"hydra.sweep.dir={sweep}", "hydra/launcher=basic"]
    process = start_process("train", *args, cwd=tmp_path)
    second = None
    deadline = time.monotonic() + 180
    while second is None:  # the second run's directory, once it has a checkpoint
        found = [p.parent for p in sweep.glob("*resnet20*/checkpoint.pt")]
        second = found[0] if found else None
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM and f"hydra.sweep.dir={sweep}" in stderr
    [first] = [p.parent for p in sweep.glob("*plain20*/metrics.json")]
    first_metrics = (first / "metrics.json").read_bytes()
    assert not (second / "metrics.json").exists()

    again = resexp("train", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "plain20 finished already" in again.stdout and "resuming" in again.stdout
    assert sorted(path.name for path in sweep.iterdir() if path.is_dir()) == [
        "plain20",
        "resnet20-A",
    ]  # basic: same names
    assert (first / "metrics.json").read_bytes() == first_metrics
    assert json.loads((second / "metrics.json").read_text())["iterations"] == RUN_ITERATIONS


@pytest.mark.slow
def test_a_stopped_shared_gpu_sweep_checkpoints_every_run_and_resumes_them(tmp_path):
    # The default launcher trains the runs at once: a SIGTERM stops and checkpoints all of them.
    sweep = tmp_path / "sweep"
    args = ["-m", *RUN, "model=plain20,resnet20", f"hydra.sweep.dir={sweep}"]
    stderr = stop_midway(args, sweep, 2)
    assert f"resume: run the same sweep again with hydra.sweep.dir={sweep}" in stderr
    run_dirs = sorted(p.parent for p in sweep.glob("*/checkpoint.pt"))
    assert len(run_dirs) == 2 and not list(sweep.glob("*/metrics.json"))
    stopped_at = [checkpoint.load(run / runs.CHECKPOINT)["progress"]["iteration"] for run in run_dirs]
    assert all(0 < iteration < RUN_ITERATIONS for iteration in stopped_at)

    again = resexp("train", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("resuming") == 2
    assert [json.loads((run / "metrics.json").read_text())["iterations"] for run in run_dirs] == [RUN_ITERATIONS] * 2
    for run in run_dirs:  # every TensorBoard point once, resumed or not
        steps = [step for step, _ in scalars(run)["error/train"]]
        assert steps == sorted(set(steps)) and steps[-1] == RUN_ITERATIONS


def test_a_sweep_stopped_in_its_first_batch_leaves_no_directory_for_the_second(tmp_path):
    # max_runs=1: seed=1 is prepared (its directory made) before seed=0 trains; the stop takes it back.
    sweep = tmp_path / "sweep"
    stop_midway(["-m", *RUN, "seed=0,1", "hydra.launcher.max_runs=1", f"hydra.sweep.dir={sweep}"], sweep, 1)
    run_dirs = [path for path in sweep.iterdir() if path.is_dir()]
    assert len(run_dirs) == 1 and run_dirs[0].name.endswith("seed0") and (run_dirs[0] / runs.CHECKPOINT).is_file()


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/resexp-pwned-by-checkpoint")


def test_a_malicious_checkpoint_is_refused_and_never_executed(tmp_path):
    MARKER.unlink(missing_ok=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / "checkpoint.pt", "wb") as file:
        pickle.dump({"version": 1, "model": Payload()}, file)
    torch.save({"version": 1, "model": Payload()}, tmp_path / "zipped.pt")  # the zip format torch.save writes
    for path in (run_dir / "checkpoint.pt", tmp_path / "zipped.pt"):
        with pytest.raises(ResexpError, match="is not a readable resexp checkpoint"):
            checkpoint.load(path)
    result = resexp("train", *RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2 and "is not a readable resexp checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not MARKER.exists()


@pytest.fixture(scope="module")
def saved(straight) -> Path:
    return straight / "checkpoint.pt"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoints_are_a_clear_error(tmp_path, saved, damage):
    path = tmp_path / "checkpoint.pt"
    data = saved.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00\x01junk" * 100, "empty": b""}[damage])
    with pytest.raises(
        ResexpError, match=f"{path} is not a readable resexp checkpoint .*; move it away to start this run over"
    ):
        checkpoint.load(path)


def test_checkpoints_of_another_version_are_refused(tmp_path):
    torch.save({"version": 0, "model": {}}, tmp_path / "old.pt")
    with pytest.raises(ResexpError, match="is a checkpoint of version 0; this resexp reads versions 1 to 2"):
        checkpoint.load(tmp_path / "old.pt")


def test_a_version_1_checkpoint_is_read_with_its_identity_under_the_new_name(tmp_path):
    # Version 1 stored the run's identity as "experiment"; nothing else in the layout changed.
    torch.save({"version": 1, "experiment": {"seed": 3}, "model": {"w": torch.ones(2)}}, tmp_path / "v1.pt")
    state = checkpoint.load(tmp_path / "v1.pt", layout={"identity": dict, "model": dict})
    assert state["identity"] == {"seed": 3} and "experiment" not in state and state["version"] == checkpoint.VERSION


@pytest.mark.parametrize(
    "override, difference",
    [
        ("model=plain20", "model.residual: True there, False now"),
        ("shortcut=B", "shortcut: 'identity' there, 'projection' now"),
        ("seed=3", "seed: 0 there, 3 now"),
    ],
)
def test_a_checkpoint_of_another_experiment_is_refused(tmp_path, straight, override, difference):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes((straight / "checkpoint.pt").read_bytes())
    result = resexp("train", *RUN, override, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "belongs to another experiment" in result.stderr and difference in result.stderr
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".hydra" and p.name != "train.log") == [
        "checkpoint.pt"
    ]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        # what torch.save raises when its zip writer meets a full disk
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    ],
    ids=["oserror", "torch-runtimeerror"],
)
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"model": {"w": torch.ones(3)}})

    def full_disk(obj, file):
        file.write(b"partial bytes")
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    reason = "No space left on device" if isinstance(failure, OSError) else "file write failed"
    with pytest.raises(ResexpError, match=f"{path} \\(.*{reason}.*\\); the previous checkpoint .* is intact"):
        checkpoint.save(path, {"model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path, layout={"model": dict})["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 256 KiB filesystem (tmpfs), where this machine lets the tests mount one (as root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip() or made.returncode}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_keeps_the_previous_checkpoint(small_filesystem):
    path = small_filesystem / "checkpoint.pt"
    checkpoint.save(path, {"model": {"w": torch.ones(3)}})
    with pytest.raises(ResexpError, match=f"could not write the checkpoint {path} .*; the previous checkpoint"):
        checkpoint.save(path, {"model": {"w": torch.zeros(200_000)}})  # 800 KB: does not fit
    assert torch.equal(checkpoint.load(path, layout={"model": dict})["model"]["w"], torch.ones(3))
    assert [p.name for p in small_filesystem.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_an_unwritable_run_directory_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = resexp("train", *RUN, f"hydra.run.dir={blocker / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("resexp: error: cannot write") and "hydra.run.dir" in line


def test_a_run_killed_before_its_first_checkpoint_starts_over_without_its_stale_points(tmp_path):
    # The killed attempt's curve points are in the directory, with no checkpoint to continue from.
    run_dir, clean = tmp_path / "run", tmp_path / "clean"
    stale = SummaryWriter(str(run_dir))
    for step in (2, 4):
        stale.add_scalar("error/train", 55.5, step)
        stale.add_scalar("lr", 7.0, step)
    stale.close()
    for directory in (run_dir, clean):
        assert resexp("train", *SHRINK, f"hydra.run.dir={directory}", cwd=tmp_path).returncode == 0
    mine, theirs = scalars(run_dir), scalars(clean)
    assert mine["error/train"] == theirs["error/train"] and mine["lr"] == theirs["lr"]  # one point per step


def test_a_session_opens_its_event_file_after_the_previous_ones_second(tmp_path):
    # TensorBoard reads a run's event files in name order; names begin with the second they were opened.
    now = int(time.time())
    (tmp_path / f"{EVENTS}{now}.host.99999.0").write_bytes(b"")  # would sort after a new file of this second
    open_writer(tmp_path, 5).close()
    [new] = [path for path in tmp_path.glob(f"{EVENTS}*") if ".99999." not in path.name]
    assert int(new.name.removeprefix(EVENTS).split(".")[0]) > now


@pytest.mark.parametrize("change", ["seed=1", "resume=false"])
def test_a_refused_start_leaves_the_run_directory_byte_for_byte(tmp_path, change):
    run_dir = tmp_path / "run"
    assert resexp("train", *SHRINK, f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    before = files_of(run_dir)
    result = resexp("train", *SHRINK, change, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert files_of(run_dir) == before  # its saved config still describes its checkpoint


@pytest.mark.parametrize("launcher", ["shared_gpu", "basic"])
def test_a_refused_sweep_leaves_its_directory_byte_for_byte(tmp_path, launcher):
    sweep, args = tmp_path / "sweep", ["-m", *SHRINK, "seed=0,1", f"hydra/launcher={launcher}"]
    assert resexp("train", *args, f"hydra.sweep.dir={sweep}", cwd=tmp_path).returncode == 0
    before = files_of(sweep)
    result = resexp("train", *args, "optim.momentum=0.8", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 2 and "belongs to another experiment" in result.stderr, result.stderr
    assert files_of(sweep) == before  # the runs' saved configs and logs, and the sweep's record


def test_a_wide_resnet_with_dropout_resumes_bit_identical(tmp_path):
    assert_resumes_bit_identical(
        tmp_path, ["model=wrn16-8", "model.depth=8", "model.widths=[16,16,32,64]", "model.dropout=0.3"]
    )


@pytest.mark.slow
def test_a_dropout_sweep_on_the_shared_gpu_launcher_resumes_exactly_and_each_run_is_the_run_alone(tmp_path):
    """Dropout draws from torch's global generator, which preparing the next run of a batch reseeds: each
    run's generators are put back right before its first step (resexp/jobs.py)."""
    net = ["model.depth=8", "model.dropout=0.3"]
    sweep = tmp_path / "sweep"
    args = ["-m", *RUN, *net, "seed=0,1", f"hydra.sweep.dir={sweep}"]
    stop_midway(args, sweep, 1)  # in seed 0's run, which trains in a batch of its own
    again = resexp("train", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    for seed in (0, 1):
        alone = tmp_path / f"alone{seed}"
        result = resexp("train", *RUN, *net, f"seed={seed}", f"hydra.run.dir={alone}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert_same_run(sweep / f"resnet8-A-dropout0.3_seed{seed}", alone)
