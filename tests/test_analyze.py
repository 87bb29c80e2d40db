"""`resexp analyze` and its measurements (resexp/probes.py): what each captures, checked against the net
computed by hand in float64, and the command's files from short synthetic runs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import CLOSE, SHRINK, batches, resexp, scalars
from torch.nn import functional as F

from resexp import probes
from resexp.analyze import logged_gradients, markdown
from resexp.evaluate import evaluate
from resexp.models import build_model
from resexp.models.resnet import BasicBlock

CPU = torch.device("cpu")


def net(depth: int, residual: bool, block: str = "basic", stem: str = "cifar", preact: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    shortcut = "identity" if block == "basic" else "projection"
    return build_model(depth, residual, block, stem, shortcut, 10, preactivation=preact).double()


# 3x3 layers: CIFAR's 6n+2 nets have all but the classifier (the stem and two per block), its 9n+2
# bottleneck nets the stem and one per block; ImageNet's basic nets two per block (their stem is 7x7),
# the bottleneck ones one per block.
@pytest.mark.parametrize(
    ("depth", "block", "stem", "layers"),
    [
        (20, "basic", "cifar", 19),
        (56, "basic", "cifar", 55),
        (164, "bottleneck", "cifar", 55),
        (18, "basic", "imagenet", 16),
        (34, "basic", "imagenet", 32),
        (50, "bottleneck", "imagenet", 16),
    ],
)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("preact", [False, True])
def test_one_response_per_3x3_layer_of_each_preset(depth, block, stem, layers, residual, preact):
    model = net(depth, residual, block, stem, preact)
    found = probes.response_layers(model)
    assert len(found) == layers and all(conv.kernel_size == (3, 3) for conv, _ in found)
    if preact:  # no BN after a conv: the response is the conv's own output
        assert all(probe is conv for conv, probe in found)
    else:  # the BN right after the conv
        assert all(isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == conv.out_channels for conv, bn in found)


@pytest.mark.parametrize(
    ("variant", "layers"),
    [
        ({"block": "basic", "preactivation": True, "widths": (16, 32, 64, 128), "dropout": 0.3}, 13),  # Wide ResNet's
        ({"block": "bottleneck", "widths": (8, 8, 16, 16), "cardinality": 4, "base_width": 16}, 7),  # ResNeXt's
    ],
)
def test_the_relatives_have_one_response_per_3x3_layer_and_their_blocks_can_be_deleted(variant, layers):
    torch.manual_seed(0)
    depth = 14 if variant["block"] == "basic" else 20  # two blocks per stage
    model = build_model(depth, True, shortcut="projection", stem="cifar", num_classes=10, **variant).double().eval()
    found = probes.response_layers(model)
    assert len(found) == layers and all(conv.kernel_size == (3, 3) for conv, _ in found)
    assert {conv.groups for conv, _ in found} == ({1, 4} if "cardinality" in variant else {1})
    assert len(probes.blocks(model)) == 6
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        with probes.lesioned(model, [1]):
            deleted = model(x)
        zeroed = copy.deepcopy(model)
        last = zeroed.stages[0][1].conv2 if variant["block"] == "basic" else zeroed.stages[0][1].bn3
        for tensor in (last.weight, getattr(last, "bias", None)):
            if tensor is not None:
                tensor.zero_()  # the residual branch outputs zero
        torch.testing.assert_close(deleted, zeroed(x), rtol=0, atol=1e-12)


def by_hand(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The BN outputs of every 3x3 layer of a CIFAR basic-block net, computed step by step."""
    conv, bn, _ = model.stem
    outputs = [bn(conv(x))]
    x = F.relu(outputs[-1])
    for block in model.stages.modules():
        if isinstance(block, BasicBlock):
            first = block.bn1(block.conv1(x))
            second = block.bn2(block.conv2(F.relu(first)))
            outputs += [first, second]
            x = F.relu(second + block.shortcut(x) if block.shortcut is not None else second)
    return outputs


