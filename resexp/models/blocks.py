"""The blocks of resexp's nets: the paper's (He et al. 2015, §3.3, Fig. 2 and 5), BN after each
convolution and a ReLU after the addition, and the pre-activation units of He et al. 2016 ("Identity
Mappings in Deep Residual Networks", arXiv:1603.05027, Fig. 1b and 4e), BN and ReLU before each
convolution and nothing after the addition, so that the identity path runs clean from block to block.
Each computes its plain twin with Skip(residual=False) (no shortcut, the same layers), and `skip`, what it
computes with its residual branch at zero: the block deleted, for a lesion study (resexp/probes.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from resexp.models.names import GATE_BIAS


class ZeroPadShortcut(nn.Module):
    """Option A (§3.3): identity, subsampled by `stride` and zero-padded to `out_channels`; no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def grouped(self, copies: int) -> GroupedZeroPad:
        """This layer in a group of `copies` side by side along the channels (resexp/group.py)."""
        return GroupedZeroPad(copies, self)


class GroupedZeroPad(ZeroPadShortcut):
    """Option A's zero channels added to each copy's block of channels, not after the last copy's."""

    def __init__(self, copies: int, shortcut: ZeroPadShortcut) -> None:
        nn.Module.__init__(self)
        self.copies, self.extra_channels, self.stride = copies, shortcut.extra_channels, shortcut.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Padded as (B, H, W, K, C), the group's channels_last memory order, so the residual add reads
        # both of its terms in one layout.
        x = x[:, :, :: self.stride, :: self.stride].permute(0, 2, 3, 1).unflatten(3, (self.copies, -1))
        return F.pad(x, (0, self.extra_channels)).flatten(3).permute(0, 3, 1, 2)


def projection(in_channels: int, out_channels: int, stride: int, bn: bool = True) -> nn.Sequential:
    """Options B and C (§3.3, Eq. 2): y = F(x) + W_s x with W_s a strided 1x1 conv, followed by BN in the
    2015 units (`bn`; torchvision's too). A pre-activation unit's projection reads the input its BN and
    ReLU made and has no BN of its own (He et al.'s resnet-1k-layers code, Wide ResNet's likewise)."""
    layers = [nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)]
    return nn.Sequential(*layers, *([nn.BatchNorm2d(out_channels)] if bn else []))


