"""DenseNet (Huang et al. 2017, resexp/models/densenet.py), the relative whose layers concatenate: its
layers and widths against the paper's description, its parameter counts against their Table 2, its
names, numbers and recipe, and its runs (the command line, resume, export, the analysis probes).
Float64 where a layer is compared with its formula written out."""

import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    SHRINK,
    assert_one_line_error,
    assert_resumes_bit_identical,
    compose_config,
    fake_run,
    resexp,
)
from torch import nn

from resexp import checkpoint, models, paper
from resexp.config import net_spec, schedule
from resexp.errors import ResexpError
from resexp.models import FAMILIES, DenseNetSpec, count_parameters, spec_of
from resexp.models.densenet import DenseLayer
from resexp.models.names import densenet_name
from resexp.probes import lesion_study, response_layers
from resexp.report import report
from resexp.schemas import ModelSchema

BC100 = DenseNetSpec(100, "bottleneck", 12, 0.5, num_classes=10)


def randomize_bn(model: nn.Module) -> None:
    """BN's statistics and affine terms as a trained net's, not 0, 1, 1 and 0."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor, (low, high) in zip(
                (module.running_mean, module.running_var, module.weight, module.bias),
                ((-0.5, 0.5), (0.5, 2.0), (0.5, 1.5), (-0.2, 0.2)),
            ):
                nn.init.uniform_(tensor.data, low, high)


@pytest.mark.parametrize("bottleneck", [False, True], ids=["densenet", "densenet-b"])
def test_a_dense_layer_passes_its_input_on_whole_and_adds_k_maps_computed_from_all_of_it(bottleneck):
    torch.manual_seed(0)
    layer = DenseLayer(20, 6, bottleneck, 0.0).double().eval()
    randomize_bn(layer)
    x = torch.randn(2, 20, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        h = x
        convs = [m for m in layer.branch if isinstance(m, nn.Conv2d)]
        norms = [m for m in layer.branch if isinstance(m, nn.BatchNorm2d)]
        for norm, conv in zip(norms, convs):  # BN-ReLU-Conv, once more with the 1x1 first (DenseNet-B)
            h = conv(F.relu(norm(h)))
        assert [c.kernel_size for c in convs] == ([(1, 1)] if bottleneck else []) + [(3, 3)]
        assert convs[0].out_channels == (24 if bottleneck else 6)  # DenseNet-B: 4k maps into the 3x3 conv
        out = layer(x)
    assert out.shape == (2, 26, 8, 8)
    assert torch.equal(out[:, :20], x)  # the layer's input, whole: every later layer sees it
    torch.testing.assert_close(out[:, 20:], h, rtol=1e-12, atol=1e-12)


def test_densenet_bc_100_12_has_the_papers_widths_and_maps():
    model = BC100.build()
    assert model.stem[0].out_channels == 24  # 2k for DenseNet-BC (§3)
    # each block adds 16 x 12 = 192 maps; each transition keeps half of them: 216 -> 108, 300 -> 150
    transitions = [stage[-1] for stage in model.stages[:2]]
    assert [(t[2].in_channels, t[2].out_channels) for t in transitions] == [(216, 108), (300, 150)]
    assert model.fc.in_features == 342
    assert [sum(isinstance(m, DenseLayer) for m in stage) for stage in model.stages] == [16, 16, 16]
    sizes = []
    model.stages.register_forward_hook(lambda module, inputs, out: sizes.append(tuple(out.shape[1:])))
    model.eval()
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32))
    assert sizes == [(342, 8, 8)]  # 32x32, then 16x16 and 8x8 after the two transitions
    # L counts the weighted layers: the stem conv, 2 convs in each of 48 layers, 2 transitions, the fc
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 100


def expected_parameters(depth: int, k: int, bottleneck: bool, theta: float, classes: int = 10) -> int:
    """Their Table 2's nets counted from the paper's description: a conv's weights, BN's two per map, the
    classifier's weights and biases."""
    layers = (depth - 4) // (6 if bottleneck else 3)
    channels = 2 * k if bottleneck else 16
    total = 3 * channels * 9
    for index in range(3):
        for _ in range(layers):
            if bottleneck:
                total += 2 * channels + channels * 4 * k + 2 * 4 * k + 4 * k * k * 9
            else:
                total += 2 * channels + channels * k * 9
            channels += k
        if index < 2:
            out = int(theta * channels)
            total += 2 * channels + channels * out
            channels = out
    return total + 2 * channels + channels * classes + classes


@pytest.mark.parametrize(
    "depth, k, block, theta, reported",
    [
        (40, 12, "basic", 1.0, 1.0),
        (100, 12, "basic", 1.0, 7.0),
        (100, 24, "basic", 1.0, 27.2),
        (100, 12, "bottleneck", 0.5, 0.8),
        (250, 24, "bottleneck", 0.5, 15.3),
        (190, 40, "bottleneck", 0.5, 25.6),
    ],
)
def test_parameter_counts_are_their_table_2s(depth, k, block, theta, reported):
    count = count_parameters(DenseNetSpec(depth, block, k, theta, num_classes=10).build())
    assert count == expected_parameters(depth, k, block == "bottleneck", theta)
    assert round(count / 1e6, 1) == reported  # Table 2 gives millions to one decimal


