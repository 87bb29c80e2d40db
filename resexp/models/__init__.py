"""resexp's nets: He et al.'s ResNet, one class for the plain and residual nets and the relatives that
add (resnet.py), and Huang et al.'s DenseNet, which concatenates (densenet.py), each described as data
by its spec (NetSpec, DenseNetSpec) and chosen by model.arch."""

import os
from collections.abc import Mapping
from typing import Any

import torch

from resexp.errors import ResexpError
from resexp.models.densenet import DenseNet, DenseNetSpec
from resexp.models.resnet import SHORTCUTS, NetSpec, ResNet, build_model, canonical_shortcut, count_parameters

__all__ = [
    "ARCHS",
    "SHORTCUTS",
    "DenseNet",
    "DenseNetSpec",
    "NetSpec",
    "ResNet",
    "Spec",
    "build_model",
    "canonical_shortcut",
    "check_size",
    "count_parameters",
    "spec_of",
]

ARCHS = {"resnet": NetSpec, "densenet": DenseNetSpec}  # model.arch: the spec of each family
Spec = NetSpec | DenseNetSpec


def spec_of(model: Mapping[str, Any], shortcut: str, num_classes: int) -> Spec:
    """The net a config's model node makes, of the family its model.arch names."""
    arch = model.get("arch", "resnet")
    if arch not in ARCHS:  # also refused with the config's other values (resexp/checks.py), in the same words
        raise ResexpError(f"model.arch={arch!r} is not an option; choose {' or '.join(ARCHS)}")
    return ARCHS[arch].from_model(model, shortcut, num_classes)


# Bytes per parameter that training holds at the least: fp32 weights, gradients and momentum.
TRAINING_BYTES = 12


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's, or the machine's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_size(spec: Spec, device: torch.device) -> None:
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
