"""resexp's nets: He et al.'s ResNet, one class for the plain and residual nets and the relatives that
add (resnet.py), and Huang et al.'s DenseNet, which concatenates (densenet.py), each described as data
by its spec (NetSpec, DenseNetSpec) and chosen by model.arch."""

from collections.abc import Mapping
from typing import Any

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
