"""The names of resexp's nets (runs, directories, reports, the paper's numbers): the shortcut options'
letters, and each family's way of naming its nets, as their papers name them."""

from __future__ import annotations

from resexp.errors import ResexpError

# The shortcut options of §3.3 / Table 3, by name and by the paper's letter, and the gated identity of
# Highway networks (blocks.HighwayShortcut), which the paper compares against (Table 6) but has no letter for.
SHORTCUTS = {"identity": "A", "projection": "B", "full": "C", "gated": "gated"}
# The gates' initial bias b_T (shortcut=gated): He et al. 2016's best for ResNet-110 (their Table 1; 0 to -5 failed).
GATE_BIAS = -6.0

# How a pre-activation net's shortcuts are made: as He et al. 2016's code makes them (a projection with no
# BN of its own, reading the pre-activated input, which the first unit's identity reads too), or as resexp
# 0.8 and before made them (a BN after each projection; the first unit's identity reading conv1's output),
# which older runs keep (resexp/checkpoint.py).
PREACT_SHORTCUTS = ("authors", "resexp-0.8")

# The stem's width, then each stage's planes (a bottleneck stage outputs 4x its planes): §4.2 and Table 1.
WIDTHS = {"cifar": (16, 16, 32, 64), "imagenet": (64, 64, 128, 256, 512), "small": (64, 64, 128, 256, 512)}

# ResNeXt's CIFAR nets (Xie et al. 2017, §5.3): a 64-wide stem and stages of 64/128/256 planes (256, 512
# and 1024 channels out).
RESNEXT_CIFAR_WIDTHS = (64, 64, 128, 256)


def widening(stem: str, widths: tuple[int, ...] | None) -> int | None:
    """Wide ResNet's factor k where `widths` are the paper's stages k times wider around the paper's stem
    (Zagoruyko & Komodakis 2016, Table 1: WRN-28-10 is 16, 160, 320, 640); None for any other widths."""
    paper = WIDTHS[stem]
    if widths is None or widths[0] != paper[0] or widths[1] % paper[1]:
        return None
    k = widths[1] // paper[1]
    return k if k > 1 and list(widths[1:]) == [k * w for w in paper[1:]] else None


def canonical_shortcut(option: str) -> str:
    """'identity'/'projection'/'full'/'gated', also accepting the paper's letters A/B/C."""
    letters = {letter: name for name, letter in SHORTCUTS.items() if len(letter) == 1}
    name = letters.get(str(option).upper(), str(option).lower())
    if name not in SHORTCUTS:
        raise ResexpError(
            f"shortcut={option!r} is not an option; choose identity (A), projection (B), full (C) or gated (Highway's)"
        )
    return name


def net_name(
    residual: bool,
    depth: int,
    shortcut: str | None,
    block: str = "basic",
    bottleneck_stride: str = "1x1",
    preactivation: bool = False,
    *,
    stem: str = "cifar",
    widths: tuple[int, ...] | None = None,
    cardinality: int = 1,
    base_width: int = 64,
    dropout: float = 0.0,
    gate_bias: float = GATE_BIAS,
    preact_shortcut: str = "authors",
) -> str:
    """How runs are named in logs, directories and reports: `plain56`, `resnet56-A` (shortcut: a
    canonical_shortcut name; a plain net has none), `resnet50-B-v1.5` for torchvision's bottleneck,
    `resnet164-B-preact` for He et al. 2016's units, `wrn28-10-B-preact` for a Wide ResNet (named by its
    paper's depth, which counts the three 1x1 projections and not the classifier: model.depth + 2),
    `resnext29-8x64d-B` for a ResNeXt (cardinality x the groups' width in the first stage; its block
    strides in the 3x3 conv, `-stride1x1` where it does not), `resnet110-gated` for gated shortcuts
    (`-gatebias-1` for gates that start elsewhere than GATE_BIAS), `resnet18-A-stem3x3` behind the small stem."""
    letter = f"-{SHORTCUTS[shortcut]}" if residual else ""
    k = widening(stem, widths) if block == "basic" else None
    if cardinality > 1:
        group_width = (widths or WIDTHS[stem])[1] * base_width // 64
        name = f"{'resnext' if residual else 'plain'}{depth}-{cardinality}x{group_width}d{letter}"
    elif k is not None:
        name = f"{'wrn' if residual else 'plain-wrn'}{depth + 2}-{k}{letter}"
    else:
        name = f"resnet{depth}{letter}" if residual else f"plain{depth}"
    if block == "bottleneck" and cardinality > 1:  # ResNeXt's own block strides in its 3x3 conv
        name += "-stride1x1" if bottleneck_stride == "1x1" else ""
    elif block == "bottleneck":
        name += "-v1.5" if bottleneck_stride == "3x3" else ""
    name += "-preact" if preactivation else ""
    if preactivation and residual and preact_shortcut != "authors":
        name += f"-{preact_shortcut}"  # resnet164-B-preact-resexp-0.8: not the authors' net
    usual = RESNEXT_CIFAR_WIDTHS if cardinality > 1 and stem == "cifar" else WIDTHS[stem]
    if k is None and tuple(widths or WIDTHS[stem]) != usual:
        name += "-widths" + "-".join(map(str, widths or WIDTHS[stem]))
    if cardinality == 1 and base_width != 64:
        name += f"-width{base_width}"
    if residual and shortcut == "gated" and gate_bias != GATE_BIAS:
        name += f"-gatebias{gate_bias:g}"
    name += "-stem3x3" if stem == "small" else ""  # the paper's nets behind a small-input stem (resnet.STEMS)
    return name + (f"-dropout{dropout:g}" if dropout else "")


def densenet_name(depth: int, block: str, growth_rate: int, compression: float, dropout: float = 0.0) -> str:
    """A DenseNet as Huang et al. 2017 name theirs: `densenet40-12` for DenseNet (L=40, k=12),
    `densenet-bc100-12` for DenseNet-BC (L=100, k=12): B for the 1x1 convs, C for transitions that keep a
    fraction of the maps (`-theta0.7` where it is not their 0.5)."""
    letters = ("b" if block == "bottleneck" else "") + ("c" if compression < 1 else "")
    name = f"densenet{'-' + letters if letters else ''}{depth}-{growth_rate}"
    if compression not in (0.5, 1.0):
        name += f"-theta{compression:g}"
    return name + (f"-dropout{dropout:g}" if dropout else "")
