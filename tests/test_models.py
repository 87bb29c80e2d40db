import copy
import pickle
import re

import pytest
import torch
import torchvision
from torch import nn

from resexp.errors import ResexpError
from resexp.models import build_model, count_parameters
from resexp.models.resnet import NetSpec, ZeroPadShortcut, canonical_shortcut, net_name, torchvision_keys


def cifar(depth, residual=True, shortcut="identity"):
    return build_model(depth, residual, "basic", "cifar", shortcut, 10)


def imagenet(depth, residual=True, shortcut="projection", bottleneck_stride="1x1"):
    block = "basic" if depth in (18, 34) else "bottleneck"
    return build_model(depth, residual, block, "imagenet", shortcut, 1000, bottleneck_stride)


def projections(model):
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Sequential) and isinstance(m[0], nn.Conv2d) and m[0].kernel_size == (1, 1)
    ]


def shortcuts(model):
    return [block.shortcut for stage in model.stages for block in stage]


# Paper Table 6 (option A): 0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M.
@pytest.mark.parametrize(
    "depth, expected",
    [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018), (110, 1_727_962)],
)
def test_cifar_parameter_counts_match_the_paper_and_plain_twins_match(depth, expected):
    assert count_parameters(cifar(depth)) == expected
    assert count_parameters(cifar(depth, residual=False)) == expected


def test_resnet1202_has_about_19_4m_parameters():
    with torch.device("meta"):  # shapes without values: the count, without initialising 19.4M weights
        assert round(count_parameters(cifar(1202)) / 1e6, 1) == 19.4


@pytest.mark.parametrize(
    "depth, expected",
    [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032), (101, 44_549_160), (152, 60_192_808)],
)
def test_option_b_imagenet_nets_equal_torchvision(depth, expected):
    with torch.device("meta"):
        ours = count_parameters(imagenet(depth))
        assert ours == expected
        assert ours == count_parameters(getattr(torchvision.models, f"resnet{depth}")(weights=None))


# Table 1's FLOPs row, which counts multiply-adds: 1.8, 3.6, 3.8, 7.6, 11.3 x 10^9 at 224x224.
TABLE_1_MULTIPLY_ADDS = {18: 1.8e9, 34: 3.6e9, 50: 3.8e9, 101: 7.6e9, 152: 11.3e9}


def multiply_adds(model, size=224):
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as counter:  # shapes only: no arithmetic done
        model(torch.empty(1, 3, size, size))
    return counter.get_total_flops() / 2  # the counter's FLOPs are two per multiply-add


@pytest.mark.parametrize("depth", TABLE_1_MULTIPLY_ADDS)
def test_the_imagenet_nets_cost_table_1s_multiply_adds_within_2_percent(depth):
    with torch.device("meta"):
        model = imagenet(depth)
    assert multiply_adds(model) == pytest.approx(TABLE_1_MULTIPLY_ADDS[depth], rel=0.02)


@pytest.mark.parametrize("depth", [50, 101, 152])
def test_torchvisions_v1_5_bottleneck_strides_in_its_3x3_and_costs_more_than_the_papers(depth):
    with torch.device("meta"):
        paper, v1_5 = imagenet(depth), imagenet(depth, bottleneck_stride="3x3")
        theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    first = [stage[0] for stage in paper.stages[1:]]  # the downsampling blocks
    assert [(b.conv1.stride, b.conv2.stride) for b in first] == [((2, 2), (1, 1))] * 3
    assert [(b.conv1.stride, b.conv2.stride) for b in (stage[0] for stage in v1_5.stages[1:])] == [((1, 1), (2, 2))] * 3
    assert count_parameters(paper) == count_parameters(v1_5)  # one set of weights, strided elsewhere
    assert multiply_adds(v1_5) == multiply_adds(theirs) > multiply_adds(paper) + 0.2e9  # 0.23 G more