def test_densenets_are_named_as_their_paper_names_them_and_compared_with_table_2():
    assert BC100.name == "densenet-bc100-12"
    assert DenseNetSpec(40, "basic", 12, 1.0, num_classes=10).name == "densenet40-12"
    assert densenet_name(100, "bottleneck", 12, 1.0) == "densenet-b100-12"
    assert densenet_name(100, "basic", 12, 0.5, 0.2) == "densenet-c100-12-dropout0.2"
    assert densenet_name(100, "bottleneck", 12, 0.7) == "densenet-bc100-12-theta0.7"
    assert paper.lookup("cifar10", BC100.name) == paper.PaperResult(4.51, "Huang et al. 2017, Table 2")
    assert paper.lookup("cifar100", BC100.name).error == 22.27
    assert paper.lookup("cifar10", "densenet40-12").error == 5.24
    assert paper.recipe_differences("cifar10", BC100.name, 234_375, 64, 0.1) == []
    assert paper.recipe_differences("cifar10", BC100.name, 64_000, 128, 0.1) == [
        "64,000 iterations (paper 234,375)",
        "batch 128 (paper 64)",
    ]
    assert BC100.legend(True) == "DenseNet-BC (L=100, k=12)"
    assert (
        DenseNetSpec(40, "basic", 12, 1.0, num_classes=10, dropout=0.2).legend(False)
        == "DenseNet (L=40, k=12) dropout 0.2"
    )
    assert DenseNetSpec(100, "bottleneck", 12, 0.7, num_classes=10).legend(False) == "DenseNet-BC (L=100, k=12), θ 0.7"


@pytest.mark.parametrize("data", ["cifar10", "cifar100", "synthetic"])
@pytest.mark.parametrize("model", ["densenet40-12", "densenet-bc100-12"])
def test_the_presets_train_with_their_authors_recipe_on_any_cifar_sized_data(model, data):
    cfg = compose_config(f"model={model}", f"data={data}")
    spec = net_spec(cfg)
    assert spec.name == model and spec.num_classes == cfg.data.num_classes
    plan = schedule(cfg)
    # §4.2: batch 64, 300 epochs, the rate divided by 10 at 50% and 75%, Nesterov momentum, weight decay 1e-4
    recipe = (cfg.schedule.batch_size, plan.iterations, plan.milestones, plan.gamma, plan.warmup_lr)
    assert recipe == (64, 234_375, (117_188, 175_781), 0.1, None)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (0.1, 0.9, True, 1e-4)


