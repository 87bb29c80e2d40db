import copy
import pickle
import re

import pytest
import torch
import torchvision
from torch import nn

from resexp.errors import ResexpError
from resexp.models import build_model, count_parameters
from resexp.models.resnet import ZeroPadShortcut, canonical_shortcut, net_name


def cifar(depth, residual=True, shortcut="identity"):
    return build_model(depth, residual, "basic", "cifar", shortcut, 10)


def imagenet(depth, residual=True, shortcut="projection"):
    block = "basic" if depth in (18, 34) else "bottleneck"
    return build_model(depth, residual, block, "imagenet", shortcut, 1000)


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


@pytest.mark.parametrize(
    "args, message",
    [
        ((21, True, "basic", "cifar", "A", 10), "model.depth=21 is not a CIFAR depth; it must be 6n+2"),
        ((2, True, "basic", "cifar", "A", 10), "model.depth=2 is not a CIFAR depth"),
        ((20, True, "bottleneck", "cifar", "A", 10), "model.block=bottleneck is not a CIFAR net"),
        ((20, True, "wide", "cifar", "A", 10), "model.block='wide' is not an option; choose one of basic, bottleneck"),
        ((20, True, "basic", "tiny", "A", 10), "model.stem='tiny' is not an option; choose one of cifar, imagenet"),
        (
            (26, True, "basic", "imagenet", "A", 10),
            "model.depth=26 is not an ImageNet depth; choose one of 18, 34, 50, 101, 152",
        ),
        ((50, True, "basic", "imagenet", "A", 10), "model.depth=50 uses bottleneck blocks"),
        (
            (20, True, "basic", "cifar", "X", 10),
            "shortcut='X' is not an option; choose identity (A), projection (B) or full (C)",
        ),
    ],
)
def test_bad_model_values_name_the_value_and_the_choices(args, message):
    with pytest.raises(ResexpError, match=re.escape(message)):
        build_model(*args)