def test_option_a_adds_no_parameters_and_has_no_projections():
    plain, residual = cifar(56, residual=False), cifar(56)
    assert count_parameters(residual) == count_parameters(plain)
    assert projections(residual) == []
    kinds = [type(s) for s in shortcuts(residual)]
    assert kinds.count(ZeroPadShortcut) == 2  # the two stages that double the width
    assert kinds.count(nn.Identity) == 27 - 2


def test_option_b_projects_only_where_dimensions_change():
    a, b = cifar(20), cifar(20, shortcut="projection")
    assert len(projections(b)) == 2
    assert count_parameters(b) - count_parameters(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    # Bottleneck nets change dimensions at the start of all four stages (64 -> 256 in the first).
    assert len(projections(imagenet(50))) == 4


def test_option_c_projects_on_every_block():
    c = cifar(20, shortcut="full")
    assert len(projections(c)) == 9
    assert count_parameters(c) > count_parameters(cifar(20, shortcut="projection"))
    assert len(projections(imagenet(34, shortcut="C"))) == 16


def test_plain_nets_have_no_shortcut_path():
    plain = cifar(20, residual=False)
    assert all(s is None for s in shortcuts(plain))
    block = plain.stages[0][0]
    twin = cifar(20).stages[0][0]
    twin.load_state_dict(block.state_dict())
    # With the residual branch F silenced (last BN zero), a plain block outputs 0, a residual block relu(x).
    for b in (block, twin):
        nn.init.zeros_(b.bn2.weight)
        nn.init.zeros_(b.bn2.bias)
        b.eval()
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), torch.zeros_like(x))
    assert torch.equal(twin(x), torch.relu(x))


def test_option_a_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    y = ZeroPadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0


def test_models_pickle_and_copy():
    model = cifar(20)
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 32, 32)
    model.eval(), clone.eval()
    assert torch.equal(model(x), clone(x))
    # A copy (resexp/group.py copies nets) computes the same and shares no tensor with the original:
    # training it leaves the original as it was.
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), model(x))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    twin.train()
    torch.optim.SGD(twin.parameters(), lr=0.1).zero_grad()
    twin(x).sum().backward()
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    assert not torch.equal(twin(x), model(x))
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_he_initialisation():
    conv = cifar(20).stages[2][0].conv2  # 64 -> 64, 3x3: fan_out 576
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)


@pytest.mark.parametrize("letter, name", [("A", "identity"), ("b", "projection"), ("C", "full"), ("full", "full")])
def test_shortcut_letters(letter, name):
    assert canonical_shortcut(letter) == name


def test_net_names():
    assert net_name(True, 56, "identity") == "resnet56-A"
    assert net_name(True, 34, "projection") == "resnet34-B"
    assert net_name(False, 56, None) == "plain56"
    assert net_name(True, 50, "projection", "bottleneck", "3x3") == "resnet50-B-v1.5"  # torchvision's block
    assert net_name(True, 50, "projection", "bottleneck", "1x1") == "resnet50-B"  # the paper's: Table 3's name
    assert net_name(True, 34, "projection", "basic", "3x3") == "resnet34-B"  # no bottleneck to stride