@pytest.mark.parametrize("residual", [False, True])
def test_the_responses_are_the_std_per_channel_of_each_3x3_layers_bn_output(residual):
    model = net(8, residual)
    model.train()
    model(batches(1, 5)[0][0])  # running statistics that are not BN's initial ones
    (x,), (y,) = batches(1, 1, size=6)
    found = probes.layer_responses(model, [(x[:4], y[:4]), (x[4:], y[4:])], CPU)
    assert model.training, "left in train mode, as found"
    model.eval()
    with torch.no_grad():
        expected = [out.transpose(0, 1).flatten(1).std(1, unbiased=False).mean().item() for out in by_hand(model, x)]
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), **CLOSE)


def test_deleting_a_block_is_the_net_with_that_blocks_residual_branch_zeroed():
    model = net(20, True)
    (x,), _ = batches(1, 2)
    model.eval()
    for index in (0, 3, 6):  # the first block, the first of stage 2 (it downsamples: option A's zero padding)
        zeroed = copy.deepcopy(model)
        branch_end = probes.blocks(zeroed)[index].bn2
        torch.nn.init.zeros_(branch_end.weight)
        torch.nn.init.zeros_(branch_end.bias)
        with torch.no_grad(), probes.lesioned(model, [index]):
            torch.testing.assert_close(model(x), zeroed(x), **CLOSE)
    with torch.no_grad():
        assert not torch.allclose(model(x), zeroed(x)), "the lesion is undone on leaving"


@pytest.mark.parametrize(("depth", "block", "indices"), [(20, "basic", (0, 3, 6)), (20, "bottleneck", (0, 1, 2, 4))])
def test_deleting_a_pre_activation_block_is_the_net_with_that_blocks_last_conv_zeroed(depth, block, indices):
    model = net(depth, True, block, preact=True)  # basic: option A; bottleneck: B, every stage's first block projects
    (x,), _ = batches(1, 2)
    model.eval()
    for index in indices:
        zeroed = copy.deepcopy(model)
        deleted = probes.blocks(zeroed)[index]
        torch.nn.init.zeros_((deleted.conv3 if block == "bottleneck" else deleted.conv2).weight)  # the branch's end
        with torch.no_grad(), probes.lesioned(model, [index]):
            torch.testing.assert_close(model(x), zeroed(x), **CLOSE)


def test_a_plain_net_can_lose_only_blocks_whose_input_and_output_have_one_shape():
    plain = probes.blocks(net(20, False))
    assert [probes.deletable(block) for block in plain] == [True] * 3 + [False, True, True] * 2
    with pytest.raises(ValueError, match="cannot be deleted"):
        with probes.lesioned(net(20, False), [3]):
            pass


def test_the_loss_slice_at_zero_is_the_trained_loss_and_the_weights_are_left_as_they_were():
    model = net(8, True)
    data = list(zip(*batches(2, 3)))
    before = copy.deepcopy(model.state_dict())
    losses = probes.loss_surface(model, data, CPU, [(-0.5,), (0.0,), (0.5,)], seed=1)
    assert losses[1] == evaluate(model, data, CPU)["loss"]
    assert losses[0] != losses[1] != losses[2]
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_the_loss_surface_runs_along_the_slices_direction_first_and_moves_off_it_second():
    model = net(8, True)
    data = list(zip(*batches(2, 3)))
    line = probes.loss_surface(model, data, CPU, [(-0.5,), (0.0,), (0.5,)], seed=1)
    plane = probes.loss_surface(model, data, CPU, [(a, b) for b in (0.0, 0.5) for a in (-0.5, 0.0, 0.5)], seed=1)
    assert plane[:3] == line  # the second direction at zero: the slice itself
    assert plane[4] != line[1]  # (0, 0.5): off the slice
    assert probes.loss_surface(model, data, CPU, [(0.0, 0.0)], seed=1) == [line[1]]


def test_the_gradient_norms_are_those_of_each_3x3_layers_weights():
    model = net(8, False)
    data = list(zip(*batches(2, 4)))
    found = probes.gradient_norms(model, data, CPU)
    loss = sum(F.cross_entropy(model(x), y) for x, y in data) / 2
    weights = [conv.weight for conv, _ in probes.response_layers(model)]
    expected = [grad.norm().item() for grad in torch.autograd.grad(loss, weights)]
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), **CLOSE)
    assert all(param.grad is None for param in model.parameters())


