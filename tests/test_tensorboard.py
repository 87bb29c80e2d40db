"""What TensorBoard shows of a sweep: run names that say what each run is and only what the sweep varies,
a CUSTOM SCALARS layout that sets plain against residual by depth, and an HPARAMS table of the
hyperparameters that tell the runs apart; all read back from the event files with TensorBoard's readers."""

import json

import pytest
from helpers import SHRINK, resexp, scalars
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from resexp.resolvers import at_fractions, sweep_run_name


def sweep(tmp_path, *overrides):
    directory = tmp_path / "sweep"
    result = resexp("train", "-m", *SHRINK, *overrides, f"hydra.sweep.dir={directory}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return directory, result


def names(directory):
    return sorted(path.parent.name for path in directory.glob("*/metrics.json"))


def events(run_dir):
    accumulator = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    return accumulator


def hparams_data(run_dir, tag):
    content = events(run_dir).SummaryMetadata(tag).plugin_data.content
    return HParamsPluginData.FromString(content)


def layout(run_dir):
    accumulator = events(run_dir)
    proto = layout_pb2.Layout()
    proto.ParseFromString(accumulator.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return {
        category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
        for category in proto.category
    }


def test_sweep_runs_are_named_by_the_net_and_what_else_varies(tmp_path):
    directory, result = sweep(tmp_path, "model=plain20,resnet20", "seed=0,3")
    assert names(directory) == ["plain20_seed0", "plain20_seed3", "resnet20-A_seed0", "resnet20-A_seed3"]
    assert "resnet20-A_seed3: done" in result.stdout  # log lines and progress bars use the same names
    # The same command again finds its runs by these names: all finished, nothing trained.
    again = resexp(
        "train", "-m", *SHRINK, "model=plain20,resnet20", "seed=0,3", f"hydra.sweep.dir={directory}", cwd=tmp_path
    )
    assert again.returncode == 0 and again.stdout.count("finished already") == 4, again.stdout


def test_a_presets_sweep_and_a_missing_record_still_give_distinct_names(tmp_path):
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task: []\n  sweeper:\n    params:\n      model: a,b\n"
    )
    args = (["model=plain56", "data=synthetic"], {"residual": False, "depth": 56}, "identity")
    assert sweep_run_name(str(tmp_path), *args) == "plain56"  # the preset's sweep: the net says it all
    # Without the sweep's record every override of the run names it.
    assert sweep_run_name(str(tmp_path / "none"), *args) == "plain56_data-synthetic"
    # A plain net has no shortcut, so a swept shortcut must be named.
    (tmp_path / "multirun.yaml").write_text("hydra:\n  overrides:\n    task: ['shortcut=A,B']\n")
    assert sweep_run_name(str(tmp_path), ["shortcut=B"], {"residual": False, "depth": 20}, "B") == "plain20_shortcut-B"
    assert (
        sweep_run_name(str(tmp_path), ["shortcut=B"], {"residual": True, "depth": 20}, "B") == "resnet20-B"
    )  # a ResNet's name says it
    # A sweep that an older resexp named by every override keeps its runs' directories, so it resumes.
    (tmp_path / "shortcut=B").mkdir()
    (tmp_path / "shortcut=B" / "checkpoint.pt").write_bytes(b"")
    assert (
        sweep_run_name(str(tmp_path), ["shortcut=B"], {"residual": True, "depth": 20}, "B", old_name="shortcut=B")
        == "shortcut=B"
    )
    assert (
        sweep_run_name(str(tmp_path), ["shortcut=A"], {"residual": True, "depth": 20}, "A", old_name="shortcut=A")
        == "resnet20-A"
    )


def test_a_directory_two_runs_would_share_is_refused(tmp_path):
    # hydra.sweep.subdir=same puts both runs of the sweep into one directory
    directory = tmp_path / "sweep"
    result = resexp(
        "train", "-m", *SHRINK, "shortcut=B,projection", f"hydra.sweep.dir={directory}",
        "hydra.sweep.subdir=same", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and "would write to" in result.stderr and "same" in result.stderr, result.stderr
    assert not list(directory.glob("*/checkpoint.pt"))


@pytest.mark.parametrize(
    ("iterations", "fractions", "expected"),
    [(64_000, (0.5, 0.75), [32_000, 48_000]), (100, (0.5, 0.75), [50, 75]), (1000, (0.25, 0.5), [250, 500]),
     (2, (0.5, 0.75), [1]), (1, (0.5, 0.75), [])],
)  # fmt: skip
def test_milestones_scale_with_the_run(iterations, fractions, expected):
    assert at_fractions(iterations, *fractions) == expected


def test_the_layout_sets_plain_against_residual_by_depth(tmp_path):
    directory, _ = sweep(tmp_path, "model=plain20,resnet20,plain32")
    plain20, resnet20, plain32 = (directory / name for name in ("plain20", "resnet20-A", "plain32"))
    depth, panels = "plain vs residual, by depth", "plain nets and ResNets"
    # one chart per depth and error, each a line per run: plain-20's and ResNet-20's test errors, ...
    assert layout(plain20)[depth] == {
        "20 layers, test error (%): plain against residual": ["^plain vs residual/20 layers/[^/]+/test$"],
        "20 layers, training error (%): plain against residual": ["^plain vs residual/20 layers/[^/]+/train$"],
    }
    assert list(layout(plain32)[depth]) == [
        "32 layers, test error (%): plain against residual",
        "32 layers, training error (%): plain against residual",
    ]
    assert layout(resnet20)[panels]["ResNets: training and test error (%)"] == ["^plain vs residual/[^/]+/residual/"]
    # The tags those charts select: the 20-layer chart gets plain-20's and ResNet-20's curves, no others.
    tags = {name: set(scalars(directory / name)) for name in ("plain20", "resnet20-A", "plain32")}
    assert {"plain vs residual/20 layers/plain/train", "plain vs residual/20 layers/plain/test"} <= tags["plain20"]
    assert {"plain vs residual/20 layers/residual/test"} <= tags["resnet20-A"]
    assert not any(tag.startswith("plain vs residual/20") for tag in tags["plain32"])
    # A mirror holds the same points as the curve it mirrors.
    curves = scalars(plain20)
    assert curves["plain vs residual/20 layers/plain/test"] == curves["error/test"]


def test_hparams_show_what_tells_runs_apart_and_the_final_and_best_errors(tmp_path):
    directory, _ = sweep(tmp_path, "model=plain20,resnet20", "optim.lr=0.1,0.05")
    assert names(directory) == ["plain20_lr0.05", "plain20_lr0.1", "resnet20-A_lr0.05", "resnet20-A_lr0.1"]
    run = directory / "resnet20-A_lr0.05"
    experiment = hparams_data(run, hparams_metadata.EXPERIMENT_TAG).experiment
    assert [info.name for info in experiment.hparam_infos] == [
        "net",
        "residual",
        "depth",
        "shortcut",
        "seed",
        "data",
        "iterations",
        "optim.lr",
    ]
    # TensorBoard shows five columns at first, those marked as differing first: what the net's name says is not
    differing = [info.name for info in experiment.hparam_infos if info.differs]
    assert differing == ["net", "seed", "data", "iterations", "optim.lr"]
    metrics = [info.name.tag for info in experiment.metric_infos]
    assert metrics == ["error/train", "error/test", "result/best_error_train", "result/best_error_test"]
    start = hparams_data(run, hparams_metadata.SESSION_START_INFO_TAG).session_start_info
    values = {
        key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
        for key, value in start.hparams.items()
    }
    assert values == {
        "net": "resnet20-A",
        "residual": "true",
        "depth": 20,
        "shortcut": "identity",
        "seed": 0,
        "data": "synthetic",
        "iterations": 4,
        "optim.lr": 0.05,
    }
    curves, metrics_json = scalars(run), json.loads((run / "metrics.json").read_text())
    assert curves["result/best_error_test"] == [(4, min(value for _, value in curves["error/test"]))]
    assert metrics_json["best"]["error/train"] == pytest.approx(min(value for _, value in curves["error/train"]))


def test_a_lone_run_shows_the_net_its_data_and_length_and_what_its_command_line_set(tmp_path):
    run_dir = tmp_path / "run"
    assert resexp("train", *SHRINK, "model=plain20", f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    experiment = hparams_data(run_dir, hparams_metadata.EXPERIMENT_TAG).experiment
    shown = ["net", "residual", "depth", "shortcut", "seed", "data", "iterations", "schedule.milestones"]
    assert [info.name for info in experiment.hparam_infos] == shown  # not log_every, eval_points: how it ran