@pytest.mark.parametrize(
    "args, message",
    [
        ((21, True, "basic", "cifar", "A", 10), "model.depth=21 is not a CIFAR depth of basic blocks; it must be 6n+2"),
        ((2, True, "basic", "cifar", "A", 10), "model.depth=2 is not a CIFAR depth of basic blocks"),
        (
            (21, True, "bottleneck", "cifar", "A", 10),
            "model.depth=21 is not a CIFAR depth of bottleneck blocks; it must be 9n+2",
        ),
        ((20, True, "wide", "cifar", "A", 10), "model.block='wide' is not an option; choose one of basic, bottleneck"),
        ((20, True, "basic", "tiny", "A", 10), "model.stem='tiny' is not an option; choose one of cifar, imagenet"),
        (
            (26, True, "basic", "imagenet", "A", 10),
            "model.depth=26 is not an ImageNet depth; choose one of 18, 34, 50, 101, 152",
        ),
        ((50, True, "basic", "imagenet", "A", 10), "model.depth=50 uses bottleneck blocks"),
        (
            (50, True, "bottleneck", "imagenet", "B", 10, "2x2"),
            "model.bottleneck_stride='2x2' is not an option; choose 1x1 (the paper's, Table 1) or 3x3 (torchvision's v1.5)",
        ),
        (
            (20, True, "basic", "cifar", "X", 10),
            "shortcut='X' is not an option; choose identity (A), projection (B), full (C) or gated (Highway's)",
        ),
    ],
)
def test_bad_model_values_name_the_value_and_the_choices(args, message):
    with pytest.raises(ResexpError, match=re.escape(message)):
        build_model(*args)


def authors_count(block: str, units: int, widths: tuple[int, ...], classes: int = 10) -> int:
    """Parameters of a pre-activation CIFAR net as the authors' code defines it (He et al.'s
    resnet-1k-layers resnet-pre-act.lua; Wide ResNet's wide-resnet.lua): a 3x3 conv stem; units of BN
    (scale, shift), ReLU and conv, bias-free; where the width changes, a bias-free 1x1 projection with no BN;
    a last BN and the classifier."""
    count, channels = 3 * widths[0] * 9, widths[0]
    for planes in widths[1:]:
        for unit in range(units):
            out = planes * (4 if block == "bottleneck" else 1)
            if block == "bottleneck":
                count += 2 * channels + channels * planes + 2 * planes + planes * planes * 9 + 2 * planes + planes * out
            else:
                count += 2 * channels + channels * planes * 9 + 2 * planes + planes * planes * 9
            count += channels * out if unit == 0 and channels != out else 0
            channels = out
    return count + 2 * channels + channels * classes + classes


