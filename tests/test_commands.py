"""The commands around training: --version, shell completion, Hydra's flags told in one line, and a
trained run used outside resexp (resexp eval, resexp export into torchvision's ResNet)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import SHRINK, assert_one_line_error, resexp

import resexp as package
from resexp import checkpoint, runs
from resexp.errors import ResexpError
from resexp.models import NetSpec
from resexp.models.resnet import torchvision_keys
from resexp.step import choose_algorithms


def test_version(tmp_path):
    result = resexp("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"resexp {package.__version__}"


def complete(tmp_path, monkeypatch, line):
    """What bash's completion gets back for the line typed so far (Hydra's script calls `resexp -sc query=bash`)."""
    monkeypatch.setenv("COMP_LINE", line)
    monkeypatch.setenv("COMP_POINT", str(len(line)))
    result = resexp("-sc", "query=bash", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bash_completion_answers_for_resexp_train(tmp_path, monkeypatch):
    assert complete(tmp_path, monkeypatch, "resexp ") == ["train", "report", "eval", "export", "prepare", "analyze"]
    assert "model=" in complete(tmp_path, monkeypatch, "resexp train mo")
    options = complete(tmp_path, monkeypatch, "resexp train model=plain5")
    assert options == ["model=plain56"]
    assert complete(tmp_path, monkeypatch, "resexp report ") == []  # paths: the shell's own completion
    install = resexp("train", "-sc", "install=bash", cwd=tmp_path)
    # The script registers the command that answers the queries: `resexp`, not "resexp train" (two words).
    assert install.stdout.strip().splitlines()[-1].endswith("-F hydra_bash_completion resexp")


def test_two_of_hydras_modes_are_one_line(tmp_path):
    assert_one_line_error(resexp("train", "-m", "model=plain20,plain56", "--cfg", "job", cwd=tmp_path), "-m and --cfg")
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


def test_a_closed_pipe_ends_quietly(tmp_path):
    # `resexp train --help | head -1`, with the reader gone before resexp writes
    process = subprocess.Popen(
        [sys.executable, "-m", "resexp", "train", "--hydra-help"], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    process.stdout.close()
    error = process.stderr.read()
    assert process.wait(timeout=120) == 128 + 13 and error == "", error  # SIGPIPE's code, no message


def test_deterministic_mode_sets_torchs_flags(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # restored afterwards, whatever the test sets
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    try:
        choose_algorithms(True)
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.deterministic and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        choose_algorithms(False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


def test_eval_gives_the_runs_final_test_error_again(tmp_path):
    run_dir = tmp_path / "run"
    assert resexp("train", *SHRINK, "deterministic=true", f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    result = resexp("eval", str(run_dir), "--json", str(tmp_path / "eval.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [row] = json.loads((tmp_path / "eval.json").read_text())
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert (row["net"], row["iteration"], row["set"], row["views"]) == ("resnet20-A", 4, "test", 1)
    assert row["error"] == final["error/test"] and row["loss"] == pytest.approx(final["loss/test"], rel=1e-6)
    assert "resnet20-A" in result.stdout  # the table


def test_eval_of_a_directory_without_runs_is_one_line(tmp_path):
    assert_one_line_error(resexp("eval", str(tmp_path), cwd=tmp_path), "no run with a checkpoint.pt")


def saved_imagenet_run(run_dir, spec: NetSpec, overrides: list[str]):
    """A run directory as an ImageNet run leaves it: its overrides and a checkpoint of its weights."""
    (run_dir / runs.HYDRA).mkdir(parents=True)
    (run_dir / runs.HYDRA / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    torch.manual_seed(0)
    model = spec.build()
    for module in model.modules():  # BN statistics other than the defaults, so that their keys matter
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    identity = {"model.depth": spec.depth, "model.residual": spec.residual, "model.block": spec.block,
                "model.bottleneck_stride": spec.bottleneck_stride, "model.stem": spec.stem,
                "shortcut": spec.shortcut, "data.num_classes": spec.num_classes}  # fmt: skip
    checkpoint.save(
        run_dir / runs.CHECKPOINT, {"identity": identity, "model": model.state_dict(), "progress": {"iteration": 7}}
    )
    return model


@pytest.mark.parametrize(
    ("model", "block", "name"), [("resnet18", "basic", "resnet18-B"), ("resnet50", "bottleneck", "resnet50-B-v1.5")]
)
def test_export_loads_into_torchvision_and_computes_the_same(tmp_path, model, block, name):
    torchvision = pytest.importorskip("torchvision")
    spec = NetSpec(int(model[6:]), True, block, "imagenet", "projection", 1000, "3x3")  # torchvision's v1.5
    ours = saved_imagenet_run(tmp_path / "run", spec, [f"model={model}", "shortcut=B", "model.bottleneck_stride=3x3"])
    result = resexp("export", str(tmp_path / "run"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [f"{name}-torchvision.pt", f"{name}.pt"]
    theirs = getattr(torchvision.models, model)()
    theirs.load_state_dict(torch.load(tmp_path / "out" / f"{name}-torchvision.pt", weights_only=True))  # strict
    weights = torch.load(tmp_path / "out" / f"{name}.pt", weights_only=True)
    again = NetSpec(**weights["spec"]).build()
    again.load_state_dict(weights["state_dict"])
    assert weights["net"] == name and weights["iteration"] == 7
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    outputs = [net.double().eval()(x) for net in (ours, theirs, again)]
    assert torch.allclose(outputs[0], outputs[1], rtol=0, atol=1e-10) and torch.equal(outputs[0], outputs[2])


def test_a_bottleneck_run_of_an_older_resexp_is_read_as_the_v1_5_block_it_trained(tmp_path):
    """Before 0.4.0 every bottleneck strode in its 3x3 and its checkpoint recorded no bottleneck_stride;
    the paper's block is now the default, and must not take those weights (they fit it, shape for shape)."""
    spec = NetSpec(50, True, "bottleneck", "imagenet", "projection", 1000, "3x3")
    ours = saved_imagenet_run(tmp_path / "run", spec, ["model=resnet50"])
    saved = torch.load(tmp_path / "run" / runs.CHECKPOINT, weights_only=True)
    del saved["identity"]["model.bottleneck_stride"]
    checkpoint.save(tmp_path / "run" / runs.CHECKPOINT, saved)
    result = resexp("export", str(tmp_path / "run"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    weights = torch.load(tmp_path / "out" / "resnet50-B-v1.5.pt", weights_only=True)
    assert weights["spec"]["bottleneck_stride"] == "3x3"
    again = NetSpec(**weights["spec"]).build()
    again.load_state_dict(weights["state_dict"])
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert torch.equal(ours.double().eval()(x), again.double().eval()(x))


def test_the_papers_bottleneck_exports_its_weights_only_as_torchvision_has_no_such_net(tmp_path):
    spec = NetSpec(50, True, "bottleneck", "imagenet", "projection", 1000)
    saved_imagenet_run(tmp_path / "run", spec, ["model=resnet50"])
    result = resexp("export", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "run" / "resnet50-B.pt")]


def test_nets_torchvision_does_not_build_export_their_weights_only(tmp_path):
    spec = NetSpec(34, True, "basic", "imagenet", "identity", 1000)  # option A: zero padding, not torchvision's
    saved_imagenet_run(tmp_path / "run", spec, ["model=resnet34"])
    result = resexp("export", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "run" / "resnet34-A.pt")]
    assert all(torchvision_keys(dataclasses.replace(spec, **change)) is None for change in
               ({"shortcut": "identity"}, {"shortcut": "full"}, {"residual": False}))  # fmt: skip


