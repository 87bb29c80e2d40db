import functools
import re

import pytest
import torch
from helpers import CONF, DATASETS, MODELS, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from resexp.config import net_spec, schedule
from resexp.errors import ResexpError
from resexp.train import Schedule, learning_rate


def make_model(cfg):
    spec = net_spec(cfg)
    return spec.build(), spec.name


@functools.cache
def classifier_and_output(spec, size: int) -> tuple[int, tuple[int, ...]]:
    """A net's classifier width and its output's shape for two images of `size`: built and run once per net
    (the datasets of one class count make the same one, and resnet1202 takes a second to build)."""
    net = spec.build().eval()
    with torch.inference_mode():
        return net.fc.out_features, tuple(net(torch.randn(2, 3, size, size)).shape)


IMAGENET = {"plain18", "plain34", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}
TABLE3 = {"resnet34-B", "resnet34-C"}  # ResNet-34 with the other shortcut options
PREACT = {"resnet110-preact", "resnet164-preact", "resnet1001-preact"}  # He et al. 2016, Table 3 ...
BOTTLENECK_CIFAR = {"resnet164", "resnet1001"}  # ... and its 2015-unit bottleneck nets
WRN = {"wrn16-8", "wrn28-10"}  # Zagoruyko & Komodakis 2016
RESNEXT = {"resnext29-8x64d"}  # Xie et al. 2017
DENSENET = {"densenet40-12", "densenet-bc100-12"}  # Huang et al. 2017
# The relatives' own recipes, whatever the data: iterations, milestones, gamma, weight decay, Nesterov.
OWN_RECIPES = {
    "wrn": (78_125, (23_438, 46_875, 62_500), 0.2, 5e-4, True),
    "resnext": (58_594, (29_297, 43_946), 0.1, 5e-4, True),
    "densenet": (234_375, (117_188, 175_781), 0.1, 1e-4, True),
}


def test_the_presets_are_the_papers_nets():
    cifar = {f"{kind}{depth}" for kind in ("plain", "resnet") for depth in (20, 32, 44, 56, 110)} | {"resnet1202"}
    assert set(MODELS) == cifar | IMAGENET | TABLE3 | PREACT | BOTTLENECK_CIFAR | WRN | RESNEXT | DENSENET
    assert set(DATASETS) >= {"cifar10", "imagenet", "synthetic"}


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes_with_every_dataset(model, data):
    cfg = compose_config(f"model={model}", f"data={data}")
    name = net_spec(cfg).name
    family = next(
        (kind for kind, presets in (("wrn", WRN), ("resnext", RESNEXT), ("densenet", DENSENET)) if model in presets),
        "resnet" if cfg.model.residual else "plain",
    )
    assert name.startswith(family)
    # a Wide ResNet is named by its paper's count, which takes in its 3 projections and leaves out the
    # classifier; a DenseNet-BC says so before its depth
    depth = name.removeprefix(family).removeprefix("-bc")
    assert depth.startswith(str(cfg.model.depth + (2 if model in WRN else 0)))
    size = 224 if model == "resnet18" else 32  # ImageNet nets also run on CIFAR-sized images
    classes, shape = classifier_and_output(net_spec(cfg), size)
    assert classes == cfg.data.num_classes and shape == (2, cfg.data.num_classes)
    plan = schedule(cfg)
    if family in OWN_RECIPES:
        optim = cfg.optim
        recipe = (plan.iterations, plan.milestones, plan.gamma, optim.weight_decay, optim.nesterov)
        assert recipe == OWN_RECIPES[family] and plan.warmup_lr is None
        return
    # The paper's schedule for the data: §4.2 for CIFAR (warm-up from 110 layers), §3.4 for ImageNet;
    # random images: CIFAR's, short, with the drops at the same fractions of the run.
    expected = {"imagenet": (600_000, (150_000, 300_000)), "synthetic": (200, (100, 150))}
    expected |= {"imagenet_packed": expected["imagenet"], "imagenette": (4440, (1110, 2220))}  # 120 epochs
    assert (plan.iterations, plan.milestones) == expected.get(data, (64_000, (32_000, 48_000)))
    imagenet = data in ("imagenet", "imagenet_packed", "imagenette")  # their schedules have no warm-up
    he2016 = model in ("resnet110-preact", "resnet164", "resnet164-preact", "resnet1001", "resnet1001-preact")
    assert (plan.warmup_lr is not None) == (he2016 or not imagenet and cfg.model.depth >= 110)
    assert plan.warmup_iterations == (400 if he2016 else None)  # theirs: 400 iterations; the 2015 rule: an error


