"""shortcut=gated: Highway networks' exclusive gates on ResNet's shortcuts (resexp/models/blocks.py,
HighwayShortcut), y = T(x)·F(x) + (1 - T(x))·x with T(x) = sigmoid(W_T x + b_T), as He et al. 2016 train
it in their Table 1. In float64, so that the block and the formula written out agree to rounding."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import resexp
from torch import nn

from resexp import paper
from resexp.errors import ResexpError
from resexp.models import build_model, count_parameters
from resexp.models.blocks import HighwayShortcut
from resexp.models.names import GATE_BIAS, canonical_shortcut, net_name
from resexp.models.resnet import NetSpec
from resexp.probes import lesioned


def gated(preactivation=False, gate_bias=GATE_BIAS, residual=True):
    torch.manual_seed(0)
    model = build_model(8, residual, "basic", "cifar", "gated", 10, preactivation=preactivation, gate_bias=gate_bias)
    return model.double().eval()


def zero_pad(x, channels, stride):
    x = x[:, :, ::stride, ::stride]
    return torch.cat([x, x.new_zeros(x.shape[0], channels - x.shape[1], *x.shape[2:])], 1)


@pytest.mark.parametrize("stage", [0, 1], ids=["same-dimensions", "downsampling"])
def test_a_gated_block_computes_the_highway_formula(stage):
    model = gated(gate_bias=0.0)  # half-open gates: both paths count
    block = model.stages[stage][0]
    for module in model.modules():  # BN's running statistics as a trained net's, not 0 and 1
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.running_mean, -0.5, 0.5)
            nn.init.uniform_(module.running_var, 0.5, 2.0)
    x = torch.randn(2, block.conv1.in_channels, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        branch = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        gate = torch.sigmoid(block.shortcut.transform(x))
        carry = x if stage == 0 else zero_pad(x, block.conv2.out_channels, 2)
        expected = F.relu(gate * branch + (1 - gate) * carry)
        assert 0.1 < gate.mean() < 0.9  # the gates mix, neither path is all there is
        torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
        # deleted, the block keeps what its gates carry: relu((1 - T(x))·x)
        with lesioned(model, [stage]):  # one block per stage
            torch.testing.assert_close(block(x), F.relu((1 - gate) * carry), rtol=1e-12, atol=1e-12)


def test_a_gated_pre_activation_block_gates_its_identity_path_and_nothing_follows():
    model = gated(preactivation=True, gate_bias=0.0)
    block = model.stages[1][0]  # downsampling: the shortcut and the gate read the pre-activated input
    x = torch.randn(2, 16, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        pre = F.relu(block.bn1(x))
        branch = block.branch(pre)
        gate = torch.sigmoid(block.shortcut.transform(pre))
        expected = gate * branch + (1 - gate) * zero_pad(pre, 32, 2)
        torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
        assert block(x).min() < 0  # no ReLU after the sum


def test_the_gates_start_at_their_bias_mostly_carrying_x():
    model = gated()
    gates = [m for m in model.modules() if isinstance(m, HighwayShortcut)]
    assert len(gates) == 3  # one per block (ResNet-8: one per stage), downsampling or not
    for gate in gates:
        assert torch.equal(gate.transform.bias, torch.full_like(gate.transform.bias, GATE_BIAS))
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        first = model.stages[0][0]
        t = torch.sigmoid(first.shortcut.transform(model.stem(x)))
    assert t.mean() < 0.05  # sigmoid(-6) = 0.0025, spread by W_T x


def test_gates_add_a_1x1_conv_and_its_biases_per_block_and_the_plain_twin_has_none():
    widths = [(16, 16)] * 3 + [(16, 32)] + [(32, 32)] * 2 + [(32, 64)] + [(64, 64)] * 2  # ResNet-20's blocks
    gates = sum(c_in * c_out + c_out for c_in, c_out in widths)
    resnet20, gated20 = (build_model(20, True, "basic", "cifar", shortcut, 10) for shortcut in ("A", "gated"))
    assert count_parameters(gated20) - count_parameters(resnet20) == gates
    plain = build_model(20, False, "basic", "cifar", "gated", 10)
    assert count_parameters(plain) == count_parameters(build_model(20, False, "basic", "cifar", "A", 10))
    assert not any(isinstance(m, HighwayShortcut) for m in plain.modules())


def test_gated_nets_are_named_and_compared_with_he_et_al_2016s_table_1():
    assert canonical_shortcut("gated") == canonical_shortcut("GATED") == "gated"
    assert net_name(True, 110, "gated") == "resnet110-gated"
    assert net_name(True, 110, "gated", gate_bias=-7.0) == "resnet110-gated-gatebias-7"
    assert net_name(True, 110, "identity", gate_bias=-7.0) == "resnet110-A"  # no gates, no bias to name
    assert net_name(False, 110, None, gate_bias=-7.0) == "plain110"
    for bias in (GATE_BIAS, -7.0):  # the two rows of their Table 1 that trained
        name = NetSpec(110, True, "basic", "cifar", "gated", 10, gate_bias=bias).name  # a run's name
        assert paper.lookup("cifar10", name).source == "He et al. 2016, Table 1 (exclusive gating)"


def test_bad_gate_values_name_the_value_and_the_choices():
    with pytest.raises(
        ResexpError,
        match=re.escape("shortcut='highway' is not an option; choose identity (A), projection (B), full (C) or gated"),
    ):
        canonical_shortcut("highway")
    with pytest.raises(ResexpError, match=re.escape("model.gate_bias=nan is not a number")):
        build_model(20, True, "basic", "cifar", "gated", 10, gate_bias=float("nan"))


def test_shortcut_gated_trains_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    args = ["data=synthetic", "schedule.iterations=3", "eval_points=1", "shortcut=gated", "model.gate_bias=-7"]
    result = resexp("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["net"] == "resnet20-gated-gatebias-7"
    default = tmp_path / "default"
    assert resexp("train", *args[:-1], f"hydra.run.dir={default}", cwd=tmp_path).returncode == 0
    # the bias is the gates' start: it names another run, with the same layers
    assert json.loads((default / "metrics.json").read_text())["params"] == metrics["params"]
