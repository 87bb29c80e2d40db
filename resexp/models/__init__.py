"""resexp's nets, and the one door to them from the rest of resexp: He et al.'s ResNet, one class for the
plain and residual nets and the relatives that add (resnet.py), and Huang et al.'s DenseNet, which
concatenates (densenet.py), each described as data by its spec and chosen by model.arch.

A family is registered once, in FAMILIES, and its spec class owns every fact about it (the Family
protocol): its keys and their defaults (its dataclass fields, from which resexp/schemas.py types the
config), its checks, its names and legends, what older runs imply and what changes nothing in its
identity, its layers' grouped forms (`grouped`) and its torchvision key mapping. Nothing outside this
package names a family. Adding one: its module with its spec, a line in FAMILIES, its presets in
conf/model/, its published numbers in resexp/paper.py, and its tests.
"""

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from resexp.errors import ResexpError
from resexp.models.densenet import DenseNetSpec
from resexp.models.names import SHORTCUTS, canonical_shortcut
from resexp.models.resnet import NetSpec, build_model, count_parameters

__all__ = [
    "DEFAULT",
    "FAMILIES",
    "NAME_KEYS",
    "OLDER",
    "SHORTCUTS",
    "Family",
    "Spec",
    "build_model",
    "canonical_shortcut",
    "check_size",
    "count_parameters",
    "model_keys",
    "model_name",
    "name_before_0_9",
    "responds_at_conv",
    "spec_of",
    "units",
    "unused_keys",
]


class Family(Protocol):
    """What each family's spec class is: one net of the family as data, checked when made."""

    ARCH: ClassVar[str]  # its model.arch
    TITLE: ClassVar[str]  # its name over a figure's panel
    OLDER: ClassVar[dict[str, Any]]  # its model keys' values in older runs that did not record them
    depth: int
    residual: bool
    shortcut: str
    stem: str
    num_classes: int

    @classmethod
    def from_model(cls, model: Mapping[str, Any], shortcut: str, num_classes: int, **missing: Any) -> "Family": ...
    @classmethod
    def name_of(cls, model: Mapping[str, Any], shortcut: str | None, **missing: Any) -> str: ...
    @staticmethod
    def unused(values: Mapping[str, Any]) -> set[str]: ...  # its keys that change nothing in this net
    def as_recorded(self, recorded: Mapping[str, Any]) -> "Family": ...  # as a checkpoint says it trained
    @staticmethod
    def renamed_0_9(name: str, residual: bool) -> str: ...  # a name of resexp < 0.9.0 as named now
    def legend(self, letter: bool) -> str: ...  # a figure's legend entry (`letter`: show A/B/C)
    def model_values(self) -> dict[str, Any]: ...  # `model.key: value`, as a checkpoint records them
    def torchvision_keys(self) -> Callable[[str], str] | None: ...  # its state dict's keys in torchvision's
    def build(self) -> nn.Module: ...
    @property
    def name(self) -> str: ...
    @property
    def kin(self) -> str: ...  # what its name says beyond depth, kind and letter: one colour per depth and kin
    @property
    def widest(self) -> int: ...
    @property
    def shortcut_option(self) -> str | None: ...


# model.arch: each family's spec, registered once
FAMILIES: dict[str, type[Family]] = {spec.ARCH: spec for spec in (NetSpec, DenseNetSpec)}
DEFAULT = "resnet"  # the family of a model node without model.arch, and of every run before 0.7.0
Spec = NetSpec | DenseNetSpec

# The model keys every family has; each family's others are its own (own_keys).
COMMON = ("arch", "depth", "residual", "block", "stem", "shortcut", "dropout")


def own_keys(family: type[Family]) -> dict[str, Any]:
    """A family's own model keys and their defaults: its spec's fields that not every family has."""
    return {
        field.name: field.default
        for field in dataclasses.fields(family)  # type: ignore[arg-type]
        if field.name not in (*COMMON, "num_classes")
    }


def model_keys() -> dict[str, tuple[Any, Any]]:
    """Every family's own model keys: their types (the specs' annotations, as the config types them: a
    tuple is a list) and defaults, for resexp/schemas.py."""
    keys = {}
    for family in FAMILIES.values():
        hints = {field.name: field.type for field in dataclasses.fields(family)}  # type: ignore[arg-type]
        for key, default in own_keys(family).items():
            keys[key] = (hints[key].replace("tuple[int, ...]", "list[int]"), default)
    return keys


