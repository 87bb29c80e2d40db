"""Plain and residual networks of He et al. 2015 (arXiv:1512.03385), one class for all of them.

A residual block computes y = relu(F(x) + shortcut(x)) (paper Eq. 1-2); its plain twin computes
y = relu(F(x)) with exactly the same layers, so the two differ only in the skip connection (§3.3).
CIFAR-10 nets (§4.2): 3x3 stem, widths 16/32/64, 6n+2 layers. ImageNet nets (Table 1): 7x7/2 stem and
3x3/2 max-pool, widths 64..512, basic blocks for 18/34 layers and bottleneck blocks for 50/101/152.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from resexp.errors import ResexpError
from resexp.models.blocks import (
    BasicBlock,
    Bottleneck,
    HighwayShortcut,
    PreActBasicBlock,
    PreActBottleneck,
    Skip,
    ZeroPadShortcut,
    conv,
    conv_bn,
)
from resexp.models.names import GATE_BIAS, PREACT_SHORTCUTS, SHORTCUTS, WIDTHS, canonical_shortcut, net_name

# re-exported for group and probes (the blocks) and for the modules that name nets
__all__ = [
    "SHORTCUTS",
    "BasicBlock",
    "Bottleneck",
    "HighwayShortcut",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ZeroPadShortcut",
    "canonical_shortcut",
    "net_name",
]

BLOCKS = ("basic", "bottleneck")
GATE_BIAS_LIMIT = 100.0  # |model.gate_bias|: sigmoid(±100) is 0 or 1 to float32's precision
# Where a downsampling bottleneck block strides: in its first 1x1 conv, as the paper's ResNet-50/101/152
# do (Table 1's 3.8/7.6/11.3 G multiply-adds), or in its 3x3 conv, torchvision's "ResNet v1.5", whose
# weights and published accuracies are of that block (4.1/7.8/11.5 G).
BOTTLENECK_STRIDES = {"1x1": "the paper's, Table 1", "3x3": "torchvision's v1.5"}
# "small": the ImageNet nets' stages behind a 3x3 stride-1 stem without max-pool, for packed ImageNet at
# small inputs (resexp/data/packed.py), as the downsampled-ImageNet nets do (Chrabaszcz et al. 2017): at
# 56x56 its stages see the maps of the paper's nets at 224x224, where the paper's stem would leave 2x2 maps
# before the last stage.
STEMS = ("cifar", "imagenet", "small")

# Table 1: blocks per stage of the ImageNet nets, and the block each depth uses.
IMAGENET_LAYERS = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
}


def stage_layers(stem: str, block: str, depth: int) -> list[int]:
    """Blocks per stage for a net of `depth` weighted layers, or a clear error naming valid depths."""
    if stem not in STEMS:
        raise ResexpError(f"model.stem={stem!r} is not an option; choose one of {', '.join(STEMS)}")
    if block not in BLOCKS:
        raise ResexpError(f"model.block={block!r} is not an option; choose one of {', '.join(BLOCKS)}")
    if stem == "cifar":
        # §4.2: 6n layers of 3x3 convs in three stages plus the stem conv and the fc layer; with
        # bottlenecks, 9n (He et al. 2016: ResNet-164 and -1001).
        per_block = {"basic": 2, "bottleneck": 3}[block]
        if not isinstance(depth, int) or depth < 3 * per_block + 2 or (depth - 2) % (3 * per_block):
            form, examples = {"basic": ("6n+2", "8, 14, 20, 26, ...: the paper's are 20, 32, 44, 56, 110, 1202; WRN-d-k is d-2"),
                              "bottleneck": ("9n+2", "11, 20, 29, ...: He et al. 2016's are 164 and 1001")}[block]  # fmt: skip
            raise ResexpError(
                f"model.depth={depth!r} is not a CIFAR depth of {block} blocks; it must be {form} ({examples})"
            )
        return [(depth - 2) // (3 * per_block)] * 3
    if depth not in IMAGENET_LAYERS:
        raise ResexpError(
            f"model.depth={depth!r} is not an ImageNet depth; choose one of {', '.join(map(str, IMAGENET_LAYERS))}"
        )
    paper_block, layers = IMAGENET_LAYERS[depth]
    if block != paper_block:
        raise ResexpError(
            f"model.depth={depth} uses {paper_block} blocks (paper Table 1), not {block}; "
            f"add model.block={paper_block} or start from model=resnet{depth}"
        )
    return layers


class ResNet(nn.Module):
    """Stem, stages of blocks (each but the first halves the map and doubles the width), global
    average pooling, and a fully connected classifier. `residual=False` gives the plain net."""

    def __init__(
        self,
        layers: list[int],
        block: str = "basic",
        stem: str = "cifar",
        residual: bool = True,
        shortcut: str = "identity",
        num_classes: int = 10,
        bottleneck_stride: str = "1x1",
        preactivation: bool = False,
        widths: tuple[int, ...] | None = None,
        cardinality: int = 1,
        base_width: int = 64,
        dropout: float = 0.0,
        gate_bias: float = GATE_BIAS,
        preact_shortcut: str = "authors",
    ) -> None:
        super().__init__()
        stem_width, *stage_widths = widths or WIDTHS[stem]
        authors = preact_shortcut == "authors"  # else as resexp 0.8 and before made them (PREACT_SHORTCUTS)
        block_class = {
            (False, "basic"): BasicBlock,
            (False, "bottleneck"): Bottleneck,
            (True, "basic"): PreActBasicBlock,
            (True, "bottleneck"): PreActBottleneck,
        }[preactivation, block]
        skip = Skip(residual, shortcut, gate_bias, projection_bn=not (preactivation and authors))
        options: dict = (
            {"dropout_rate": dropout}
            if block == "basic"
            else {"stride_at": bottleneck_stride, "cardinality": cardinality, "base_width": base_width}
        )
        if stem == "cifar" and preactivation:  # the first block's BN and ReLU follow the stem's conv
            self.stem = nn.Sequential(conv(3, stem_width, 3))
        elif stem in ("cifar", "small"):
            self.stem = nn.Sequential(*conv_bn(3, stem_width, 3), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(
                *conv_bn(3, stem_width, 7, stride=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)
            )
        stages, channels = [], stem_width
        for index, (planes, count) in enumerate(zip(stage_widths, layers)):
            blocks = []
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                # the unit right after a conv-only stem shares its BN-ReLU with its shortcut (He et al. 2016)
                first = (
                    {"first": True} if preactivation and authors and stem == "cifar" and not (index or position) else {}
                )
                blocks.append(block_class(channels, planes, stride, skip, **options, **first))
                channels = planes * block_class.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # pre-activation: the last block's sum is normalised and rectified before the pooling (He et al. 2016)
        self.final = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True)) if preactivation else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He initialisation [13], as the paper uses for all its nets (§3.4).
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, 16, 32, 32) on CIFAR; (B, 64, 56, 56) on 224x224 ImageNet
        x = self.final(self.stages(x))  # (B, 64 or 256, 8, 8) on CIFAR; (B, 512 or 2048, 7, 7) on ImageNet
        # Global average pooling (§3.4) as a mean: its gradient is deterministic on CUDA, that of
        # AdaptiveAvgPool2d is not (deterministic=true).
        return self.fc(x.mean((2, 3)))


@dataclass(frozen=True)
class NetSpec:
    """One net of the family, as data: checked against the paper's choices when made. The family's facts
    that the rest of resexp asks for (resexp/models/__init__.py's Family) are its class attributes and
    methods."""

    ARCH: ClassVar[str] = "resnet"  # model.arch
    TITLE: ClassVar[str] = ""  # a figure's panel of its nets: the paper's own ("plain", "ResNet")
    # What older runs, whose checkpoints did not record these keys, were: before 0.4.0 every bottleneck
    # strode in its 3x3 conv and every unit was the paper's; widths, groups and dropout came in 0.5.0, the
    # gates' bias in 0.6.0, and pre-activation shortcuts before 0.9.0 were resexp's own.
    OLDER: ClassVar[dict[str, Any]] = {
        "bottleneck_stride": "3x3",
        "preactivation": False,
        "widths": None,
        "cardinality": 1,
        "base_width": 64,
        "dropout": 0.0,
        "gate_bias": GATE_BIAS,
        "preact_shortcut": "resexp-0.8",
    }

    depth: int  # weighted layers: 6n+2 on CIFAR, 18/34/50/101/152 on ImageNet
    residual: bool  # False: the plain twin
    block: str  # basic or bottleneck
    stem: str  # cifar or imagenet
    shortcut: str  # identity, projection or full (canonical_shortcut); no effect on a plain net
    num_classes: int
    bottleneck_stride: str = "1x1"  # BOTTLENECK_STRIDES; no effect on basic blocks
    preactivation: bool = False  # True: He et al. 2016's units, BN and ReLU before each conv
    widths: tuple[int, ...] | None = None  # the stem's width, then each stage's planes; None: WIDTHS
    cardinality: int = 1  # ResNeXt's groups in a bottleneck's 3x3 conv
    base_width: int = 64  # ResNeXt's channels per group for each 64 planes (bottleneck_width)
    dropout: float = 0.0  # Wide ResNet's dropout between a basic block's convs
    gate_bias: float = GATE_BIAS  # shortcut=gated: the gates' initial bias
    preact_shortcut: str = "authors"  # PREACT_SHORTCUTS: a pre-activation net's shortcuts, the authors' or resexp 0.8's

    def __post_init__(self) -> None:
        layers = stage_layers(self.stem, self.block, self.depth)
        if self.shortcut not in SHORTCUTS:  # letters are canonical_shortcut's to translate, before this
            raise ResexpError(f"shortcut={self.shortcut!r} is not an option; choose {', '.join(SHORTCUTS)}")
        if self.bottleneck_stride not in BOTTLENECK_STRIDES:
            choices = " or ".join(f"{name} ({what})" for name, what in BOTTLENECK_STRIDES.items())
            raise ResexpError(f"model.bottleneck_stride={self.bottleneck_stride!r} is not an option; choose {choices}")
        if self.widths is not None:
            if len(self.widths) != len(layers) + 1 or any(not isinstance(w, int) or w < 1 for w in self.widths):
                raise ResexpError(
                    f"model.widths={list(self.widths)} must be {len(layers) + 1} positive integers, the stem's width "
                    f"and each stage's planes (the paper's: {list(WIDTHS[self.stem])}), or null"
                )
        if not (isinstance(self.cardinality, int) and self.cardinality >= 1 and self.base_width >= 1):
            raise ResexpError(
                f"model.cardinality={self.cardinality!r}, model.base_width={self.base_width!r} must be positive integers"
            )
        if self.block == "basic" and (self.cardinality, self.base_width) != (1, 64):
            raise ResexpError(
                f"model.cardinality={self.cardinality} and model.base_width={self.base_width} group a bottleneck's "
                "3x3 conv (ResNeXt); a basic block has none: use model.block=bottleneck or leave them at 1 and 64"
            )
        for planes in (self.widths or WIDTHS[self.stem])[1:]:
            if self.block == "bottleneck" and planes * self.base_width % 64:
                raise ResexpError(
                    f"model.base_width={self.base_width} gives a stage of {planes} planes "
                    f"{planes * self.base_width / 64:g} channels per group (planes x base_width / 64); "
                    "choose a base_width that makes every stage's whole"
                )
        if not math.isfinite(self.gate_bias):
            raise ResexpError(
                f"model.gate_bias={self.gate_bias!r} is not a number; choose a finite one (default {GATE_BIAS:g})"
            )
        if not -GATE_BIAS_LIMIT <= self.gate_bias <= GATE_BIAS_LIMIT:
            raise ResexpError(
                f"model.gate_bias={self.gate_bias!r} must be a number in [-{GATE_BIAS_LIMIT:g}, {GATE_BIAS_LIMIT:g}]: "
                f"beyond, the gates are shut or open to float32's last bit (default {GATE_BIAS:g})"
            )
        if self.gate_bias != GATE_BIAS and self.shortcut != "gated":
            raise ResexpError(
                f"model.gate_bias={self.gate_bias:g} sets the gates of shortcut=gated, and shortcut is "
                f"{self.shortcut}: add shortcut=gated, or leave model.gate_bias at {GATE_BIAS:g}"
            )
        if self.preact_shortcut not in PREACT_SHORTCUTS:
            raise ResexpError(
                f"model.preact_shortcut={self.preact_shortcut!r} is not an option; choose {' or '.join(PREACT_SHORTCUTS)}"
            )
        if self.preact_shortcut != "authors" and not self.preactivation:
            raise ResexpError(
                f"model.preact_shortcut={self.preact_shortcut} is for pre-activation nets, and model.preactivation is "
                "false: leave it at authors"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ResexpError(f"model.dropout={self.dropout!r} is not a rate; choose one in [0, 1) (WRN's: 0.3)")
        if self.dropout and self.block != "basic":
            raise ResexpError(
                f"model.dropout={self.dropout} is Wide ResNet's, between a basic block's convs; model.block is "
                f"{self.block}: use model.block=basic or model.dropout=0"
            )

    @classmethod
    def from_model(cls, model: Mapping[str, Any], shortcut: str, num_classes: int, **missing: Any) -> NetSpec:
        """The net a config's model node makes (keys it lacks take `missing`'s values, else the defaults)."""
        values = {
            f.name: model.get(f.name, missing.get(f.name, f.default))
            for f in dataclasses.fields(cls)
            if f.name not in ("shortcut", "num_classes")
        }
        if values["widths"] is not None:
            values["widths"] = tuple(values["widths"])
        if not values["preactivation"] and "preact_shortcut" not in model:  # older values for another net's units
            values["preact_shortcut"] = FIELDS["preact_shortcut"].default
        return cls(shortcut=canonical_shortcut(shortcut), num_classes=num_classes, **values)

    @classmethod
    def name_of(cls, model: Mapping[str, Any], shortcut: str | None, **missing: Any) -> str:
        """The name of a config's model node, unchecked (a net the config check will refuse has one too);
        keys the node lacks take `missing`'s values, else the defaults."""

        def get(key: str) -> Any:
            value = model.get(key)
            return missing.get(key, NAME_DEFAULTS[key]) if value is None else value

        widths = get("widths")
        return net_name(
            model["residual"],
            model["depth"],
            shortcut,
            get("block"),
            get("bottleneck_stride"),
            bool(get("preactivation")),
            stem=get("stem"),
            widths=None if widths is None else tuple(widths),
            **{key: get(key) for key in ("cardinality", "base_width", "dropout", "gate_bias", "preact_shortcut")},
        )

    @staticmethod
    def unused(values: Mapping[str, Any]) -> set[str]:
        """The model keys of a run's settings (`model.key: value`) that change nothing in its net, which its
        identity leaves out: the bottleneck's stride in a net of basic blocks, the gates' bias without
        gates, how pre-activation shortcuts are made in a net without them."""
        unused = set() if values.get("model.block") == "bottleneck" else {"model.bottleneck_stride"}
        if str(values.get("shortcut")).lower() != "gated":
            unused.add("model.gate_bias")
        if not values.get("model.preactivation") or values.get("model.residual") is False:
            unused.add("model.preact_shortcut")
        return unused

    def as_recorded(self, recorded: Mapping[str, Any]) -> NetSpec:
        """This net as a checkpoint's identity (`model.key: value`, older runs' values filled in) says it was
        trained: its bottlenecks' stride (its conf/ may predate the key) and its pre-activation shortcuts (a
        run of 0.8 or before has resexp's own)."""
        net = dataclasses.replace(self, bottleneck_stride=recorded["model.bottleneck_stride"])
        return dataclasses.replace(net, preact_shortcut=recorded["model.preact_shortcut"]) if net.preactivation else net

    @staticmethod
    def renamed_0_9(name: str, residual: bool) -> str:
        """A pre-activation net that a run before 0.9.0 trained had resexp 0.8's shortcuts, not the
        authors': named apart (`resnet164-B-preact-resexp-0.8`), as a saved config of it names it."""
        return f"{name}-resexp-0.8" if residual and "-preact" in name else name

    @property
    def kin(self) -> str:
        """What the name says beyond depth, plain or residual and the shortcut's letter (-preact, -v1.5,
        -gated, ...): a figure gives nets of one depth and kin one colour, in both panels."""
        return re.sub(r"^(plain|resnet)\d+(-[ABC])?", "", self.name)

    def legend(self, letter: bool) -> str:
        """ResNet-56, plain-20, ResNet-164 pre-act, ResNet-34 (B) where `letter` (A, B and C side by side);
        WRN-28-10 pre-act and ResNeXt-29-8x64d as their papers name them, with their dropout."""
        name, shown = self.name, letter and self.residual and self.shortcut != "gated"  # gated says so
        family = re.match(r"(plain-wrn|wrn|resnext)(?=\d)", name)
        if family:
            name = LEGEND_FAMILIES[family[0]] + name[family.end() :]
            name = re.sub(r"-[ABC](?=-|$)", f" ({SHORTCUTS[self.shortcut]})" if shown else "", name)
        else:
            name = f"{'ResNet' if self.residual else 'plain'}-{self.depth}"
            name += (f" ({SHORTCUTS[self.shortcut]})" if shown else "") + self.kin
        for tag, words in (
            ("-preact", " pre-act"),
            ("-v1.5", " v1.5"),
            ("-dropout", " dropout "),
            ("-gated", " gated"),
        ):
            name = name.replace(tag, words)
        return name.replace("-gatebias", ", gate bias ")

    def torchvision_keys(self) -> Callable[[str], str] | None:
        return torchvision_keys(self)

    @property
    def variant(self) -> dict[str, Any]:
        """The fields a net of the 2015 paper leaves at their defaults (widths, groups, dropout, gates)."""
        names = ("widths", "cardinality", "base_width", "dropout", "gate_bias", "preact_shortcut")
        return {name: getattr(self, name) for name in names}

    @property
    def shortcut_option(self) -> str | None:
        """The option a run's metrics, report and TensorBoard show: None for a plain net, which has none."""
        return self.shortcut if self.residual else None

    @property
    def widest(self) -> int:
        """The most channels a layer reads or writes: a bottleneck's 4x expansion, or ResNeXt's grouped 3x3
        conv, of the widest stage."""
        return max(self.widths or WIDTHS[self.stem]) * max(
            4 if self.block == "bottleneck" else 1, self.cardinality * self.base_width // 64
        )

    def model_values(self) -> dict[str, Any]:
        """The model keys this net is made of, as a checkpoint records them."""
        keys = ("depth", "residual", "block", "stem", "preactivation")
        made = {f"model.{key}": getattr(self, key) for key in (*keys, *self.variant)}
        return {"model.arch": "resnet", **made}

    @property
    def name(self) -> str:
        return net_name(
            self.residual,
            self.depth,
            self.shortcut,
            self.block,
            self.bottleneck_stride,
            self.preactivation,
            stem=self.stem,
            **self.variant,
        )

    def build(self) -> ResNet:
        layers = stage_layers(self.stem, self.block, self.depth)
        return ResNet(
            layers,
            self.block,
            self.stem,
            self.residual,
            self.shortcut,
            self.num_classes,
            self.bottleneck_stride,
            self.preactivation,
            **self.variant,
        )