def test_analyze_writes_every_figure_and_table_from_short_runs(tmp_path):
    for model in ("plain20", "resnet20"):
        result = resexp(
            "train", *SHRINK, f"model={model}", "model.depth=8", f"hydra.run.dir={tmp_path / model}", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
    out = tmp_path / "analysis"
    args = [
        "--images",
        "32",
        "--train-batches",
        "1",
        "--draws",
        "1",
        "--points",
        "3",
        "--plane",
        "2",
        "--out",
        str(out),
    ]
    result = resexp("analyze", str(tmp_path / "plain20"), str(tmp_path / "resnet20"), *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for stem in ("responses", "gradients", "lesions", "landscape", "landscape-2d"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.svg").stat().st_size > 0
    written = json.loads((out / "analysis.json").read_text())["runs"]
    assert [(run["net"], len(run["responses"]), len(run["lesion"]["single"])) for run in written] == [
        ("plain8", 7, 3),
        ("resnet8-A", 7, 3),
    ]
    assert [run["landscape"]["plane"]["step"] for run in written] == [[-1.0, 1.0]] * 2
    assert all(
        len(run["landscape"]["plane"]["loss"]) == 2 == len(run["landscape"]["plane"]["loss"][1]) for run in written
    )
    assert "| resnet8-A |" in (out / "analysis.md").read_text()
    # SHRINK's 4 iterations, logged at the default grad_norms_every (100) at none of them
    assert all(run["gradients"]["logged"] == [] for run in written)


def test_the_table_lists_plain_nets_then_residual_ones_by_depth_and_keeps_small_ratios_readable():
    def run(net: str, residual: bool, depth: int, first: float) -> dict:
        return {
            "net": net,
            "residual": residual,
            "depth": depth,
            "iteration": 1,
            "state": "finished",
            "responses": [1.0],
            "gradients": {"initial": [first, 1.0], "trained": [first, 1.0]},
            "lesion": {"error": 50.0, "single": [60.0]},
        }

    rows = markdown(
        [run("resnet110-A", True, 110, 2.0), run("plain56", False, 56, 0.0142), run("resnet20-A", True, 20, 3.0)]
    )
    nets = [line.split(" | ")[0].strip("| ") for line in rows.splitlines()[2:5]]
    assert nets == ["plain56", "resnet20-A", "resnet110-A"]
    assert "| 0.0142 | 0.0142 |" in rows


def test_analyze_refuses_a_budget_below_one_in_one_line(tmp_path):
    result = resexp("train", *SHRINK, "model.depth=8", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = resexp("analyze", str(tmp_path / "run"), "--draws", "0", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().endswith("--draws=0 must be 1 or more")
    result = resexp("analyze", str(tmp_path / "run"), "--plane", "1", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().endswith("--plane=1 must be 0 (no surface) or 2 or more")


def test_training_writes_the_gradient_norms_of_each_stage_and_a_histogram_over_depth(tmp_path):
    run_dir = tmp_path / "run"
    result = resexp("train", *SHRINK, "model.depth=8", "grad_norms_every=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    curves = scalars(run_dir)
    stages = ["stem", "stage1", "stage2", "stage3"]
    assert all([step for step, _ in curves[f"gradient norm/{stage}"]] == [2, 4] for stage in stages)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"histograms": 0})  # 0: every point
    events.Reload()
    histograms = events.Histograms("gradient norm/by layer")
    assert [h.step for h in histograms] == [2, 4]
    norms = list(histograms[-1].histogram_value.bucket)
    assert len(norms) == 7 and all(norm > 0 for norm in norms)  # one bucket per 3x3 layer, input side first
    # the stem is the first layer alone, stage 1 the next two
    assert curves["gradient norm/stem"][-1][1] == pytest.approx(norms[0], rel=1e-6)
    assert curves["gradient norm/stage1"][-1][1] == pytest.approx((norms[1] ** 2 + norms[2] ** 2) ** 0.5, rel=1e-6)
    assert curves["gradient norm/first over last"][-1][1] == pytest.approx(norms[0] / norms[-1], rel=1e-6)
    assert [point["iteration"] for point in logged_gradients(run_dir)] == [2, 4]
    assert logged_gradients(run_dir)[-1]["norms"] == norms