# The model keys a net's name is made of (model_name), and the values older runs imply for those keys
# they did not record (resexp/checkpoint.py)
NAME_KEYS = (*COMMON[:5], *(key for family in FAMILIES.values() for key in own_keys(family)), "dropout")
OLDER = {"model.arch": DEFAULT} | {
    f"model.{key}": value for family in FAMILIES.values() for key, value in family.OLDER.items()
}


def family_of(model: Mapping[str, Any]) -> type[Family]:
    """The family a config's model node names; a one-line error for another."""
    arch = model.get("arch", DEFAULT)
    if arch not in FAMILIES:  # also refused with the config's other values (resexp/checks.py), in the same words
        raise ResexpError(f"model.arch={arch!r} is not an option; choose {' or '.join(FAMILIES)}")
    return FAMILIES[arch]


def spec_of(model: Mapping[str, Any], shortcut: str, num_classes: int, **missing: Any) -> Family:
    """The net a config's model node makes, of the family its model.arch names; the first key of another
    family's that it sets away from its default is refused (it would change nothing)."""
    family = family_of(model)
    for other in FAMILIES.values():
        for key, default in own_keys(other).items() if other is not family else ():
            if model.get(key, default) != default:
                raise ResexpError(
                    f"model.{key}={model.get(key)!r} is for model.arch={other.ARCH}; a net of "
                    f"model.arch={family.ARCH} has none: leave it at {default!r}"
                )
    return family.from_model(model, shortcut, num_classes, **missing)


def model_name(model: Mapping[str, Any], shortcut: str | None, **missing: Any) -> str:
    """The name of a config's model node (`shortcut`: a canonical_shortcut name; None for a plain net),
    unchecked, so that even a net the config check will refuse has a name; keys the node lacks take
    `missing`'s values, else the defaults. A model.arch that is none is named as the default family."""
    return FAMILIES.get(model.get("arch") or DEFAULT, FAMILIES[DEFAULT]).name_of(model, shortcut, **missing)


def name_before_0_9(name: str, residual: bool) -> str:
    """The name that a net a run of resexp before 0.9.0 recorded has now: its family's (Family.renamed_0_9)."""
    for family in FAMILIES.values():
        name = family.renamed_0_9(name, residual)
    return name


def unused_keys(values: Mapping[str, Any]) -> set[str]:
    """The model keys of a run's settings (`model.key: value`) that change nothing in its net: those its
    family says so of, and the other families' own keys."""
    family = FAMILIES.get(values.get("model.arch", DEFAULT), FAMILIES[DEFAULT])
    others = {f"model.{key}" for other in FAMILIES.values() if other is not family for key in own_keys(other)}
    return family.unused(values) | (others - {f"model.{key}" for key in own_keys(family)})


def units(model: nn.Module) -> list[nn.Module]:
    """The units a lesion study deletes (He et al.'s blocks), in forward order."""
    return [module for module in model.modules() if getattr(module, "unit", False)]


def responds_at_conv(model: nn.Module) -> bool:
    """Whether a net's 3x3 convs' own outputs are their layers' responses (Fig. 7): in pre-activation
    units and dense layers no BN follows the conv."""
    return any(getattr(module, "responds_at_conv", False) for module in model.modules())


# Bytes per parameter that training holds at the least: fp32 weights, gradients and momentum.
TRAINING_BYTES = 12


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's, or the machine's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_size(spec: Family, device: torch.device) -> None:
    """One line where the net's weights, gradients and momentum alone would not fit in what `device` has
    free (model.widths=[16, 1000000, ...], model.growth_rate=100000): better than an allocation error, or
    the machine swapping. Where a bound from its widest layer says it fits, nothing is built; else it is
    counted on the meta device (no memory, but a second of start-up)."""
    free = free_memory(device)
    widest = spec.widest
    if (spec.depth + 3) * 9 * widest * (widest + spec.num_classes) * TRAINING_BYTES <= free:
        return
    try:
        with torch.device("meta"):
            parameters = count_parameters(spec.build())
    except (RuntimeError, OverflowError, ValueError):  # sizes past what a tensor can hold
        parameters = None
    if parameters is None:
        raise ResexpError(
            f"{spec.name} is too large to build (a layer of more weights than a tensor holds); choose narrower "
            "model.widths or a smaller model.growth_rate"
        )
    if parameters * TRAINING_BYTES > free:
        raise ResexpError(
            f"{spec.name} has {parameters:,} parameters, which need more than the {free / 2**30:.1f} GiB free on "
            f"{device} for their weights, gradients and momentum; choose narrower model.widths or a smaller "
            "model.growth_rate"
        )