def test_a_run_whose_record_names_foreign_code_is_refused(tmp_path):
    spec = NetSpec(18, True, "basic", "imagenet", "projection", 1000)
    saved_imagenet_run(tmp_path / "run", spec, ["model=resnet18", "shortcut=B", "data._target_=os.system"])
    assert_one_line_error(resexp("export", str(tmp_path / "run"), cwd=tmp_path), "_target_='os.system'")


def test_export_to_a_folder_it_cannot_write_is_one_line(tmp_path):
    spec = NetSpec(18, True, "basic", "imagenet", "projection", 1000)
    saved_imagenet_run(tmp_path / "run", spec, ["model=resnet18", "shortcut=B"])
    (tmp_path / "file").write_text("")
    result = resexp("export", str(tmp_path / "run"), "--out", str(tmp_path / "file"), cwd=tmp_path)
    assert_one_line_error(result, "--out")


def test_a_checkpoint_of_another_net_than_the_runs_record_is_one_line(tmp_path):
    spec = NetSpec(18, True, "basic", "imagenet", "projection", 1000)
    saved_imagenet_run(tmp_path / "run", spec, ["model=resnet18"])  # the record: option A
    result = resexp("eval", str(tmp_path / "run"), cwd=tmp_path)
    assert_one_line_error(result, "shortcut: 'projection' there, 'identity' now")


def test_a_pre_activation_run_of_resexp_0_8_is_read_as_the_net_it_trained(tmp_path):
    """Before 0.9.0 a pre-activation net's projections had a BN and its first unit's identity read conv1's raw
    output; its checkpoint recorded no preact_shortcut. It exports as that net, named apart from the authors'."""
    spec = NetSpec(11, True, "bottleneck", "cifar", "projection", 10, preactivation=True, preact_shortcut="resexp-0.8")
    ours = saved_imagenet_run(tmp_path / "run", spec, ["model=resnet164-preact", "model.depth=11"])
    saved = torch.load(tmp_path / "run" / runs.CHECKPOINT, weights_only=True)
    saved["identity"]["model.preactivation"] = True
    checkpoint.save(tmp_path / "run" / runs.CHECKPOINT, saved)
    result = resexp("export", str(tmp_path / "run"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    weights = torch.load(tmp_path / "out" / "resnet11-B-preact-resexp-0.8.pt", weights_only=True)
    again = NetSpec(**weights["spec"]).build()
    again.load_state_dict(weights["state_dict"])  # strict: the projections' BNs are there
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(ours.double().eval()(x), again.double().eval()(x))


def test_resuming_a_pre_activation_run_of_resexp_0_8_asks_for_its_shortcuts_and_others_resume_as_before(tmp_path):
    older = {"model.depth": 164, "model.residual": True, "model.block": "bottleneck", "model.preactivation": True,
             "shortcut": "projection", "model.arch": "resnet"}  # fmt: skip
    now = {**older, "model.preact_shortcut": "authors"}
    with pytest.raises(ResexpError, match="model.preact_shortcut: 'resexp-0.8' there, 'authors' now"):
        checkpoint.check_same_run(tmp_path / "checkpoint.pt", older, now)
    checkpoint.check_same_run(tmp_path / "checkpoint.pt", older, {**now, "model.preact_shortcut": "resexp-0.8"})
    original = {**older, "model.preactivation": False}  # the 2015 units: no such key, nothing changed
    checkpoint.check_same_run(tmp_path / "checkpoint.pt", original, {**original, "model.preact_shortcut": "authors"})
