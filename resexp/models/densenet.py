"""DenseNet (Huang et al. 2017, "Densely Connected Convolutional Networks", arXiv:1608.06993), the
relative whose skip connections concatenate rather than add: in a dense block, layer l takes
[x_0, x_1, ..., x_{l-1}], the maps of every layer before it, and adds k maps of its own (k, the growth
rate), where a residual block computes F(x) + x (their §3, Eq. 2 against Eq. 1).

Their CIFAR nets (§3, "Implementation Details"): a 3x3 stem conv, three dense blocks on 32x32, 16x16
and 8x8 maps, a transition (BN, ReLU, 1x1 conv, 2x2 average pooling) between two blocks, and BN, ReLU,
global average pooling and the classifier after the last. Each layer is BN-ReLU-Conv(3x3); DenseNet-B's
first reduces to 4k maps with BN-ReLU-Conv(1x1), DenseNet-C's transitions keep a fraction θ of the maps.
A net of depth L has (L - 4) / 3 layers per block, half as many with the 1x1 convs (both weighted).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from resexp.errors import ResexpError
from resexp.models.blocks import conv, dropout
from resexp.models.names import canonical_shortcut, densenet_name

BLOCKS = {"basic": "DenseNet's BN-ReLU-Conv(3x3) layers", "bottleneck": "DenseNet-B's 1x1 conv to 4k maps first"}
BLOCKS_PER_NET = 3  # their CIFAR nets' dense blocks


class Concatenate(nn.Module):
    """[x, new] along the channels: a layer's input and its k new maps. A module of its own so that a group
    of copies (resexp/group.py) can concatenate each copy's channels to its own."""

    def forward(self, x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, new], 1)

    def grouped(self, copies: int) -> GroupedConcatenate:
        """This layer in a group of `copies` side by side along the channels (resexp/group.py)."""
        return GroupedConcatenate(copies)


class GroupedConcatenate(Concatenate):
    """A DenseNet layer's concatenation in a group: each copy's new maps after its own input's, so that
    every copy's channels stay one block (a plain torch.cat would put all the copies' new maps last)."""

    def __init__(self, copies: int) -> None:
        nn.Module.__init__(self)
        self.copies = copies

    def forward(self, x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        # joined as (B, H, W, K, C), the group's channels_last memory order, as blocks.GroupedZeroPad pads
        x, new = (t.permute(0, 2, 3, 1).unflatten(3, (self.copies, -1)) for t in (x, new))
        return torch.cat([x, new], 4).flatten(3).permute(0, 3, 1, 2)


class DenseLayer(nn.Module):
    """H_l of Eq. 2: its input's maps, then `growth_rate` new ones computed from all of them."""

    responds_at_conv = True  # the maps its 3x3 conv adds are its response (resexp.models.responses_at_conv)

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: bool, dropout_rate: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        if bottleneck:  # DenseNet-B: each 1x1 conv makes 4k maps (§3, "Bottleneck layers")
            width = 4 * growth_rate
            layers += [nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True), conv(in_channels, width, 1)]
            layers.append(dropout(dropout_rate))
        layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True), conv(width, growth_rate, 3), dropout(dropout_rate)]
        self.branch = nn.Sequential(*layers)
        self.join = Concatenate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the branch's in-place ReLUs act on its BNs' outputs, never on x, which goes on whole
        return self.join(x, self.branch(x))


def transition(in_channels: int, out_channels: int, dropout_rate: float) -> nn.Sequential:
    """Between two dense blocks: BN, ReLU, a 1x1 conv to `out_channels` (θ of its input's) and 2x2 average
    pooling, which halves the maps (§3, "Transition layers")."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        conv(in_channels, out_channels, 1),
        dropout(dropout_rate),
        nn.AvgPool2d(2),
    )


def block_inputs(layers: int, growth_rate: int, bottleneck: bool, compression: float) -> list[int]:
    """The maps that enter each dense block: the stem's, then what each transition keeps."""
    # §3: the stem makes 16 maps, or twice the growth rate for DenseNet-BC (their code: 2k for all)
    inputs = [2 * growth_rate if bottleneck else 16]
    for _ in range(BLOCKS_PER_NET - 1):
        inputs.append(math.floor(compression * (inputs[-1] + layers * growth_rate)))  # their code rounds down
    return inputs