@pytest.mark.parametrize("preprocess", ["meanstd/zeros", None])
def test_a_report_compares_a_densenet_with_its_number_beside_the_resnets(tmp_path, preprocess):
    dense = {"arch": "densenet", "block": "bottleneck", "growth_rate": 12, "compression": 0.5}
    fake_run(tmp_path / "dense", depth=100, residual=True, final_train=0.5, final_test=4.8, iterations=234_375,
             batch_size=64, model_keys=dense, preprocess=preprocess)  # fmt: skip
    fake_run(tmp_path / "resnet", depth=20, residual=True, final_train=2.0, final_test=8.5)
    rows = {row.net: row for row in report([tmp_path])}
    assert rows["densenet-bc100-12"].paper.error == 4.51
    if preprocess is None:  # an older run trained with the 2015 paper's preprocessing: not the authors' recipe
        assert rows["densenet-bc100-12"].difference is None
        assert rows["densenet-bc100-12"].recipe == ("preprocess mean/zeros (paper meanstd/zeros)",)
        return
    assert rows["densenet-bc100-12"].difference == pytest.approx(4.8 - 4.51)
    assert (rows["densenet-bc100-12"].shortcut, rows["resnet20-A"].shortcut) == ("-", "A")
    svg = (tmp_path / "figure6.svg").read_text()  # the legend's and the panel's texts, kept as comments
    assert "<!-- DenseNet-BC (L=100, k=12) -->" in svg and "<!-- ResNet-20 -->" in svg  # no letter: A alone
    assert "<!-- ResNet and DenseNet -->" in svg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.depth=99"], "model.depth=99 is not a DenseNet depth of bottleneck layers; it must be 6n+4"),
        (
            ["model.block=basic", "model.depth=41"],
            "model.depth=41 is not a DenseNet depth of basic layers; it must be 3n+4",
        ),
        (["model.block=grouped"], "model.block='grouped' is not an option for a DenseNet; choose basic"),
        (["model.residual=false"], "model.residual=false: a DenseNet's layers are built on its concatenations"),
        (["shortcut=B"], "shortcut='projection': a DenseNet has no shortcut options"),
        (["model.stem=imagenet"], "model.stem='imagenet': resexp builds Huang et al.'s CIFAR DenseNets only"),
        (
            ["model.cardinality=8"],
            "model.cardinality=8 is for model.arch=resnet; a net of model.arch=densenet has none",
        ),
        (["model.compression=1.5"], "model.compression=1.5 must be in (0, 1]"),
        (["model.arch=vgg"], "model.arch='vgg' is not an option; choose resnet or densenet"),
    ],
)
def test_bad_densenet_values_are_one_line_naming_the_value_and_the_choices(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    result = resexp("train", *SHRINK, "model=densenet-bc100-12", *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line_error(result, message)
    assert not run_dir.exists()


def test_a_resnet_refuses_a_densenets_keys_and_an_unknown_family_is_named():
    with pytest.raises(ResexpError, match=re.escape("model.growth_rate=24 is for model.arch=densenet")):
        net_spec(compose_config("model=resnet20", "model.growth_rate=24"))
    with pytest.raises(ResexpError, match=re.escape("model.arch='vgg' is not an option; choose resnet or densenet")):
        spec_of({"arch": "vgg", "depth": 20}, "identity", 10)


def test_the_config_types_each_familys_own_keys_with_its_specs_defaults_and_no_two_families_share_one():
    own = {arch: models.own_keys(family) for arch, family in models.FAMILIES.items()}
    assert own["densenet"] == {"growth_rate": 12, "compression": 0.5}
    assert not set(own["resnet"]) & set(own["densenet"])
    defaults = {f.name: f.default for f in dataclasses.fields(ModelSchema)}
    assert set(defaults) == {*models.COMMON, *own["resnet"], *own["densenet"]}
    assert {key: defaults[key] for key in own["densenet"]} == own["densenet"]
    assert {key: defaults[key] for key in own["resnet"]} == own["resnet"]


def test_a_densenets_identity_leaves_the_resnet_keys_out_and_older_checkpoints_are_resnets():
    dense = checkpoint.identity({"model.arch": "densenet", "model.growth_rate": 12, "model.cardinality": 1})
    assert dense == {"model.arch": "densenet", "model.growth_rate": 12}
    resnet = {"model.arch": "resnet", "model.depth": 20, "model.growth_rate": 12, "shortcut": "identity"}
    assert checkpoint.identity(resnet) == {"model.arch": "resnet", "model.depth": 20, "shortcut": "identity"}
    older = {"model.depth": 20, "shortcut": "identity"}  # before 0.7.0: no model.arch, and every net a ResNet
    checkpoint.check_same_run("checkpoint.pt", older, resnet)  # resumes, where another arch is refused:
    with pytest.raises(ResexpError, match="model.arch: 'resnet' there, 'densenet' now"):
        checkpoint.check_same_run("checkpoint.pt", older, {**older, "model.arch": "densenet"})


SMALL = ["model=densenet-bc100-12", "model.depth=10", "model.growth_rate=4"]  # 1 layer per block


def test_a_densenet_trains_from_the_command_line_and_exports_weights_that_load(tmp_path):
    run_dir = tmp_path / "run"
    result = resexp("train", *SHRINK, *SMALL, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    spec = DenseNetSpec(10, "bottleneck", 4, 0.5, num_classes=10)
    assert metrics["net"] == "densenet-bc10-4" and metrics["params"] == count_parameters(spec.build())
    assert metrics["shortcut"] is None and metrics["residual"]  # no option to show; its connections are on
    exported = resexp("export", str(run_dir), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.split() == [str(tmp_path / "out" / "densenet-bc10-4.pt")]  # torchvision has none
    weights = torch.load(tmp_path / "out" / "densenet-bc10-4.pt", weights_only=True)
    again = FAMILIES[weights["arch"]](**weights["spec"]).build()
    again.load_state_dict(weights["state_dict"])
    assert dataclasses.asdict(spec) == weights["spec"]


def test_a_densenet_with_dropout_resumes_bit_identical(tmp_path):
    assert_resumes_bit_identical(tmp_path, [*SMALL, "model.dropout=0.2"])  # after each conv but the stem's


def test_the_probes_read_a_densenets_3x3_layers_and_find_no_blocks_to_delete():
    model = DenseNetSpec(10, "bottleneck", 4, 0.5, num_classes=10).build().double().eval()
    layers = response_layers(model)
    # the stem's and each layer's 3x3 conv, each its own response (pre-activation: no BN after it)
    assert [conv.kernel_size for conv, _ in layers] == [(3, 3)] * 4 and all(conv is out for conv, out in layers)
    batch = (torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,)))
    study = lesion_study(model, [batch], torch.device("cpu"), draws=2, seed=0)
    assert study["single"] == study["deletable"] == study["random"] == [] and 0 <= study["error"] <= 100