# He et al. 2016, Table 3: pre-activation ResNet-164 1.7M parameters, ResNet-1001 10.2M; their code makes
# 1,703,258 and 10,327,706 (authors_count). resexp 0.8 had 896 more: a BN after each of the 3 projections.
@pytest.mark.parametrize(("depth", "reported"), [(164, 1.7e6), (1001, 10.2e6)])
def test_pre_activation_bottleneck_nets_have_the_authors_parameter_counts(depth, reported):
    with torch.device("meta"):
        residual = build_model(depth, True, "bottleneck", "cifar", "B", 10, preactivation=True)
        plain = build_model(depth, False, "bottleneck", "cifar", "B", 10, preactivation=True)
        older = build_model(
            depth, True, "bottleneck", "cifar", "B", 10, preactivation=True, preact_shortcut="resexp-0.8"
        )
    assert count_parameters(residual) == authors_count("bottleneck", (depth - 2) // 9, (16, 16, 32, 64))
    assert count_parameters(residual) == pytest.approx(reported, rel=0.015)
    projections = sum(c_in * c_out for c_in, c_out in [(16, 64), (64, 128), (128, 256)])
    assert count_parameters(residual) - count_parameters(plain) == projections  # the twins differ in shortcuts alone
    assert count_parameters(older) - count_parameters(residual) == 2 * (64 + 128 + 256)  # resexp 0.8's BNs


def test_a_pre_activation_nets_identity_path_carries_the_stems_output_through_unchanged():
    torch.manual_seed(0)
    model = build_model(20, True, "basic", "cifar", "A", 10, preactivation=True).double().eval()
    original = build_model(20, True, "basic", "cifar", "A", 10).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for net, last in ((model, "conv2"), (original, "bn2")):
        for block in net.stages[0]:
            nn.init.zeros_(getattr(block, last).weight)  # every residual branch of the first stage outputs zero
    with torch.no_grad():
        stem = model.stem(x)
        assert stem.min() < 0  # no ReLU after the stem: its BN and ReLU begin the first block
        # nothing after an addition: x + 0 = x; from the first unit on, x is conv1's output after that unit's
        # BN and ReLU, "the first activation right after conv1 and before splitting" (He et al. 2016, appendix)
        first = model.stages[0][0]
        assert torch.equal(model.stages[0](stem), torch.relu(first.bn1(stem)))
        stem = original.stem(x)
        assert torch.equal(original.stages[0](stem), stem)  # relu(x + 0) = x, the stem's output is a ReLU's
    names = [
        net_name(True, 164, "projection", "bottleneck", "1x1", True),
        net_name(False, 110, None, preactivation=True),
    ]
    assert names == ["resnet164-B-preact", "plain110-preact"]


def test_a_pre_activation_net_ends_with_bn_and_relu_before_the_pooling():
    torch.manual_seed(0)
    model = build_model(20, True, "basic", "cifar", "A", 10, preactivation=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.stages(model.stem(x))
        expected = model.fc(torch.relu(model.final[0](features)).mean((2, 3)))
        assert torch.equal(model(x), expected)


# The relatives' parameter counts as their papers give them: Wide ResNet's Table (Zagoruyko & Komodakis
# 2016: WRN-16-8 11.0M, WRN-28-10 36.5M, WRN-40-4 8.9M), ResNeXt's Table 7 (Xie et al. 2017: ResNeXt-29
# 8x64d 34.4M, 16x64d 68.1M); within 1%, since they give three digits.
WRN_WIDTHS = {8: (16, 128, 256, 512), 10: (16, 160, 320, 640), 4: (16, 64, 128, 256)}


@pytest.mark.parametrize(("depth", "k", "reported"), [(14, 8, 11.0e6), (26, 10, 36.5e6), (38, 4, 8.9e6)])
def test_wide_resnets_have_their_papers_parameter_counts(depth, k, reported):
    with torch.device("meta"):
        model = build_model(depth, True, "basic", "cifar", "B", 10, preactivation=True, widths=WRN_WIDTHS[k])
    assert count_parameters(model) == pytest.approx(reported, rel=0.01)
    assert count_parameters(model) == authors_count("basic", (depth - 2) // 6, WRN_WIDTHS[k])  # 36,479,194 for 28-10
    assert [stage[0].conv1.out_channels for stage in model.stages] == [16 * k, 32 * k, 64 * k]


@pytest.mark.parametrize(("cardinality", "reported"), [(8, 34.4e6), (16, 68.1e6)])
def test_resnext29_has_its_papers_parameter_count_and_grouped_3x3_convs(cardinality, reported):
    with torch.device("meta"):
        model = build_model(
            29, True, "bottleneck", "cifar", "B", 10, "3x3", widths=(64, 64, 128, 256), cardinality=cardinality
        )
    assert count_parameters(model) == pytest.approx(reported, rel=0.01)
    first, last = model.stages[0][0], model.stages[2][-1]
    assert (first.conv2.groups, first.conv2.in_channels, first.conv3.out_channels) == (
        cardinality,
        cardinality * 64,
        256,
    )
    assert (last.conv2.in_channels, last.conv3.out_channels) == (
        cardinality * 256,
        1024,
    )  # the groups widen with the planes


@pytest.mark.parametrize(
    ("variant", "theirs"),
    [
        ({"cardinality": 32, "base_width": 4}, "resnext50_32x4d"),
        ({"cardinality": 32, "base_width": 8}, "resnext101_32x8d"),
        ({"base_width": 128}, "wide_resnet50_2"),
    ],
)
def test_imagenet_resnext_and_wide_bottlenecks_equal_torchvisions(variant, theirs):
    depth = int(re.search(r"\d+", theirs)[0])
    with torch.device("meta"):
        ours = build_model(depth, True, "bottleneck", "imagenet", "B", 1000, "3x3", **variant)
        reference = getattr(torchvision.models, theirs)(weights=None)
    assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in reference.parameters()]
    spec = NetSpec(depth, True, "bottleneck", "imagenet", "projection", 1000, "3x3", **variant)
    rename = torchvision_keys(spec)  # the export's second file loads into torchvision's net
    assert [rename(key) for key in ours.state_dict()] == list(reference.state_dict())


def test_a_wide_resnets_dropout_sits_between_its_convs_and_is_off_in_eval_mode():
    widths = (16, 32, 64, 128)
    torch.manual_seed(0)
    model = build_model(14, True, "basic", "cifar", "B", 10, preactivation=True, widths=widths, dropout=0.3).double()
    torch.manual_seed(0)
    plain = build_model(14, True, "basic", "cifar", "B", 10, preactivation=True, widths=widths).double()
    plain.load_state_dict(model.state_dict())  # dropout holds no weights: the same state dict
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))
        seen = {}
        for name, net in (("dropout", model), ("none", plain)):
            net.stages[0][0].conv2.register_forward_pre_hook(
                lambda module, args, name=name: seen.setdefault(name, args[0])
            )
            net.train()(x)
    assert isinstance(model.stages[0][0].dropout, nn.Dropout) and model.stages[0][0].dropout.p == 0.3
    # what reaches the second conv: the same ReLU output (the same weights, BN's batch statistics), of
    # which dropout zeroes 30% and scales the rest by 1 / 0.7 (64k values: a 0.3 rate shows within 0.01)
    kept = seen["dropout"] != 0
    alive = seen["none"] != 0
    assert 1 - kept[alive].double().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.allclose(seen["dropout"][kept], seen["none"][kept] / 0.7)