class DenseNet(nn.Module):
    """Stem, dense blocks (each followed by a transition but the last), BN and ReLU, global average
    pooling and the classifier: the same stem/stages/final/fc as resexp's ResNet, for the probes."""

    def __init__(
        self,
        layers: int,
        growth_rate: int,
        bottleneck: bool,
        compression: float,
        num_classes: int,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        channels, *kept = block_inputs(layers, growth_rate, bottleneck, compression)
        self.stem = nn.Sequential(conv(3, channels, 3))  # its BN and ReLU begin the first layer
        stages = []
        for index in range(BLOCKS_PER_NET):
            block: list[nn.Module] = []
            for _ in range(layers):
                block.append(DenseLayer(channels, growth_rate, bottleneck, dropout_rate))
                channels += growth_rate
            if index < BLOCKS_PER_NET - 1:
                block.append(transition(channels, kept[index], dropout_rate))
                channels = kept[index]
            stages.append(nn.Sequential(*block))
        self.stages = nn.Sequential(*stages)
        self.final = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # He initialisation, as theirs (their code: fan-out)
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final(self.stages(self.stem(x)))  # (B, 342, 8, 8) for DenseNet-BC (L=100, k=12)
        return self.fc(x.mean((2, 3)))  # a mean: its gradient is deterministic on CUDA (ResNet.forward)


@dataclass(frozen=True)
class DenseNetSpec:
    """A DenseNet, as data: checked against its paper's choices when made. It has the fields of NetSpec
    that runs, logs and reports read (depth, residual, shortcut, stem, num_classes), and the family's facts
    (resexp/models/__init__.py's Family)."""

    ARCH: ClassVar[str] = "densenet"  # model.arch
    TITLE: ClassVar[str] = "DenseNet"  # a figure's panel of its nets (beside the ResNets)
    OLDER: ClassVar[dict[str, Any]] = {}  # it came in 0.7.0 with every key it has

    depth: int  # L: the weighted layers, the stem conv, the layers' convs, the transitions' and the classifier
    block: str  # BLOCKS
    growth_rate: int = 12  # k: the maps each layer adds
    compression: float = 0.5  # θ: the fraction of maps a transition keeps (DenseNet-C: 0.5; 1: none)
    num_classes: int = dataclasses.field(kw_only=True)
    dropout: float = 0.0  # after each conv but the stem's (their rate without data augmentation: 0.2)
    residual: bool = True  # its layers' skip connections are on; a DenseNet has no plain twin here
    shortcut: str = "identity"  # its skip connections: the layers' inputs, passed on whole
    stem: str = "cifar"  # the CIFAR nets of their §3

    def __post_init__(self) -> None:
        self.layers_per_block()
        if not isinstance(self.growth_rate, int) or self.growth_rate < 1:
            raise ResexpError(f"model.growth_rate={self.growth_rate!r} must be a positive integer (theirs: 12, 24, 40)")
        if not 0.0 < self.compression <= 1.0:
            raise ResexpError(f"model.compression={self.compression!r} must be in (0, 1] (DenseNet-C: 0.5; 1: none)")
        inputs = block_inputs(self.layers_per_block(), self.growth_rate, self.block == "bottleneck", self.compression)
        if min(inputs) < 1:
            raise ResexpError(
                f"model.compression={self.compression!r} leaves a transition no maps to pass on (the dense blocks "
                f"would take {inputs} maps); choose a larger one (DenseNet-C's: 0.5)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ResexpError(f"model.dropout={self.dropout!r} is not a rate; choose one in [0, 1) (theirs: 0.2)")
        if not self.residual:
            raise ResexpError(
                "model.residual=false: a DenseNet's layers are built on its concatenations, so resexp has no "
                "plain twin of it; compare it with plain nets of the same depth (model=plain110, ...)"
            )
        if self.shortcut != "identity":
            raise ResexpError(
                f"shortcut={self.shortcut!r}: a DenseNet has no shortcut options (each layer's input is passed "
                "on whole, concatenated); leave shortcut at identity"
            )
        if self.stem != "cifar":
            raise ResexpError(
                f"model.stem={self.stem!r}: resexp builds Huang et al.'s CIFAR DenseNets only; use model.stem=cifar"
            )

    def layers_per_block(self) -> int:
        """Dense layers per block, or a clear error naming the valid depths."""
        if self.block not in BLOCKS:
            choices = " or ".join(f"{name} ({what})" for name, what in BLOCKS.items())
            raise ResexpError(f"model.block={self.block!r} is not an option for a DenseNet; choose {choices}")
        convs = 2 if self.block == "bottleneck" else 1
        step = BLOCKS_PER_NET * convs
        if not isinstance(self.depth, int) or self.depth < step + 4 or (self.depth - 4) % step:
            form = {"basic": "3n+4 (theirs: 40, 100)", "bottleneck": "6n+4 (theirs: 100, 190, 250)"}[self.block]
            raise ResexpError(
                f"model.depth={self.depth!r} is not a DenseNet depth of {self.block} layers; it must be {form}"
            )
        return (self.depth - 4) // step

    @classmethod
    def from_model(cls, model: Mapping[str, Any], shortcut: str, num_classes: int, **missing: Any) -> DenseNetSpec:
        """The DenseNet a config's model node makes (the shortcut also by the paper's letter)."""
        fields = [f.name for f in dataclasses.fields(cls) if f.name not in ("shortcut", "num_classes")]
        values = {name: model[name] for name in fields if model.get(name) is not None}
        return cls(**values, shortcut=canonical_shortcut(shortcut), num_classes=num_classes)

    @classmethod
    def name_of(cls, model: Mapping[str, Any], shortcut: str | None, **missing: Any) -> str:
        """The name of a config's model node, unchecked; keys it lacks take their defaults."""
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        get = {key: fields[key] if model.get(key) is None else model[key] for key in ("growth_rate", "compression")}
        return densenet_name(model["depth"], model.get("block") or "basic", **get, dropout=model.get("dropout") or 0.0)

    @staticmethod
    def unused(values: Mapping[str, Any]) -> set[str]:
        """No key of its own changes nothing in a DenseNet."""
        return set()

    def as_recorded(self, recorded: Mapping[str, Any]) -> DenseNetSpec:
        """Every key it has was recorded since it came: the net as made."""
        return self

    @staticmethod
    def renamed_0_9(name: str, residual: bool) -> str:
        """Its nets are named as they were."""
        return name

    @property
    def kin(self) -> str:
        """Its name: a figure's colour for each DenseNet (NetSpec.kin)."""
        return self.name

    def legend(self, letter: bool) -> str:
        """DenseNet (L=40, k=12), DenseNet-BC (L=100, k=12) as their paper names them, with θ and dropout."""
        letters = ("B" if self.block == "bottleneck" else "") + ("C" if self.compression < 1 else "")
        name = f"DenseNet{'-' + letters if letters else ''} (L={self.depth}, k={self.growth_rate})"
        if self.compression not in (0.5, 1.0):
            name += f", θ {self.compression:g}"
        return name + (f" dropout {self.dropout:g}" if self.dropout else "")

    def torchvision_keys(self) -> None:
        """None: torchvision's DenseNets are ImageNet's, a CIFAR one has no torchvision twin."""
        return None

    @property
    def name(self) -> str:
        return densenet_name(self.depth, self.block, self.growth_rate, self.compression, self.dropout)

    @property
    def widest(self) -> int:
        """The most channels a layer reads or writes: the last concatenation of the widest block."""
        layers = self.layers_per_block()
        inputs = block_inputs(layers, self.growth_rate, self.block == "bottleneck", self.compression)
        return max(max(inputs) + layers * self.growth_rate, 4 * self.growth_rate)

    @property
    def shortcut_option(self) -> str | None:
        """None: no shortcut option to show, as a plain net's (NetSpec.shortcut_option)."""
        return None

    def model_values(self) -> dict[str, Any]:
        """The model keys this net is made of, as a checkpoint records them."""
        keys = ("depth", "block", "growth_rate", "compression", "dropout", "residual", "stem")
        return {"model.arch": "densenet", **{f"model.{key}": getattr(self, key) for key in keys}}

    def build(self) -> DenseNet:
        bottleneck = self.block == "bottleneck"
        return DenseNet(
            self.layers_per_block(), self.growth_rate, bottleneck, self.compression, self.num_classes, self.dropout
        )
