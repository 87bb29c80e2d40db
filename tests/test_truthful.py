"""What resexp shows is true (issue 35): a run's state as its directory holds it, said alike by report, eval
and analyze; rows and curves of one net trained two ways kept apart; typos and sweep presets refused in one
line; notes only about what the user set; the version asked for."""

from __future__ import annotations

import json
import re
import signal

import pytest
import torch
from helpers import SHRINK, assert_one_line_error, resexp, start, wait_for

from resexp import plots, runs
from resexp.report import report
from resexp.runs import record_end, state


def test_a_stopped_run_is_stopped_at_its_checkpoint_in_report_eval_and_analyze(tmp_path):
    run_dir = tmp_path / "sweep" / "run"
    run_dir.parent.mkdir()
    process = start(run_dir)  # helpers.RUN: 60 iterations, checkpointed every 7
    wait_for(run_dir / runs.CHECKPOINT, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    stopped_at = int(stderr.split("at iteration ")[1].split(",")[0])
    # train.log says how the run ended, and State reads it with the checkpoint's iteration
    assert f"][END] stopped by SIGTERM at iteration {stopped_at}, checkpoint saved" in (run_dir / runs.LOG).read_text()
    said = state(run_dir)
    assert (said.finished, said.iteration, said.planned) == (False, stopped_at, 60)
    assert str(said).startswith(
        f"stopped at iteration {stopped_at} of 60, checkpoint saved, resumable in this directory"
    )

    result = resexp("report", str(tmp_path / "sweep"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"stopped at iteration {stopped_at} of 60" in (tmp_path / "sweep" / "results.md").read_text()
    assert "failed" not in (tmp_path / "sweep" / "results.md").read_text()
    evaluated = resexp("eval", str(run_dir), "--json", "-", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert {row["state"] for row in json.loads(evaluated.stdout)} == {f"stopped at {stopped_at} of 60"}
    flags = ["--images", "16", "--train-batches", "1", "--draws", "1", "--points", "3", "--device", "cpu"]
    analyzed = resexp("analyze", str(run_dir), *flags, "--out", str(tmp_path / "analysis"), cwd=tmp_path)
    assert analyzed.returncode == 0, analyzed.stderr
    assert f"| stopped at {stopped_at} of 60 |" in (tmp_path / "analysis" / "analysis.md").read_text()


def test_a_run_without_a_checkpoint_says_how_it_ended_where_its_log_does(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert str(state(run_dir)) == "ended before its first checkpoint"
    record_end(run_dir, "failed: the loss is nan at iteration 3")
    record_end(run_dir, "stopped by\nSIGINT at once")  # one line, whatever the text holds
    assert str(state(run_dir)) == "ended before its first checkpoint: stopped by SIGINT at once"


def test_one_net_trained_for_two_lengths_is_two_rows_and_two_curves(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    for iterations in (4, 8):
        result = resexp(
            "train", *SHRINK, "model=resnet20", f"schedule.iterations={iterations}", "schedule.milestones=[2,3]",
            f"hydra.run.dir={sweep / f'run{iterations}'}", cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: drawn.append(figure) or path)
    rows = report([sweep])
    assert sorted((row.net, row.iterations, row.runs) for row in rows) == [("resnet20-A", 4, 1), ("resnet20-A", 8, 1)]
    assert "| 4 | 128 |" in (sweep / "results.md").read_text() and "| 8 | 128 |" in (sweep / "results.md").read_text()
    [figure] = drawn
    [axes] = figure.axes[:1]
    labels = sorted(line.get_label() for line in axes.lines if not line.get_label().startswith("_"))
    assert labels == ["ResNet-20 (4 it.)", "ResNet-20 (8 it.)"]
    longest = max(max(line.get_xdata()) for line in axes.lines)
    assert longest == 8  # the longer run's curve is drawn to its end, not cut to the points both share


def test_a_legend_promises_only_the_lines_it_draws():
    assert plots.legend_title({"error/test", "error/train"}, "error/test") == "bold: test, dashed: train"
    assert plots.legend_title({"error/test"}, "error/test") == "bold: test"  # a run shorter than log_every
    assert plots.legend_title({"error/val"}, "error/val") == "bold: val"


def test_a_curve_of_several_seeds_is_averaged_only_where_they_logged_the_same_iterations():
    same = plots.mean_curve([[(1, 10.0), (2, 20.0)], [(1, 30.0), (2, 40.0)]])
    assert same == [([1, 2], [20.0, 30.0])]
    apart = plots.mean_curve([[(1, 10.0), (2, 20.0)], [(1, 30.0), (2, 40.0), (3, 50.0)]])
    assert apart == [([1, 2], [10.0, 20.0]), ([1, 2, 3], [30.0, 40.0, 50.0])]  # each whole


def test_a_sweep_preset_without_m_is_one_line_naming_its_runs_and_leaves_nothing(tmp_path):
    result = resexp("train", "experiment=cifar10_fig6", cwd=tmp_path)
    assert_one_line_error(result, "experiment=cifar10_fig6 is a sweep of 9 runs (model)", "resexp train -m")
    assert not list(tmp_path.iterdir())
    shown = resexp("train", "experiment=cifar10_fig6", "--cfg", "job", cwd=tmp_path)  # one run's config: asked for
    assert shown.returncode == 0, shown.stderr


@pytest.mark.parametrize(("shortcut", "said"), [(None, False), ("shortcut=B", True)])
def test_a_plain_net_notes_a_shortcut_only_where_the_user_set_one(tmp_path, shortcut, said):
    run_dir = tmp_path / "run"
    given = [shortcut] if shortcut else []
    result = resexp("train", *SHRINK, "model=plain20", *given, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("plain20 is a plain net: shortcut=B has no effect" in result.stdout) is said
    assert ("has no effect" in result.stdout) is said


def test_train_version_is_resexps(tmp_path):
    import resexp as package

    result = resexp("train", "--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith(f"resexp {package.__version__} (Hydra ")


def test_a_sweep_whose_run_holds_another_experiment_is_told_of_hydra_sweep_dir(tmp_path):
    sweep = tmp_path / "sweep"
    first = resexp("train", "-m", *SHRINK, "seed=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = resexp(
        "train", "-m", *SHRINK, "seed=0", "optim.lr=0.2", "resume=true", f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    assert_one_line_error(again, "belongs to another experiment", "another hydra.sweep.dir")
    assert "hydra.run.dir" not in again.stderr


def test_the_documented_way_to_load_an_export_gives_the_trained_net(tmp_path):
    from helpers import REPO

    from resexp import checkpoint

    run_dir = tmp_path / "run"
    trained = resexp("train", *SHRINK, "model=resnet20", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    exported = resexp("export", str(run_dir), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    text = (REPO / "docs" / "checkpoints.md").read_text()
    snippet = text.split("## Loading an export", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert 'path = "' in snippet
    scope: dict = {}
    exec(re.sub(r'path = ".*"', f"path = {str(run_dir / 'resnet20-A.pt')!r}", snippet), scope)  # the page's code
    weights = checkpoint.load(run_dir / runs.CHECKPOINT)["model"]
    assert all(torch.equal(scope["net"].state_dict()[key], tensor) for key, tensor in weights.items())
    assert not scope["net"].training


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_analyze_shows_each_step_as_it_works(tmp_path, terminal):
    import io

    from rich.console import Console

    from resexp import analyze, config

    run_dir = tmp_path / "run"
    trained = resexp("train", *SHRINK, "model.depth=8", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    config.register()
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=terminal, width=200)
    budget = analyze.Budget(images=16, train_batches=1, draws=1, points=3)
    analyze.analyze([config.saved_run(run_dir, None)], tmp_path / "out", torch.device("cpu"), budget, console)
    shown = screen.getvalue()
    if terminal:  # rich's bar: the step, the count of steps and the time left
        assert "analyze: run: loss landscape" in shown and "5/5" in shown and "\x1b[" in shown
    else:  # a line per step, in order
        lines = [line.split(" (")[0] for line in shown.splitlines()]
        assert lines == [f"analyze {n}/5: run: {step}" for n, step in enumerate(analyze.STEPS, 1)]


@pytest.mark.parametrize("logged", [[], [{"iteration": 100, "norms": [1.0, 0.5]}]], ids=["none", "some"])
def test_the_gradient_figure_promises_thin_lines_only_where_it_draws_them(tmp_path, monkeypatch, logged):
    from resexp import analyze

    titles = []
    monkeypatch.setattr(analyze, "save_figure", lambda figure, path, dpi: titles.append(figure.axes[0].get_title()))
    result = {"run": str(tmp_path / "run"), "net": "resnet20-A", "residual": True, "depth": 20, "iteration": 4,
              "state": "finished", "responses": [1.0, 0.5], "gradients": {"initial": [1.0, 0.5], "trained": [1.0, 0.5],
              "logged": logged}, "lesion": {"error": 50.0, "single": [60.0], "random": [60.0]},
              "landscape": {"alpha": [0.0], "loss": [1.0]}}  # fmt: skip
    analyze.figures([result], tmp_path)
    [gradients] = [title for title in titles if title.startswith("Gradient flow")]
    assert ("thin:" in gradients) is bool(logged)


def test_a_run_that_failed_after_a_checkpoint_or_whose_checkpoint_is_damaged_says_so(tmp_path):
    from resexp import checkpoint

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoint.save(run_dir / runs.CHECKPOINT, {"progress": {"iteration": 2000}})
    record_end(run_dir, "failed: the loss is nan at iteration 2103")
    said = state(run_dir)
    assert said.short == "failed after 2,000" and str(said) == (
        "failed: the loss is nan at iteration 2103; its checkpoint of iteration 2,000 stands"
    )
    (run_dir / runs.CHECKPOINT).write_bytes(b"not a checkpoint")
    said = state(run_dir)
    assert said.short == "checkpoint unreadable" and str(said).startswith("its checkpoint cannot be read: ")
