"""A run directory that someone else hands over (a colleague's sweep, a tarball, a cluster's scratch space)
is data, never code: its saved overrides run nothing, a link planted in it redirects no write, its saved
config leaks nothing of the reader's environment, and names in it do not become lines, formulas or markup
in a report. Each crafted directory is real, made by the test; each case asserts that nothing ran, that
nothing outside the directory changed, and that what the user sees is one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from helpers import SHRINK, assert_one_line_error, copy_of, files_of, resexp

from resexp import checkpoint, config, runs


@pytest.fixture(scope="module")
def handed(tmp_path_factory) -> Path:
    """A small finished run, as it would be handed over; tests copy it, never change it."""
    run_dir = tmp_path_factory.mktemp("handed") / "run"
    result = resexp("train", *SHRINK, "model.depth=8", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture
def payload(tmp_path) -> Path:
    """Code a crafted directory ships, each piece of which leaves a file `ran` when it runs: a .pth file
    (site.addsitedir runs its import lines), a torch.hub hubconf.py, a config group of its own."""
    folder = tmp_path / "payload"
    (folder / "conf" / "model").mkdir(parents=True)
    marker = tmp_path / "ran"
    (folder / "evil.pth").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('pth')\n")
    (folder / "hubconf.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('hub')\ndef x():\n    return None\n"
    )
    (folder / "conf" / "model" / "resnet20.yaml").write_text(
        "_target_: os.system\ncommand: touch " + str(marker) + "\ndepth: 20\n"
    )
    return folder


def attacks(payload: Path, victim: Path) -> list[list[str]]:
    """Saved overrides, each of which ran code or wrote a file when resexp composed and instantiated them."""
    return [
        [f"+data.foo={{_target_: site.addsitedir, _args_: [{payload}]}}"],
        [f"+data.hub={{_target_: torch.hub.load, repo_or_dir: {payload}, model: x, source: local}}"],
        [f"+data.w={{_target_: pathlib.Path.write_text, _args_: [{victim}, owned]}}"],
        [f"++optim.x={{_target_: builtins.open, file: {victim}, mode: w}}"],
        ["data=imagenet", f"data.workers={{_target_: site.addsitedir, _args_: [{payload}]}}"],  # no + needed
        [f"hydra.searchpath=[file://{payload / 'conf'}]"],
        ["data._target_=os.system"],
        ["~seed"],
        ["data.root=${oc.env:HOME}"],
        ["data@foo=synthetic"],
        ["model=../../payload/conf/model/resnet20"],
    ]


def crafted(handed: Path, where: Path, overrides: list[str]) -> Path:
    """A copy of the handed run whose saved overrides also hold `overrides`."""
    run_dir = copy_of(handed, where)
    path = run_dir / runs.HYDRA / "overrides.yaml"
    path.write_text(yaml.safe_dump([*yaml.safe_load(path.read_text()), *overrides]))
    return run_dir


@pytest.mark.parametrize("command", [["eval"], ["export"], ["analyze", "--images", "8", "--points", "2"]])
def test_saved_overrides_that_would_run_code_are_refused_and_nothing_runs(tmp_path, handed, payload, command):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    for index, overrides in enumerate(attacks(payload, victim)):
        run_dir = crafted(handed, tmp_path / f"run{index}", overrides)
        before = files_of(tmp_path)
        result = resexp(command[0], str(run_dir), *command[1:], cwd=tmp_path)
        assert_one_line_error(result, str(run_dir / runs.HYDRA / "overrides.yaml"))
        assert not (tmp_path / "ran").exists(), (overrides, (tmp_path / "ran").read_text())
        assert files_of(tmp_path) == before, overrides  # nothing written, nothing truncated
    # The same directory with its own overrides back works: the refusals were the attacks'.
    result = resexp(command[0], str(crafted(handed, tmp_path / "fine", [])), *command[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_the_command_line_cannot_build_nodes_either(tmp_path, payload):
    """resexp instantiates nothing: a value that is a node is refused where a config is made, however given."""
    value = f"data.workers={{_target_: site.addsitedir, _args_: [{payload}]}}"
    result = resexp("train", *SHRINK, "data=imagenet", value, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line_error(result, "data.workers=", "is not a value")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "run").exists()


def test_a_report_resolves_nothing_in_a_saved_config_and_leaks_no_environment(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    secret = "4242"  # a number, as the keys it stands for: depth, iterations
    monkeypatch.setenv("RESEXP_TEST_SECRET", secret)
    run_dir = tmp_path / "runs" / "run"
    (run_dir / runs.HYDRA).mkdir(parents=True)
    leak = "${oc.env:RESEXP_TEST_SECRET}"
    saved = {
        "model": {"depth": leak, "residual": False, "stem": leak, "widths": leak},
        "shortcut": leak,
        "seed": leak,
        "schedule": {"iterations": leak, "batch_size": leak},
    }
    (run_dir / runs.HYDRA / "config.yaml").write_text(yaml.safe_dump(saved))
    (run_dir / runs.HYDRA / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": {"data": leak}}}})
    )
    with SummaryWriter(str(run_dir)) as writer:  # a point logged and a checkpoint: the report says how far it got
        writer.add_scalar("error/train", 50.0, 5)
    checkpoint.save(run_dir / runs.CHECKPOINT, {"progress": {"iteration": 5}})
    result = resexp("report", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = (tmp_path / "runs" / "results.md").read_text()
    assert secret not in result.stdout + result.stderr + written.replace(str(tmp_path), "")
    assert f"`{run_dir}` (?): stopped at iteration 5, checkpoint saved" in written  # what is known, and no more


@pytest.mark.parametrize(
    ("field", "value"),
    [("net", "x\n| injected | row |"), ("net", "=cmd|' /C calc'!A0"), ("data", "[red]markup[/]"), ("net", "`a`")],
)
def test_names_in_a_metrics_json_that_are_not_names_are_left_out(tmp_path, handed, field, value):
    run_dir = copy_of(handed, tmp_path / "runs" / "run")
    metrics = json.loads((run_dir / runs.METRICS).read_text())
    metrics[field] = value
    (run_dir / runs.METRICS).write_text(json.dumps(metrics))
    copy_of(handed, tmp_path / "runs" / "good")
    result = resexp("report", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "runs" / "results.md").read_text()
    csv_text = (tmp_path / "runs" / "results.csv").read_text()
    assert "injected" not in csv_text and "calc" not in csv_text and "markup" not in csv_text
    assert f"gives its {field} as" in table  # the run is named among those left out, the value quoted
    assert len([line for line in table.splitlines() if line.startswith("| synthetic")]) == 1  # the good run


# --- Links planted where resexp, or Hydra for it, writes


def plant(path: Path, victim: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    path.symlink_to(victim)


@pytest.mark.parametrize(
    "name",
    [
        ".hydra/config.yaml",
        ".hydra/hydra.yaml",
        ".hydra/overrides.yaml",
        ".hydra",
        "train.log",
        ".resexp.lock",
        "checkpoint.pt",
        "metrics.json",
        "events.out.tfevents.1700000000.host.1.0",
    ],
)
def test_a_run_directory_with_a_planted_link_is_refused_and_the_linked_file_is_untouched(tmp_path, handed, name):
    victim = tmp_path / "bashrc"
    victim.write_text("the user's shell setup\n")
    if name == ".hydra":  # a folder link: Hydra would write its three files into the linked folder
        victim = tmp_path / "dotfiles"
        victim.mkdir()
    run_dir = copy_of(handed, tmp_path / "run")
    (run_dir / runs.METRICS).unlink()  # a stopped run: `train` resumes it
    plant(run_dir / name, victim)
    before = files_of(tmp_path)
    result = resexp("train", *SHRINK, "model.depth=8", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line_error(result, str(run_dir / name))
    assert files_of(tmp_path) == before and (run_dir / name).is_symlink()


def test_a_sweep_directory_with_a_planted_link_is_refused(tmp_path):
    victim = tmp_path / "bashrc"
    victim.write_text("the user's shell setup\n")
    sweep = tmp_path / "sweep"
    for name in (runs.SWEEP_RECORD, "resnet8-A_seed1/.hydra/config.yaml"):
        plant(sweep / name, victim)
        before = files_of(tmp_path)
        result = resexp("train", "-m", *SHRINK, "model.depth=8", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
        assert_one_line_error(result, str(sweep / name), "symbolic link")
        assert files_of(tmp_path) == before
        (sweep / name).unlink()


def test_reports_analyses_and_exports_replace_planted_links_instead_of_writing_through_them(tmp_path, handed):
    victim = tmp_path / "bashrc"
    victim.write_text("the user's shell setup\n")
    run_dir = copy_of(handed, tmp_path / "run")
    outputs = ["results.md", "results.csv", "figure_synthetic.png", "figure_synthetic.svg", "analysis.json",
               "analysis.md", "responses.png", "gradients.svg", "landscape.png", "resnet8-A.pt"]  # fmt: skip
    for name in outputs:
        plant(run_dir / name, victim)
    for command in (["report"], ["analyze", "--images", "8", "--points", "2"], ["export"]):
        result = resexp(command[0], str(run_dir), *command[1:], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert victim.read_text() == "the user's shell setup\n"
    for name in outputs:
        assert not (run_dir / name).is_symlink() and (run_dir / name).stat().st_size > 0, name
    assert not list(run_dir.glob(".*.tmp")), "no temporary left behind"


def test_a_checkpoint_or_metrics_that_is_a_fifo_is_refused_instead_of_blocking(tmp_path, handed):
    run_dir = copy_of(handed, tmp_path / "run")
    (run_dir / runs.METRICS).unlink()
    (run_dir / runs.CHECKPOINT).unlink()
    os.mkfifo(run_dir / runs.CHECKPOINT)  # a reader that opened it as a file would wait for a writer forever
    result = resexp("train", *SHRINK, "model.depth=8", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line_error(result, str(run_dir / runs.CHECKPOINT), "is not a regular file")
    (run_dir / runs.CHECKPOINT).unlink()
    shutil.copy(handed / runs.CHECKPOINT, run_dir / runs.CHECKPOINT)
    os.mkfifo(run_dir / runs.METRICS)
    report = resexp("report", str(run_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert f"{runs.METRICS} is not a regular file" in (run_dir / "results.md").read_text()


def test_tensorboard_files_that_are_links_or_fifos_are_not_read(tmp_path, handed):
    """TensorBoard's reader follows links and would wait on a FIFO forever: such a run has no curves."""
    run_dir = copy_of(handed, tmp_path / "run")
    os.mkfifo(run_dir / "events.out.tfevents.1700000000.host.1.0")
    (run_dir / "events.out.tfevents.1700000001.host.1.0").symlink_to("/dev/zero")
    assert runs.read_curves(run_dir) == {}
    report = resexp("report", str(run_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr


# --- The runs of the relatives, read back


@pytest.mark.parametrize(
    "net",
    [
        ["model=wrn16-8", "model.widths=[16,32,64,128]"],
        [
            "model=resnext29-8x64d",
            "model.depth=11",
            "model.widths=[8,8,16,16]",
            "model.cardinality=4",
            "model.base_width=16",
        ],
    ],  # fmt: skip
    ids=["wrn", "resnext"],
)
def test_wide_resnet_and_resnext_runs_evaluate_export_and_analyze(tmp_path, net):
    run_dir = tmp_path / "run"
    result = resexp("train", *SHRINK, "schedule.batch_size=8", *net, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    evaluated = resexp("eval", str(run_dir), "--json", "-", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    error = json.loads((run_dir / runs.METRICS).read_text())["final"]["error/test"]
    assert json.loads(evaluated.stdout)[0]["error"] == error
    exported = resexp("export", str(run_dir), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    analyzed = resexp("analyze", str(run_dir), "--images", "8", "--points", "2", "--draws", "1", cwd=tmp_path)
    assert analyzed.returncode == 0, analyzed.stderr


# --- What used to end in a traceback: one line, exit 2


def test_a_report_to_a_folder_it_cannot_make_is_one_line(tmp_path, handed):
    (tmp_path / "file").write_text("")
    result = resexp("report", str(handed), "--out", str(tmp_path / "file" / "out"), cwd=tmp_path)
    assert_one_line_error(result, "cannot write", "choose another --out")


def test_markup_in_a_run_directorys_name_is_shown_as_it_is(tmp_path, handed):
    run_dir = copy_of(handed, tmp_path / "run[" / "]x[bold]")  # rich's markup: "[/]" closes a style
    report = resexp("report", str(run_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    evaluated = resexp("eval", str(run_dir), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "run[/]x[bold]" in "".join(evaluated.stdout.split())  # the table may wrap the name


def test_a_checkpoint_whose_iteration_is_not_a_count_is_one_line(tmp_path, handed):
    run_dir = copy_of(handed, tmp_path / "run")
    state = checkpoint.load(run_dir / runs.CHECKPOINT)
    state["progress"]["iteration"] = "7"
    checkpoint.save(run_dir / runs.CHECKPOINT, state)
    assert_one_line_error(resexp("eval", str(run_dir), cwd=tmp_path), "iteration='7', not a count of steps")


def test_non_finite_weights_are_neither_evaluated_nor_exported(tmp_path, handed):
    run_dir = copy_of(handed, tmp_path / "run")
    state = checkpoint.load(run_dir / runs.CHECKPOINT)
    state["model"]["fc.weight"][0, 0] = float("nan")
    checkpoint.save(run_dir / runs.CHECKPOINT, state)
    for command in ("eval", "export"):
        assert_one_line_error(resexp(command, str(run_dir), cwd=tmp_path), "holds non-finite weights (fc.weight)")


def test_analyze_refuses_a_plane_that_would_not_fit_in_memory(tmp_path, handed):
    result = resexp("analyze", str(handed), "--plane", "100000", cwd=tmp_path)
    assert_one_line_error(result, "--plane=100000 must be at most 101")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["model=densenet40-12", "model.compression=0.001"], "leaves a transition no maps"),
        (["model.widths=[16,100000000,100000000,100000000]"], "parameters, which need more than the"),
        (["model.widths=[16,1000000000000,1000000000000,1000000000000]"], "too large to build"),
        (["model=densenet40-12", "model.growth_rate=100000000"], "a smaller model.growth_rate"),
        (["shortcut=gated", "model.gate_bias=1e300"], "model.gate_bias=1e+300 must be a number in [-100, 100]"),
        (["model.gate_bias=-3"], "sets the gates of shortcut=gated, and shortcut is identity"),
        (["optim.nesterov=true", "optim.momentum=0"], "optim.nesterov=true needs momentum"),
        (["sync_bn=true"], "sync_bn=true normalizes over the processes"),
    ],
)
def test_nets_and_settings_that_cannot_train_are_one_line_and_leave_no_run(tmp_path, arguments, message):
    run_dir = tmp_path / "run"
    result = resexp("train", *SHRINK, *arguments, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line_error(result, message)
    assert not run_dir.exists()


# --- Nothing half-made, and words that are true


def test_a_stop_just_after_hydra_wrote_the_run_directory_takes_it_back(tmp_path, monkeypatch):
    from resexp.errors import Interrupted

    def stopped(*args):  # among the first things a run's task does, once Hydra has written its directory
        raise Interrupted(signal.SIGTERM, training=False)

    monkeypatch.setattr(config, "place", stopped)
    result = resexp("train", *SHRINK, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 128 + signal.SIGTERM and "nothing half-made is left" in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_data_met_in_training_leaves_no_half_made_run(tmp_path, monkeypatch):
    from resexp.data import synthetic
    from resexp.errors import ResexpError

    def breaking(**settings):
        data = synthetic(**settings)
        batches, taken = data.train, []

        class Broken:
            def __next__(self):
                taken.append(1)
                if len(taken) == 3:
                    raise ResexpError("/data/img_3.JPEG is not a readable image (truncated); remove or replace it")
                return next(batches)

            state_dict, load_state_dict = batches.state_dict, batches.load_state_dict

        data.train = Broken()
        return data

    schema = config.DATA_BUILDERS["resexp.data.synthetic"][1]
    monkeypatch.setitem(config.DATA_BUILDERS, "resexp.data.synthetic", (breaking, schema))
    result = resexp("train", *SHRINK, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line_error(result, "img_3.JPEG is not a readable image")
    assert not (tmp_path / "run").exists()


def test_a_full_disk_as_hydra_writes_the_run_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    import errno

    import hydra.core.utils

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / ".hydra" / "config.yaml"))

    monkeypatch.setattr(hydra.core.utils, "_save_config", full)
    result = resexp("train", *SHRINK, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line_error(result, "No space left on device", "free some space there, then run the same command")
    assert not (tmp_path / "run").exists()


def test_a_full_disk_under_tensorboards_writes_is_one_line_without_the_writer_threads_traceback(tmp_path, monkeypatch):
    import errno

    from tensorboard.summary.writer.record_writer import RecordWriter

    written = []

    def write(self, data):
        written.append(data)
        if len(written) > 4:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RecordWriter, "write", write)
    result = resexp("train", *SHRINK, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line_error(result, "could not write the run's TensorBoard curves", "No space left on device")
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()  # failed before its first checkpoint: no run


def test_an_analysis_that_cannot_finish_writing_leaves_the_older_one_whole(tmp_path, handed, monkeypatch):
    import errno

    from resexp import analyze

    run_dir = copy_of(handed, tmp_path / "run")
    assert resexp("analyze", str(run_dir), "--images", "8", "--points", "2", cwd=tmp_path).returncode == 0
    before = files_of(run_dir)
    saved = analyze.save_figure
    calls = []

    def filling(figure, path, dpi=150):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return saved(figure, path, dpi)

    monkeypatch.setattr(analyze, "save_figure", filling)
    result = resexp("analyze", str(run_dir), "--images", "8", "--points", "3", cwd=tmp_path)
    assert_one_line_error(result, "No space left on device")
    assert files_of(run_dir) == before  # the older analysis whole, no newer file beside it


def test_resume_advice_quotes_a_path_with_a_space_so_that_the_shell_and_hydra_read_it_back(tmp_path):
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    sweep = tmp_path / "my sweeps" / "fig 6"
    advice = config.resume_command(OmegaConf.create({"mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep)}}))
    [argument] = shlex.split(advice.split(" with ", 1)[1])
    assert OverridesParser.create().parse_override(argument).value() == str(sweep)


def test_a_net_too_large_for_the_device_is_counted_without_memory(monkeypatch):
    from resexp import models
    from resexp.errors import ResexpError

    monkeypatch.setattr(models, "free_memory", lambda device: 2**20)  # a megabyte free
    with pytest.raises(ResexpError, match=r"resnet20-A has 269,722 parameters, which need more than the 0\.0 GiB"):
        models.check_size(models.NetSpec(20, True, "basic", "cifar", "identity", 10), torch.device("cpu"))