FIELDS = {f.name: f for f in dataclasses.fields(NetSpec)}
# What a model node that lacks a key is named as (NetSpec.name_of): the 2015 paper's CIFAR net.
NAME_DEFAULTS = {
    "block": "basic",
    "stem": "cifar",
    **{name: f.default for name, f in FIELDS.items() if f.default is not dataclasses.MISSING},
}
# Families named after their papers (names.net_name), as their papers write them.
LEGEND_FAMILIES = {"plain-wrn": "plain WRN-", "wrn": "WRN-", "resnext": "ResNeXt-"}


def build_model(
    depth: int,
    residual: bool,
    block: str,
    stem: str,
    shortcut: str,
    num_classes: int,
    bottleneck_stride: str = "1x1",
    preactivation: bool = False,
    **variant: Any,
) -> ResNet:
    """The net these values name (the shortcut also by the paper's letter), checked against the paper's
    choices; `variant`: NetSpec's widths, cardinality, base_width, dropout, gate_bias and preact_shortcut."""
    shortcut = canonical_shortcut(shortcut)
    return NetSpec(
        depth, residual, block, stem, shortcut, num_classes, bottleneck_stride, preactivation, **variant
    ).build()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def torchvision_keys(spec: NetSpec) -> Callable[[str], str] | None:
    """How this net's state-dict keys read in torchvision's ResNet, where it computes torchvision's
    function: an ImageNet ResNet with option B (projections only where dimensions change; torchvision's
    `downsample`), with basic blocks or torchvision's v1.5 bottleneck (bottleneck_stride=3x3), grouped
    or widened as its resnext50_32x4d and wide_resnet50_2 are. None for any other net (plain, option A or
    C, CIFAR, the paper's bottleneck, other widths). stem.0/1 -> conv1/bn1, stages.i -> layer{i+1},
    shortcut -> downsample."""
    if not (spec.residual and spec.stem == "imagenet" and spec.shortcut == "projection"):
        return None
    if (spec.block == "bottleneck" and spec.bottleneck_stride != "3x3") or spec.preactivation:
        return None
    if spec.widths not in (None, WIDTHS[spec.stem]):
        return None

    def rename(key: str) -> str:
        key = re.sub(r"^stem\.0\.", "conv1.", key)
        key = re.sub(r"^stem\.1\.", "bn1.", key)
        key = re.sub(r"^stages\.(\d+)\.", lambda match: f"layer{int(match[1]) + 1}.", key)
        return key.replace(".shortcut.", ".downsample.")

    return rename