class HighwayShortcut(nn.Module):
    """shortcut=gated: the identity (option A's zero padding where the dimensions change) carried through
    a learned gate, y = T(x)·F(x) + (1 - T(x))·x, as a Highway network's layer is (Srivastava et al.
    2015, "Highway Networks", Eq. 3, a transform gate T and a carry gate 1 - T) and as He et al. 2016's
    "exclusive gating" (§3.1) is: T(x) = sigmoid(W_T x + b_T) with a 1x1 conv W_T, one gate per channel
    and position. A negative b_T starts the gates mostly carrying x (Highway Networks, §2.2); on ResNet-110
    He et al. 2016 found 0 to -5 fail and -6 best (GATE_BIAS), 8.70% against the identity's 6.61% (their
    Table 1). Called alone it gives the carried part, (1 - T(x))·x: the block with its branch deleted."""

    def __init__(self, carry: nn.Module, in_channels: int, out_channels: int, stride: int, gate_bias: float) -> None:
        super().__init__()
        self.carry = carry  # option A's shortcut for these dimensions
        self.transform = nn.Conv2d(in_channels, out_channels, 1, stride=stride)  # W_T, b_T
        nn.init.constant_(self.transform.bias, gate_bias)

    def join(self, branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # carry + T * (F - carry) = T·F + (1 - T)·carry, in one kernel; lerp takes one dtype, where `+`
        # would promote bf16 and fp32 operands to fp32
        carry, gate = self.carry(x), torch.sigmoid(self.transform(x))
        dtype = torch.promote_types(torch.promote_types(carry.dtype, branch.dtype), gate.dtype)
        return torch.lerp(carry.to(dtype), branch.to(dtype), gate.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - torch.sigmoid(self.transform(x))) * self.carry(x)


@dataclass(frozen=True)
class Skip:
    """A block's skip connection: none (`residual=False`, the plain twin of §3.3), or a shortcut option
    (identity, projection, full or gated) with, for gated, the gates' initial bias."""

    residual: bool
    option: str
    gate_bias: float = GATE_BIAS
    projection_bn: bool = True  # a BN after a projection's 1x1 conv (the 2015 units'; see projection)

    def make(self, in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
        """The one place where the shortcut of a block is decided (None: a plain block has none)."""
        if not self.residual:
            return None
        changes = stride != 1 or in_channels != out_channels
        identity = ZeroPadShortcut(in_channels, out_channels, stride) if changes else nn.Identity()  # option A
        if self.option == "gated":
            return HighwayShortcut(identity, in_channels, out_channels, stride, self.gate_bias)
        if self.option == "full" or (self.option == "projection" and changes):
            return projection(in_channels, out_channels, stride, self.projection_bn)
        return identity


def add_shortcut(branch: torch.Tensor, shortcut: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y = F(x) + shortcut(x) (Eq. 1-2), or a gated shortcut's T(x)·F(x) + (1 - T(x))·x."""
    if isinstance(shortcut, HighwayShortcut):
        return shortcut.join(branch, x)
    return branch + shortcut(x)


def conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # BN comes right before or after each convolution (§3.4): the conv needs no bias.
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)


def conv_bn(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1
) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A convolution and the BN right after it, before the activation (§3.4)."""
    return conv(in_channels, out_channels, kernel, stride, groups), nn.BatchNorm2d(out_channels)


def dropout(rate: float) -> nn.Module:
    """Wide ResNet's dropout between a basic block's two convolutions (Zagoruyko & Komodakis 2016, §2.3),
    and DenseNet's after each conv; nothing at rate 0, so that the 2015 nets hold no extra module."""
    return nn.Dropout(rate) if rate else nn.Identity()


def bottleneck_width(planes: int, cardinality: int, base_width: int) -> int:
    """The width of a bottleneck's 3x3 conv: `planes` in the 2015 block; ResNeXt's (Xie et al. 2017,
    Table 1) `cardinality` groups of `base_width` channels each per 64 planes (ResNeXt-29 8x64d: 8 x 64
    = 512 in its first stage of 64 planes), as torchvision's `groups` and `width_per_group` make it."""
    return planes * base_width // 64 * cardinality


class BasicBlock(nn.Module):
    """Two 3x3 convs (Fig. 2 / Fig. 5 left); the first one strides when the stage downsamples."""

    unit = True  # a unit that the lesion study deletes (resexp.models.units)
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, skip: Skip, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, planes, 3, stride)
        self.dropout = dropout(dropout_rate)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3)
        self.shortcut = skip.make(in_channels, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(F.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = add_shortcut(out, self.shortcut, x)  # y = F(x) + x, then the second nonlinearity (Eq. 1)
        return F.relu(out)

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 restore to 4x the width (Fig. 5 right). A downsampling block strides in its
    first 1x1 (the paper's) or in its 3x3 (torchvision's v1.5): BOTTLENECK_STRIDES. With cardinality > 1,
    ResNeXt's block (Xie et al. 2017, Fig. 3c): the 3x3 conv grouped, and as wide as bottleneck_width says."""

    unit = True  # a unit that the lesion study deletes (resexp.models.units)
    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, stride: int, skip: Skip, stride_at: str, cardinality: int, base_width: int
    ) -> None:
        super().__init__()
        width = bottleneck_width(planes, cardinality, base_width)
        self.conv1, self.bn1 = conv_bn(in_channels, width, 1, stride if stride_at == "1x1" else 1)
        self.conv2, self.bn2 = conv_bn(width, width, 3, stride if stride_at == "3x3" else 1, cardinality)
        self.conv3, self.bn3 = conv_bn(width, planes * self.expansion, 1)
        self.shortcut = skip.make(in_channels, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.shortcut is not None:
            out = add_shortcut(out, self.shortcut, x)
        return F.relu(out)

    skip = BasicBlock.skip


class PreActBasicBlock(nn.Module):
    """BN, ReLU, 3x3 conv, twice, then the addition alone (He et al. 2016, Fig. 4e). Where the
    dimensions change, the shortcut (a projection or option A's subsampling) reads the pre-activated
    input, which the residual branch reads too; elsewhere it reads the block's input itself, so that
    the identity path carries it unchanged. So does the net's first unit, `first` (He et al. 2016,
    appendix: "we adopt the first activation right after conv1 and before splitting into two paths")."""

    unit = True  # a unit that the lesion study deletes (resexp.models.units)
    # its 3x3 conv's own output is what it hands on: the response of Fig. 7 (resexp.models.responses_at_conv)
    responds_at_conv = True
    expansion = 1

    def __init__(
        self, in_channels: int, planes: int, stride: int, skip: Skip, dropout_rate: float = 0.0, first: bool = False
    ) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(in_channels), conv(in_channels, planes, 3, stride)
        self.dropout = dropout(dropout_rate)  # Wide ResNet's, after the second ReLU (their Fig. 1d)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), conv(planes, planes, 3)
        self.shortcut = skip.make(in_channels, planes, stride)
        # decided here, where the shortcut reads the pre-activated input: grouping wraps the shortcut (group.py)
        self.changes = stride != 1 or in_channels != planes or first

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.dropout(F.relu(self.bn2(self.conv1(pre)))))

    def shortcut_input(self, x: torch.Tensor, pre: torch.Tensor | None = None) -> torch.Tensor:
        if not self.changes:
            return x  # the identity (or option C's projection) of the block's own input
        return F.relu(self.bn1(x)) if pre is None else pre

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(self.shortcut_input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.branch(pre)
        return out if self.shortcut is None else add_shortcut(out, self.shortcut, self.shortcut_input(x, pre))


class PreActBottleneck(PreActBasicBlock):
    """BN, ReLU and a conv before each of 1x1 reduce, 3x3, 1x1 restore to 4x the width (He et al. 2016,
    Fig. 1b with a bottleneck); strided and grouped as the 2015 bottleneck is (`stride_at`, `cardinality`)."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        skip: Skip,
        stride_at: str,
        cardinality: int,
        base_width: int,
        first: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        width = bottleneck_width(planes, cardinality, base_width)
        self.bn1, self.conv1 = (
            nn.BatchNorm2d(in_channels),
            conv(in_channels, width, 1, stride if stride_at == "1x1" else 1),
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv(width, width, 3, stride if stride_at == "3x3" else 1, cardinality)
        self.bn3, self.conv3 = nn.BatchNorm2d(width), conv(width, planes * self.expansion, 1)
        self.shortcut = skip.make(in_channels, planes * self.expansion, stride)
        self.changes = stride != 1 or in_channels != planes * self.expansion or first

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn2(self.conv1(pre)))
        return self.conv3(F.relu(self.bn3(self.conv2(out))))