def test_relatives_names():
    assert net_name(True, 26, "projection", preactivation=True, widths=(16, 160, 320, 640)) == "wrn28-10-B-preact"
    assert (
        net_name(True, 26, "projection", preactivation=True, widths=(16, 160, 320, 640), dropout=0.3)
        == "wrn28-10-B-preact-dropout0.3"
    )
    assert (
        net_name(True, 29, "projection", "bottleneck", "3x3", widths=(64, 64, 128, 256), cardinality=8)
        == "resnext29-8x64d-B"
    )
    assert net_name(True, 50, "projection", "bottleneck", "3x3", stem="imagenet", cardinality=32, base_width=4) == (
        "resnext50-32x4d-B"
    )
    assert net_name(True, 20, "identity", widths=(16, 16, 32, 48)) == "resnet20-A-widths16-16-32-48"
    assert net_name(True, 20, "identity", widths=(16, 16, 32, 64)) == "resnet20-A"  # the paper's widths
    assert net_name(False, 26, None, widths=(16, 160, 320, 640)) == "plain-wrn28-10"


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        (
            {"widths": (16, 32, 64)},
            "model.widths=[16, 32, 64] must be 4 positive integers, the stem's width and each stage's planes (the paper's: [16, 16, 32, 64]), or null",
        ),
        (
            {"cardinality": 8},
            "model.cardinality=8 and model.base_width=64 group a bottleneck's 3x3 conv (ResNeXt); a basic block has none",
        ),
        ({"dropout": 1.5}, "model.dropout=1.5 is not a rate; choose one in [0, 1)"),
        ({"cardinality": 0}, "model.cardinality=0, model.base_width=64 must be positive integers"),
    ],
)
def test_bad_variant_values_name_the_value_and_the_choices(variant, message):
    with pytest.raises(ResexpError, match=re.escape(message)):
        build_model(20, True, "basic", "cifar", "A", 10, **variant)


def test_dropout_is_refused_in_a_bottleneck():
    with pytest.raises(
        ResexpError, match=re.escape("model.dropout=0.3 is Wide ResNet's, between a basic block's convs")
    ):
        build_model(29, True, "bottleneck", "cifar", "B", 10, dropout=0.3)