@pytest.mark.parametrize("model", MODELS)
def test_default_shortcut_follows_the_paper(model):
    cfg = compose_config(f"model={model}")
    if model in DENSENET:  # no shortcut options: its layers concatenate (test_densenet.py)
        assert (cfg.shortcut, cfg.model.arch) == ("identity", "densenet")
        return
    assert cfg.model.arch == "resnet"
    bottleneck = cfg.model.block == "bottleneck"
    # Table 2 / §4.2: option A for the CIFAR nets and ImageNet 18/34; Table 3 / §4.1: B for 50/101/152
    # and for the bottlenecks of He et al. 2016's 164 and 1001.
    expected = {"resnet34-B": "projection", "resnet34-C": "full"}.get(
        model, "projection" if bottleneck or model in WRN else "identity"
    )  # Wide ResNet: B, 1x1 convs where the width changes
    assert cfg.shortcut == expected
    assert bottleneck == (cfg.model.depth in (29, 50, 101, 152, 164, 1001))
    assert cfg.model.preactivation == (model in PREACT | WRN | RESNEXT)  # ResNeXt: the blocks of its CIFAR numbers


def test_root_shortcut_overrides_the_models_default():
    net, name = make_model(compose_config("model=resnet34", "shortcut=projection"))
    default, default_name = make_model(compose_config("model=resnet34"))
    assert (name, default_name) == ("resnet34-B", "resnet34-A")
    # Table 3's B adds three 1x1 projections with BN: 64->128, 128->256, 256->512.
    extra = sum(c_in * c_out + 2 * c_out for c_in, c_out in [(64, 128), (128, 256), (256, 512)])
    assert sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in default.parameters()) == extra


def test_any_valid_depth_works_and_others_fail():
    net, name = make_model(compose_config("model=plain20", "model.depth=26"))
    assert name == "plain26" and len(net.stages[0]) == 4
    _, name = make_model(compose_config("model=resnet50", "model.depth=101"))
    assert name == "resnet101-B"
    with pytest.raises(ResexpError, match="model.depth=30 is not a CIFAR depth"):
        make_model(compose_config("model.depth=30"))


def test_the_papers_recipe_is_the_default():
    cfg = compose_config()
    assert cfg.model.depth == 20 and cfg.model.residual and cfg.data.val_size == 0
    optimizer = instantiate(cfg.optim)([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.9, 1e-4, False)
    assert (cfg.schedule.batch_size, cfg.schedule.iterations, list(cfg.schedule.milestones)) == (
        128,
        64_000,
        [32_000, 48_000],
    )


def test_learning_rate_schedule():
    schedule = Schedule(
        iterations=64_000, milestones=(32_000, 48_000), gamma=0.1, warmup_lr=None, warmup_until_error=80
    )
    lrs = [learning_rate(i, 0.1, schedule, warming_up=False) for i in (0, 31_999, 32_000, 47_999, 48_000, 63_999)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    warm = Schedule(iterations=64_000, milestones=(32_000, 48_000), gamma=0.1, warmup_lr=0.01, warmup_until_error=80)
    assert learning_rate(0, 0.1, warm, warming_up=True) == 0.01
    assert learning_rate(400, 0.1, warm, warming_up=False) == 0.1


@pytest.mark.parametrize("milestones", ["[48000,32000]", "[32000,64000]", "[0,100]"])
def test_milestones_must_increase_within_the_run(milestones):
    with pytest.raises(ResexpError, match=r"must be increasing iterations within the run's 64000"):
        schedule(compose_config(f"schedule.milestones={milestones}"))


def test_every_config_key_has_a_comment():
    """Style rule: every key in conf/ says what it does, on its own line (block openers excepted)."""
    key = re.compile(r"^\s*(-\s+)?[\w@/.()]+(\s+[\w/]+)?:\s*\S")
    for path in sorted(CONF.rglob("*.yaml")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if key.match(line) and "#" not in line:
                pytest.fail(f"conf/{path.relative_to(CONF)}:{number} has no comment: {line!r}")


def test_configs_resolve():
    # Interpolations (the default shortcut, the data root from the environment) resolve without Hydra's runtime.
    cfg = compose_config("model=resnet50")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["shortcut"] == "projection"
    assert isinstance(resolved["data"]["root"], str)


@pytest.mark.parametrize(
    ("overrides", "milestones"),
    [
        (["schedule.iterations=100"], (50, 75)),  # CIFAR's drops at 50% and 75% of any run length
        (["data=imagenet", "schedule.iterations=1000"], (250, 500)),  # ImageNet's at 25% and 50%
        (["schedule.iterations=100", "schedule.milestones=[10,20]"], (10, 20)),  # given: kept
        (["data=synthetic"], (100, 150)),  # the smoke run's 200 iterations
    ],
)
def test_shortening_a_run_scales_its_milestones_unless_they_are_given(overrides, milestones):
    assert schedule(compose_config(*overrides)).milestones == milestones
